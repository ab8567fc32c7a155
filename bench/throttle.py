"""Throttle vs freeze, in one run on real containerd: wake latency and idle CPU.

The same sleeptalker pod is put behind a freeze-proxy with ``--mode freeze`` and one with
``--mode throttle`` (floor 10m), alternately, segment by segment, so a noisy neighbour hits both.
Wake: with grace 0 each request finds the app paused (frozen, or at its CPU floor) and is timed
to its first byte. Idle CPU: the app's cgroup CPU per idle minute, for sleeptalker (quiet: it
barely uses its floor) and for a busy-loop container (an app that spins while idle: throttled,
it uses the floor; frozen, nothing).
"""

from __future__ import annotations

import asyncio
import time

from bench.common import Table, percentile, proxy_python
from freeze_proxy import contract
from testbed.containerd import missing_prerequisites
from testbed.pods import ContainerSpec, Pod
from testbed.processes import free_port
from testbed.stack import Proxy, Stack, stack

BENCH = "throttle"
CONTAINER = "user-container"


def busy_command(port: int) -> tuple[str, ...]:
    """Spins, and serves on ``port`` (busybox httpd) so that a proxy arms in front of it."""
    return ("/bin/sh", "-c", f"httpd -p 127.0.0.1:{port} -h /; while :; do :; done")


MODES = (contract.MODE_FREEZE, contract.MODE_THROTTLE)


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    segments, wakes, idle = (1, 5, 2.0) if quick else (2, 50, 15.0)
    asyncio.run(_run(table, segments, wakes, idle))


async def _paused(proxy: Proxy, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while (await proxy.health()).get("state") != "frozen":
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy never paused the app")
        await asyncio.sleep(0.005)


async def _first_byte(url: str) -> float:
    """Seconds from sending a GET to the first byte of its answer (a new connection)."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.perf_counter()
        writer.write(b"GET /?sleep=0 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        await reader.readexactly(1)
        took = time.perf_counter() - started
        await reader.read()
        return took
    finally:
        writer.close()


async def _idle_rate(pod: Pod, seconds: float) -> float:
    """CPU seconds per minute the pod's user container used over ``seconds``."""
    before, started = pod.cpu_usage_seconds(CONTAINER), time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window itself
    return (pod.cpu_usage_seconds(CONTAINER) - before) * 60 / (time.monotonic() - started)


async def _run(table: Table, segments: int, wakes: int, idle: float) -> None:
    latencies: dict[str, list[float]] = {m: [] for m in MODES}
    quiet: dict[str, list[float]] = {m: [] for m in MODES}
    busy: dict[str, list[float]] = {m: [] for m in MODES}
    async with stack() as st:
        st.sleeptalker_image()
        talker, talker_port = await st.sleeptalker_pod(name="throttle-bench")
        spinner_port = free_port()
        spinner = await st.client.create_pod(
            [ContainerSpec(CONTAINER, command=busy_command(spinner_port))], name="throttle-busy"
        )
        awake_quiet = await _idle_rate(talker, idle)
        awake_busy = await _idle_rate(spinner, min(idle, 5.0))
        for _ in range(segments):
            for mode in MODES:
                await _segment(st, mode, talker, talker_port, wakes, idle, latencies, quiet)
                await _busy_segment(st, mode, spinner, spinner_port, idle, busy)
    for mode in MODES:
        ms = [x * 1000 for x in latencies[mode]]
        table.add(
            BENCH,
            f"{mode}: wake, request to first byte (ms)",
            p50=round(percentile(ms, 50), 2),
            p99=round(percentile(ms, 99), 2),
            max=round(max(ms), 2),
            wakes=len(ms),
        )
    for mode in MODES:
        table.add(
            BENCH,
            f"{mode}: app CPU per idle minute (s)",
            sleeptalker=round(sum(quiet[mode]) / len(quiet[mode]), 4),
            busy_loop=round(sum(busy[mode]) / len(busy[mode]), 4),
            note="throttle floor 10m = 0.6 s/min at most" if mode == "throttle" else "",
        )
    table.add(
        BENCH,
        "without freeze-proxy: app CPU per idle minute (s)",
        sleeptalker=round(awake_quiet, 4),
        busy_loop=round(awake_busy, 4),
    )


async def _segment(
    st: Stack,
    mode: str,
    pod: Pod,
    port: int,
    wakes: int,
    idle: float,
    latencies: dict[str, list[float]],
    quiet: dict[str, list[float]],
) -> None:
    args = ("--grace=0", f"--mode={mode}")
    async with st.proxy(pod, port, *args, python=proxy_python()) as proxy:
        await _paused(proxy)
        quiet[mode].append(await _idle_rate(pod, idle))
        for _ in range(wakes):
            await _paused(proxy)
            latencies[mode].append(await _first_byte(proxy.url))


async def _busy_segment(
    st: Stack, mode: str, pod: Pod, port: int, idle: float, busy: dict[str, list[float]]
) -> None:
    """The busy-loop app behind a proxy with nothing to serve: paused once, then measured."""
    async with st.proxy(pod, port, "--grace=0", f"--mode={mode}", python=proxy_python()) as proxy:
        await _paused(proxy)
        busy[mode].append(await _idle_rate(pod, idle))
