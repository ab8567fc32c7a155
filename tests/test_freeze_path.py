"""The whole freeze path on real parts: freeze-proxy → freeze-daemon → containerd → the app.

sleeptalker prints a tick every 100 ms; its CRI log and its freezer cgroup tell whether it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from testbed.containerd import Containerd
from testbed.pods import Pod
from testbed.stack import Stack, stack
from tests.pod_checks import until

pytestmark = pytest.mark.containerd
APP = "user-container"


def ticks(pod: Pod) -> int:
    return sum(1 for line in pod.log_lines(APP) if line.startswith("tick"))


@contextlib.asynccontextmanager
async def sleeptalker(tmp_path: Path) -> AsyncIterator[tuple[Stack, Pod, int, str]]:
    """The real stack with a sleeptalker pod: (stack, pod, app port, ``--state-file`` flag)."""
    async with stack(tmp_path) as st:
        st.sleeptalker_image()
        pod, port = await st.sleeptalker_pod(tick=0.1)
        state = tmp_path / "state"
        state.mkdir()
        yield st, pod, port, f"--state-file={state / 'may-be-frozen'}"


async def test_idle_freezes_requests_wake_and_streams_keep_the_app_awake(
    containerd: Containerd, tmp_path: Path
) -> None:
    # ``containerd`` only makes this skip/fail like every real-containerd test; the stack starts
    # its own private one beside it.
    async with sleeptalker(tmp_path) as (st, pod, port, state_flag):
        async with st.proxy(pod, port, "--grace=200ms", state_flag) as proxy:
            await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen when idle")
            before = ticks(pod)
            await asyncio.sleep(1.0)
            assert ticks(pod) == before, "the app ticked while frozen"

            # A request that streams for ~1 s: awake until its last byte.
            states: list[str] = []
            first_byte = asyncio.Event()

            async def fetch() -> bytes:
                async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/?sleep=1") as r:
                    assert r.status == 200
                    head = await r.content.readany()
                    first_byte.set()
                    return head + await r.read()

            request = asyncio.ensure_future(fetch())
            await first_byte.wait()
            while not request.done():
                states.append(pod.freezer_state(APP))
                await asyncio.sleep(0.05)
            body = await request
            assert body.startswith(b"Hello") and body.rstrip().endswith(b"world.")
            assert len(states) >= 10 and set(states) == {"THAWED"}, f"frozen mid-stream: {states}"
            assert ticks(pod) > before, "the app did not run while serving"
            await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen again after grace")
            # The cgroup is frozen before the daemon answers the proxy's pause call; the proxy
            # counts the pause when the answer arrives.
            for _ in range(500):
                health = await proxy.health()
                if health["state"] == "frozen":
                    break
                await asyncio.sleep(0.01)
            assert health["resumes"] >= 1 and health["pauses"] >= 2, health

        # The proxy's SIGTERM (kubelet stopping the pod) leaves the app running.
        assert pod.freezer_state(APP) == "THAWED"


async def test_a_killed_proxy_leaves_no_request_to_a_frozen_app(
    containerd: Containerd, tmp_path: Path
) -> None:
    """SIGKILL after a pause (an OOM kill); kubelet restarts the proxy: it resumes first."""
    async with sleeptalker(tmp_path) as (st, pod, port, state_flag):
        state = tmp_path / "state"
        async with st.proxy(pod, port, "--grace=0", state_flag) as proxy:
            await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen")
            os.kill(proxy.proc.pid, signal.SIGKILL)
            proxy.proc.wait()
        assert pod.freezer_state(APP) == "FROZEN", "a killed proxy cannot have thawed it"
        assert (state / "may-be-frozen").exists()
        async with st.proxy(pod, port, "--grace=5s", state_flag) as proxy:
            async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/?sleep=0") as r:
                assert r.status == 200
                assert (await r.text()).rstrip().endswith("world.")
            assert pod.freezer_state(APP) == "THAWED"
            assert not (state / "may-be-frozen").exists()
