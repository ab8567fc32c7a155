"""Nothing stays frozen when our daemon goes away: uninstall (SIGTERM), crash (SIGKILL), restart.

Real parts, as in test_freeze_path: a private containerd, a sleeptalker pod that carries a
``freeze-proxy`` container (the webhook's sidecar, here a sleeper: what the daemon's start looks
for), the real ``python -m daemon`` and ``python -m freeze_proxy`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from freeze_proxy.contract import SIDECAR_NAME
from testbed.containerd import Containerd
from testbed.pods import Pod, sleeper
from testbed.stack import Stack, stack
from tests.pod_checks import until

pytestmark = pytest.mark.containerd
APP = "user-container"


def ticks(pod: Pod) -> int:
    return sum(1 for line in pod.log_lines(APP) if line.startswith("tick"))


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def eventually_async(check: Any, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {limit} s")
        await asyncio.sleep(0.02)


async def ticking(pod: Pod) -> bool:
    """Runs: Tasks says RUNNING and the ticker (every 100 ms) ticks again."""
    if await pod.task_status(APP) != "RUNNING":
        return False
    before = ticks(pod)
    deadline = time.monotonic() + 2
    while ticks(pod) < before + 2:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@contextlib.asynccontextmanager
async def our_app(tmp_path: Path) -> AsyncIterator[tuple[Stack, Pod, int, str]]:
    """The stack with a sleeptalker pod that has our sidecar's container."""
    async with stack(tmp_path) as st:
        st.sleeptalker_image()
        pod, port = await st.sleeptalker_pod(tick=0.1, extra=[sleeper(SIDECAR_NAME)])
        state = tmp_path / "state"
        state.mkdir()
        yield st, pod, port, f"--state-file={state / 'may-be-frozen'}"


def end(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    os.kill(proc.pid, sig)
    return proc.wait(timeout=15)


async def test_uninstall_sigterm_thaws_the_app_and_the_proxy_serves_it_unfrozen(
    containerd: Containerd, tmp_path: Path
) -> None:
    """``kubectl delete -f config/`` while the app is frozen: the daemon pod gets SIGTERM."""
    async with our_app(tmp_path) as (st, pod, port, state_flag):
        async with st.proxy(pod, port, "--grace=0", "--resume-timeout=2s", state_flag) as proxy:
            await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen when idle")
            await eventually_async(
                lambda: _state_is(proxy.health, "frozen"), "the proxy counted the pause"
            )
            assert st.daemon_proc is not None
            started = time.monotonic()
            assert end(st.daemon_proc, signal.SIGTERM) == 0
            assert time.monotonic() - started < 8, "the graceful stop took too long"
            # The daemon thawed what it froze before exiting.
            assert pod.freezer_state(APP) == "THAWED"
            await eventually_async(lambda: ticking(pod), "the app running again")
            stopped = [
                line for line in log_lines(st.daemon_log) if line.get("outcome") == "stop_thawed"
            ]
            assert [(line["pod_uid"], line["namespace"]) for line in stopped] == [
                (pod.uid, pod.namespace)
            ], stopped

            # The proxy still believes the app frozen: its resume finds no daemon.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{proxy.url}/?sleep=0") as r:
                    assert r.status == 200, await r.text()
                    assert (await r.text()).rstrip().endswith("world.")
                health = await proxy.health()
                assert health["state"] == "awake" and health["daemon"] == "unreachable", health
                # It no longer calls the gone daemon for every request.
                for i in range(3):
                    t0 = time.monotonic()
                    async with s.get(f"{proxy.url}/?sleep=0&i={i}") as r:
                        assert r.status == 200, await r.text()
                    assert time.monotonic() - t0 < 0.5, "the request waited for a resume"
            assert pod.freezer_state(APP) == "THAWED"
        warned = [
            line
            for line in log_lines(proxy.log_file)
            if "uninstalled from this node" in line["msg"]
        ]
        assert len(warned) == 1 and warned[0]["level"] == "warning", warned
        assert st.daemon_url in warned[0]["msg"]


async def _state_is(health: Any, state: str) -> bool:
    return bool((await health())["state"] == state)


async def test_a_restarted_daemon_thaws_what_a_crashed_one_left_frozen_and_nothing_else(
    containerd: Containerd, tmp_path: Path
) -> None:
    """SIGKILL (no graceful stop) while the app is frozen; the next daemon thaws it at its
    start, before it serves. A paused container of a pod without our sidecar (someone else's)
    stays paused."""
    async with our_app(tmp_path) as (st, pod, port, state_flag):
        other = await st.client.create_pod([sleeper("worker")], name="not-ours", namespace="x")
        await other.pause("worker")
        async with st.proxy(pod, port, "--grace=0", state_flag) as proxy:
            await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen when idle")
            assert st.daemon_proc is not None
            assert end(st.daemon_proc, signal.SIGKILL) == -signal.SIGKILL
            assert await pod.task_status(APP) == "PAUSED", "a killed daemon cannot have thawed"

            async with st.daemon():  # returns once the new daemon serves
                assert await pod.task_status(APP) == "RUNNING", "not thawed before serving"
                assert pod.freezer_state(APP) == "THAWED"
                await eventually_async(lambda: ticking(pod), "the app running again")
                assert await other.task_status("worker") == "PAUSED", "someone else's pause"
                assert await pod.task_status(SIDECAR_NAME) == "RUNNING"
                thawed = [
                    line
                    for line in log_lines(st.daemon_log)
                    if line.get("outcome") == "start_thawed"
                ]
                assert [(t["pod_uid"], t["container"]) for t in thawed] == [(pod.uid, APP)]
                # And the proxy goes on as before with the new daemon.
                async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/?sleep=0") as r:
                    assert r.status == 200, await r.text()
                await until(lambda: pod.freezer_state(APP) == "FROZEN", "frozen again")
