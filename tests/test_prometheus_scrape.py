"""A real Prometheus (Debian's package) scrapes the real freeze-proxy and freeze-daemon while a
real containerd freezes and wakes the app; the counters are read back through its HTTP API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from testbed import prometheus
from testbed.containerd import Containerd
from testbed.stack import Proxy, stack
from tests.conftest import _unavailable

pytestmark = pytest.mark.containerd
WAKES = 3


async def frozen(proxy: Proxy, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (await proxy.health())["state"] != "frozen":
        assert time.monotonic() < deadline, f"the app was not frozen within {within:g} s"
        await asyncio.sleep(0.02)


async def test_prometheus_reads_the_wakes_from_both_programs(
    containerd: Containerd, tmp_path: Path
) -> None:
    why = prometheus.missing()
    if why:
        _unavailable(f"a real Prometheus cannot run here: {why}")
    async with stack(tmp_path) as st:
        st.sleeptalker_image()
        pod, port = await st.sleeptalker_pod(tick=0.1)
        state = tmp_path / "state"
        state.mkdir()
        async with st.proxy(pod, port, "--grace=200ms", f"--state-file={state / 'm'}") as proxy:
            jobs = {
                "freeze-proxy": [urlsplit(proxy.health_url).netloc],
                "freeze-daemon": [f"127.0.0.1:{st.daemon_port}"],
            }
            with prometheus.prometheus(jobs) as prom:
                async with aiohttp.ClientSession() as s:
                    for i in range(WAKES):
                        await frozen(proxy)
                        async with s.get(f"{proxy.url}/?sleep=0&n={i}") as r:
                            assert r.status == 200
                await frozen(proxy)
                # Both targets are scraped, and what they counted is what happened.
                await prom.wait_value('up{job="freeze-proxy"}', 1)
                await prom.wait_value('up{job="freeze-daemon"}', 1)
                await prom.wait_value('freeze_proxy_resumes_total{result="ok"}', WAKES)
                await prom.wait_value("freeze_proxy_wake_seconds_count", WAKES)
                await prom.wait_value('freeze_proxy_pauses_total{result="ok"}', WAKES + 1)
                await prom.wait_value('freeze_proxy_app_state{state="frozen"}', 1)
                await prom.wait_value("freeze_proxy_requests_in_flight", 0)
                await prom.wait_value(
                    'freeze_daemon_calls_total{action="resume",status="200"}', WAKES
                )
                await prom.wait_value(
                    'freeze_daemon_calls_total{action="pause",status="200"}', WAKES + 1
                )
                await prom.wait_value(
                    "freeze_daemon_runtime_call_seconds_count"
                    '{backend="containerd",action="resume"}',
                    WAKES,
                )
                # A dashboard's query: the wakes' p99 is a real latency, well under the budget.
                p99 = prom.value("histogram_quantile(0.99, freeze_proxy_wake_seconds_bucket)")
                assert p99 is not None and 0 < p99 < 5.0, p99
                assert (prom.value("freeze_proxy_frozen_seconds_total") or 0) > 0
            assert not prom.work.exists(), "the Prometheus directory was left behind"
