"""Row 6, the point: what an idle app costs without freeze-proxy and with it; and row 6b,
density: many frozen pods on one node, each probed as Knative and the kubelet probe it.

An idle Knative app that is not scaled to zero still runs its timers, GC and background work.
Frozen, it should use no CPU at all; the proxy that froze it has a cost of its own, so it is
reported beside the app. The two phases alternate (without, with, without, with) so a noisy
neighbour hits both alike; rates are per idle minute.

Density: ``DENSITY_PODS`` frozen pods, each behind its own proxy, each probed every
``PROBE_PERIOD`` seconds the way the webhook re-aims the probes (queue-proxy's readiness
``/ready/tcp/PORT``, a kubelet tcpSocket and an httpGet liveness probe ``/probe/...``) — what
a quiet node with many scaled-up-but-idle revisions sees. Reported: the proxies' CPU per pod
per idle minute, and the wakes the probes caused (resumes while idle, per hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import Table, proxy_python
from freeze_proxy import contract
from testbed.containerd import missing_prerequisites
from testbed.pods import Pod
from testbed.stack import stack

BENCH = "idle_cpu"
CONTAINER = "user-container"
DENSITY_PODS = 10
PROBE_PERIOD = 10.0  # kubelet's default periodSeconds (queue-proxy's readiness probe, liveness)


@dataclass
class Phase:
    """Totals of one variant over its segments."""

    seconds: float = 0.0
    app_cpu_s: float = 0.0
    ticks: int = 0
    proxy_cpu_s: float = 0.0

    def per_minute(self, value: float) -> float:
        return value * 60 / self.seconds if self.seconds else float("nan")


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    # Per variant: 60 s as two alternating 30 s segments (quick: one 3 s segment).
    segments, seconds = (1, 3.0) if quick else (2, 30.0)
    asyncio.run(_run(table, segments, seconds))
    asyncio.run(_density(table, 2 if quick else DENSITY_PODS, 3.0 if quick else 60.0))


def _ticks(pod: Pod) -> int:
    return sum(1 for line in pod.log_lines(CONTAINER) if line.startswith("tick"))


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, in ns resolution (/proc/PID/task/*/schedstat).

    /proc/PID/stat counts in 10 ms clock ticks: too coarse for a process that is idle by design.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


async def _measure(pod: Pod, seconds: float, phase: Phase, proxy_pid: int | None) -> None:
    cpu0, ticks0 = pod.cpu_usage_seconds(CONTAINER), _ticks(pod)
    proxy0 = process_cpu_seconds(proxy_pid) if proxy_pid else 0.0
    started = time.monotonic()
    await asyncio.sleep(seconds)
    phase.seconds += time.monotonic() - started
    phase.app_cpu_s += pod.cpu_usage_seconds(CONTAINER) - cpu0
    phase.ticks += _ticks(pod) - ticks0
    if proxy_pid:
        phase.proxy_cpu_s += process_cpu_seconds(proxy_pid) - proxy0


async def _run(table: Table, segments: int, seconds: float) -> None:
    without, with_ = Phase(), Phase()
    async with stack() as st:
        st.sleeptalker_image()
        pod, app_port = await st.sleeptalker_pod(name="idle")
        await asyncio.sleep(1.0)  # past start-up: import and bind are not idle work
        for _ in range(segments):
            if pod.freezer_state(CONTAINER) != "THAWED":
                raise RuntimeError("the app is still frozen after its freeze-proxy exited")
            await _measure(pod, seconds, without, None)
            async with st.proxy(pod, app_port, "--grace=0", python=proxy_python()) as proxy:
                await pod.wait_frozen(CONTAINER)
                await _measure(pod, seconds, with_, proxy.proc.pid)
    tick = "sleeptalker ticks every 0.5 s: 120 ticks/min awake"
    table.add(
        BENCH,
        "app idle, without freeze-proxy",
        app_cpu_s_per_min=round(without.per_minute(without.app_cpu_s), 4),
        ticks_per_min=round(without.per_minute(without.ticks), 1),
        seconds=round(without.seconds, 1),
        note=tick,
    )
    table.add(
        BENCH,
        "app idle, with freeze-proxy (frozen)",
        app_cpu_s_per_min=round(with_.per_minute(with_.app_cpu_s), 4),
        ticks_per_min=round(with_.per_minute(with_.ticks), 1),
        seconds=round(with_.seconds, 1),
    )
    table.add(
        BENCH,
        "freeze-proxy process while app frozen",
        cpu_s_per_min=round(with_.per_minute(with_.proxy_cpu_s), 4),
        note="its cost beside the app's saving (schedstat of its threads)",
    )
    saved = without.per_minute(without.app_cpu_s) - with_.per_minute(
        with_.app_cpu_s + with_.proxy_cpu_s
    )
    table.add(BENCH, "net CPU saved per idle minute", cpu_s_per_min=round(saved, 4))


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _density(table: Table, pods: int, seconds: float) -> None:
    """``pods`` frozen pods, each probed every PROBE_PERIOD s through its proxy's probe paths."""
    async with stack() as st, contextlib.AsyncExitStack() as proxies:
        st.sleeptalker_image()
        chains = []
        for i in range(pods):
            pod, app_port = await st.sleeptalker_pod(name=f"dense-{i}")
            proxy = await proxies.enter_async_context(
                st.proxy(pod, app_port, "--grace=0", python=proxy_python())
            )
            base = proxy.health_url.removesuffix(contract.HEALTH_PATH)
            paths = [
                contract.probe_path(contract.PROBE_TCP, app_port, whole_path=True),
                contract.probe_path(contract.PROBE_TCP, app_port, whole_path=False),
                contract.probe_path(
                    contract.PROBE_HTTP, app_port, "/healthz?sleep=0", whole_path=False
                ),
            ]
            chains.append((pod, proxy, [base + p for p in paths]))
        for pod, _, urls in chains:
            await pod.wait_frozen(CONTAINER)
            for url in urls:  # a first result each (wakes the app at most once per probe)
                await asyncio.to_thread(_get, url)
        for pod, _, _ in chains:
            await pod.wait_frozen(CONTAINER)
        before = [_get(proxy.health_url)[1] for _, proxy, _ in chains]
        cpu0 = [process_cpu_seconds(proxy.proc.pid) for _, proxy, _ in chains]
        started = time.monotonic()
        failed = probes = 0
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for _, _, urls in chains:
                for url in urls:
                    status, _ = await asyncio.to_thread(_get, url)
                    probes += 1
                    failed += status != 200
            await asyncio.sleep(max(0.0, PROBE_PERIOD - (time.monotonic() - tick)))
        elapsed = time.monotonic() - started
        cpu = sum(process_cpu_seconds(p.proc.pid) for _, p, _ in chains) - sum(cpu0)
        after = [_get(proxy.health_url)[1] for _, proxy, _ in chains]
        wakes = sum(
            int(str(a["resumes"])) - int(str(b["resumes"]))
            for a, b in zip(after, before, strict=True)
        )
        frozen = sum(pod.freezer_state(CONTAINER) == "FROZEN" for pod, _, _ in chains)
    table.add(
        BENCH,
        f"density: {pods} frozen pods, each probed 3x every {PROBE_PERIOD:g} s",
        proxy_cpu_s_per_pod_per_min=round(cpu * 60 / elapsed / pods, 4),
        probe_wakes_per_pod_per_hour=round(wakes * 3600 / elapsed / pods, 2),
        probes=probes,
        failed=failed,
        frozen_at_end=f"{frozen}/{pods}",
        seconds=round(elapsed, 1),
        note="queue-proxy's /ready/tcp and kubelet's tcpSocket + httpGet liveness, re-aimed",
    )
