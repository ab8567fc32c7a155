"""Knative's real queue-proxy in front of the real freeze-proxy in front of a frozen app.

The chain a mutated Knative pod runs, every link a real process: queue-proxy (the Go binary,
with the environment Knative's reconciler gives it, ``USER_PORT`` re-pointed at freeze-proxy as
the webhook does) → ``python -m freeze_proxy`` → the sleeptalker app in a container on the test
bed's containerd, paused and resumed by the real ``python -m daemon`` (which here checks a
locally minted token against a JWKS file: authentication against a real API server is
``tests/test_apiserver_daemon.py``'s job). The kernel's freezer state and the app's own tick
log say whether the app runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio

from freeze_proxy.backlog import read_accept_queue
from testbed.pods import Pod
from testbed.queueproxy import QueueProxy, http_probe, tcp_probe
from testbed.stack import Proxy, Stack, stack
from tests.pod_checks import eventually
from webhook.mutation import rewrite_readiness_env

# One stack (containerd, daemon, app pod, freeze-proxy) for the module, one event loop for it;
# each test starts its own queue-proxy (it binds fixed ports, so one at a time).
pytestmark = [
    pytest.mark.queueproxy,
    pytest.mark.containerd,
    pytest.mark.asyncio(loop_scope="module"),
]

USER = "user-container"
TICK = 0.1  # the app prints a tick this often while it runs
GRACE = 0.25  # freeze-proxy's default idle grace
FIRST_LINE = b"Hello, this request will take two seconds..\n"
LAST_LINE = b".. world.\n"


@dataclass
class Chain:
    stack: Stack
    pod: Pod
    app_port: int
    proxy: Proxy
    binary: Path

    @property
    def proxy_port(self) -> int:
        port = urlsplit(self.proxy.url).port
        assert port is not None
        return port

    @property
    def health_port(self) -> int:
        port = urlsplit(self.proxy.health_url).port
        assert port is not None
        return port

    @contextlib.contextmanager
    def queue_proxy(self, readiness_probe: dict[str, Any] | None = None) -> Iterator[QueueProxy]:
        """queue-proxy with USER_PORT = freeze-proxy's port, as the webhook rewrites it;
        the readiness probe defaults to an httpGet re-aimed at the proxy (the webhook's
        rewrite of an httpGet probe at the app's port)."""
        probe = readiness_probe or http_probe(self.proxy_port, "/ready?sleep=0")
        with QueueProxy(self.proxy_port, binary=self.binary, readiness_probe=probe) as qp:
            yield qp

    def ticks(self) -> int:
        return sum(1 for line in self.pod.log_lines(USER) if line.startswith("tick "))

    def requests_seen(self) -> list[str]:
        return [line for line in self.pod.log_lines(USER) if line.startswith("request ")]

    async def health(self) -> dict[str, Any]:
        return await self.proxy.health()

    async def frozen_and_quiet(self, timeout: float = 5.0, quiet: float = 1.0) -> bool:
        """The gate paused the app (after the grace), the kernel agrees, and no tick is
        printed for ``quiet`` seconds (ten tick intervals)."""
        deadline = time.monotonic() + timeout
        while not (
            (await self.health())["state"] == "frozen" and self.pod.freezer_state(USER) == "FROZEN"
        ):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a tick printed just before the pause may still be on its way
        before = self.ticks()
        await asyncio.sleep(quiet)
        return self.ticks() == before and self.pod.freezer_state(USER) == "FROZEN"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(queue_proxy_binary: Path) -> AsyncIterator[Chain]:
    async with stack() as st:
        st.sleeptalker_image()
        pod, app_port = await st.sleeptalker_pod(tick=TICK)
        async with st.proxy(pod, app_port, f"--grace={GRACE * 1000:g}ms") as proxy:
            yield Chain(st, pod, app_port, proxy, queue_proxy_binary)


async def get(url: str) -> tuple[int, bytes, list[tuple[float, bytes]]]:
    """GET ``url``: status, body, and each chunk with the time it arrived (from the start)."""
    started = time.monotonic()
    chunks: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        async for chunk in resp.content.iter_any():
            chunks.append((time.monotonic() - started, chunk))
        return resp.status, b"".join(c for _, c in chunks), chunks


async def test_requests_flow_through_both_proxies_and_wake_the_frozen_app(chain: Chain) -> None:
    with chain.queue_proxy() as qp:
        assert await chain.frozen_and_quiet(), chain.proxy.log_file.read_text()[-2000:]
        before = await chain.health()
        ticks = chain.ticks()

        status, body, _ = await get(qp.url + "/hello?sleep=0.3")
        assert status == 200, (body, chain.proxy.log_file.read_text()[-3000:])
        assert body == FIRST_LINE + LAST_LINE
        # It reached the app (its own request log), which ran for it: ticks during the request.
        # (The app logs a request after its last byte; the CRI log lags its stdout a little.)
        assert await eventually(
            lambda: any(
                r.startswith("request GET /hello?sleep=0.3 200") for r in chain.requests_seen()
            )
        ), chain.requests_seen()
        assert await eventually(lambda: chain.ticks() >= ticks + 2)
        after = await chain.health()
        assert after["resumes"] == before["resumes"] + 1
        assert after["resume_failures"] == after["pause_failures"] == after["refused"] == 0

        # Idle again: frozen after the grace, silent while idle; and the next request wakes it.
        assert await chain.frozen_and_quiet()
        assert (await chain.health())["pauses"] == before["pauses"] + 1
        for _ in range(2):
            status, body, _ = await get(qp.url + "/again?sleep=0")
            assert (status, body) == (200, FIRST_LINE + LAST_LINE)
            assert await chain.frozen_and_quiet(quiet=0.5)
        assert not [line for line in qp.output().splitlines() if '"severity":"ERROR"' in line]


@pytest.mark.parametrize(
    "kind",
    [
        "httpGet re-aimed at freeze-proxy (aggressive, Knative's default period 0)",
        "httpGet re-aimed at freeze-proxy (periodSeconds 1, timeoutSeconds 1)",
        "tcpSocket at the app's port (Knative's default probe, not rewritten)",
    ],
)
async def test_readiness_probe_answers_while_the_app_is_frozen(chain: Chain, kind: str) -> None:
    if kind.startswith("tcpSocket"):
        probe = tcp_probe(chain.app_port)
    else:
        period = 1 if "periodSeconds 1" in kind else 0
        probe = http_probe(chain.proxy_port, "/ready?sleep=0", period_seconds=period)
    with chain.queue_proxy(probe) as qp:
        for _ in range(3):
            assert await chain.frozen_and_quiet(quiet=0.5)
            before = await chain.health()
            seen = len(chain.requests_seen())

            # kubelet's probe of queue-proxy (K-Network-Probe: queue, User-Agent kube-probe/1.x).
            assert qp.probe() == (200, "queue"), qp.output()[-2000:]

            after = await chain.health()
            if kind.startswith("tcpSocket"):
                # The kernel completes the handshake for the frozen app: nothing wakes it.
                assert after["resumes"] == before["resumes"]
                assert len(chain.requests_seen()) == seen
                assert chain.pod.freezer_state(USER) == "FROZEN"
            else:
                # The probe went through freeze-proxy, which resumed the app to answer it.
                assert after["resumes"] == before["resumes"] + 1
                assert await eventually(lambda n=seen: len(chain.requests_seen()) > n)
                assert all(
                    r.startswith("request GET /ready?sleep=0 200")
                    for r in chain.requests_seen()[seen:]
                ), chain.requests_seen()[seen:]
        # ... and is frozen again once the probe is answered.
        assert await chain.frozen_and_quiet()


async def test_ready_check_of_a_frozen_app_neither_wakes_it_nor_queues_a_connection(
    chain: Chain,
) -> None:
    """Knative's default probe as the webhook rewrites it (freeze-proxy's /ready): answered
    from the app's last result while it is frozen — no resume, and no connection left in the
    frozen app's accept queue (a TCP probe of the app leaves one per probe)."""
    raw = json.dumps(tcp_probe(chain.app_port))
    rewritten, _ = rewrite_readiness_env(raw, chain.app_port, chain.proxy_port, chain.health_port)
    assert rewritten is not None
    probe = json.loads(rewritten)
    assert probe["httpGet"]["port"] == chain.health_port
    with chain.queue_proxy(probe) as qp:
        for _ in range(3):
            assert await chain.frozen_and_quiet(quiet=0.5)
            before = await chain.health()
            seen = len(chain.requests_seen())
            # (Earlier tests' TCP probes may have left a few, below the wake threshold.)
            queued = _queued(chain.app_port)

            # kubelet's probe of queue-proxy, which asks freeze-proxy's /ready.
            assert qp.probe(timeout=15) == (200, "queue"), qp.output()[-2000:]

            after = await chain.health()
            assert after["resumes"] == before["resumes"], after
            assert after["state"] == "frozen" and chain.pod.freezer_state(USER) == "FROZEN"
            assert _queued(chain.app_port) == queued
            assert len(chain.requests_seen()) == seen
        # A request still wakes it, and it is frozen again after.
        status, body, _ = await get(qp.url + "/after-probes?sleep=0")
        assert (status, body) == (200, FIRST_LINE + LAST_LINE)
        assert await chain.frozen_and_quiet()


def _queued(port: int) -> int:
    found = read_accept_queue(port)
    return 0 if found is None else found.queued


async def test_tcp_probes_of_a_frozen_app_never_fill_its_accept_queue(chain: Chain) -> None:
    """A tcpSocket probe of the app's port (Knative's default readiness probe before the webhook
    rewrites it; kubelet's tcpSocket probes of the user container still are) completes a
    handshake with a frozen app, and the connection stays in the app's accept queue.
    sleeptalker's backlog is aiohttp's 128: before freeze-proxy watched that queue, probe 130
    of a frozen app and every one after it answered 503 (each after 10 s of queue-proxy's
    retries) — in a cluster, ~22 min of kubelet probes every 10 s, and then a NotReady pod
    that no request would ever wake."""
    probes = 160
    with chain.queue_proxy(tcp_probe(chain.app_port)) as qp:
        assert await chain.frozen_and_quiet(quiet=0.3)
        before = await chain.health()
        results, queued = [], []
        for _ in range(probes):
            results.append(qp.probe(timeout=15)[0])
            queued.append(_queued(chain.app_port))
            await asyncio.sleep(0.04)  # paced: the proxy looks at the queue every 2 s
        assert results == [200] * probes, results
        assert max(queued) < 100, queued  # far from sleeptalker's backlog of 128
        # The last probes' connections are accepted in the next wake; then it stays frozen.
        assert await eventually(lambda: _queued(chain.app_port) < 4)
        assert await chain.frozen_and_quiet()
        after = await chain.health()
        # The app was resumed for the queued connections only a few times (threshold 4, checked
        # every 2 s), not per probe, and no request was forwarded for it.
        wakes = after["backlog_wakes"] - before["backlog_wakes"]
        assert 1 <= wakes <= 10, after
        assert after["resumes"] - before["resumes"] == wakes


async def test_streaming_response_keeps_the_app_awake_until_the_last_byte(chain: Chain) -> None:
    sleep = 1.5  # between the app's two lines; six graces long
    with chain.queue_proxy() as qp:
        assert await chain.frozen_and_quiet()
        before = await chain.health()
        request = asyncio.ensure_future(get(f"{qp.url}/stream?sleep={sleep}"))

        # Mid-stream, long after a grace would have run out if the gate thought it idle.
        await asyncio.sleep(1.0)
        assert not request.done()
        mid = await chain.health()
        assert (mid["state"], mid["in_flight"]) == ("awake", 1), mid
        assert chain.pod.freezer_state(USER) == "THAWED"
        ticks = chain.ticks()
        await asyncio.sleep(0.4)
        assert chain.ticks() >= ticks + 2  # it runs, producing the rest of its response

        status, body, chunks = await request
        assert status == 200
        assert body == FIRST_LINE + LAST_LINE
        # Streamed through both proxies: the first line arrived at once, the last after `sleep`.
        assert b"".join(c for t, c in chunks if t < 1.0) == FIRST_LINE, chunks
        assert chunks[0][0] < 0.5 and chunks[-1][0] >= sleep, chunks
        after = await chain.health()
        assert after["pauses"] == before["pauses"]  # never paused mid-response
        assert after["resumes"] == before["resumes"] + 1

        assert await chain.frozen_and_quiet()
        assert (await chain.health())["pauses"] == before["pauses"] + 1
