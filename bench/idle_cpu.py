"""Row 6, the point: what an idle app costs without freeze-proxy and with it; and row 6b,
density: many frozen pods on one node, each probed as Knative and the kubelet probe it.

An idle Knative app that is not scaled to zero still runs its timers, GC and background work.
Frozen, it should use no CPU at all; the proxy that froze it has a cost of its own, so it is
reported beside the app. The two phases alternate (without, with, without, with) so a noisy
neighbour hits both alike; rates are per idle minute.

Density: ``DENSITY_PODS`` idle sleeptalker pods on one node, each probed every
``PROBE_PERIOD`` seconds — what a quiet node with many scaled-up-but-idle revisions sees: first
without freeze-proxy (the probes at the apps), then each pod frozen behind its own proxy (the
probes re-aimed as the webhook does: queue-proxy's readiness ``/ready/tcp/PORT``, kubelet's
tcpSocket and httpGet liveness ``/probe/...``). Reported: node CPU per idle minute (apps +
proxies + daemon + containerd and shims), the proxies' share per pod, the wakes the probes
caused, and memory per pod (the app's cgroup, the proxy's RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Table, before_tree, proxy_python
from bench.footprint import memory_mib
from freeze_proxy import contract
from testbed.containerd import missing_prerequisites, shim_pids
from testbed.pods import Pod
from testbed.stack import Stack, stack

BENCH = "idle_cpu"
CONTAINER = "user-container"
DENSITY_PODS = 50
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


def _probe(url: str) -> bool:
    """One probe as kubelet sends it: a new connection, closed after the answer; ``tcp://``
    URLs are tcpSocket probes (connect, close)."""
    if url.startswith("tcp://"):
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
            status: int = r.status
            return 200 <= status < 400
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Density:
    """One variant of the density row, measured over the same idle window length."""

    label: str
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU seconds
    probes: int = 0
    failed: int = 0
    wakes: int = 0
    memory_mib: dict[str, float] = field(default_factory=dict)  # per pod


def _node_cpu(st: Stack, pods: list[Pod], proxies: list[int]) -> dict[str, float]:
    """CPU seconds so far: the apps (cgroup), the proxies, the daemon, containerd and shims."""
    assert st.containerd.proc is not None and st.daemon_proc is not None
    return {
        "apps": sum(p.cpu_usage_seconds(CONTAINER) for p in pods),
        "proxies": sum(process_cpu_seconds(pid) for pid in proxies),
        "daemon": process_cpu_seconds(st.daemon_proc.pid),
        "containerd": process_cpu_seconds(st.containerd.proc.pid)
        + sum(process_cpu_seconds(pid) for pid in shim_pids(st.containerd.socket)),
    }


def _app_memory_mib(pod: Pod) -> float:
    usage = pod.cgroup_dir(CONTAINER, "memory") / "memory.usage_in_bytes"
    return int(usage.read_text()) / 2**20


async def _idle_window(
    st: Stack, pods: list[Pod], proxies: list[int], urls: list[str], seconds: float, d: Density
) -> None:
    """``seconds`` idle, each URL probed every PROBE_PERIOD s; CPU per process group."""
    before = _node_cpu(st, pods, proxies)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        tick = time.monotonic()
        results = await asyncio.gather(*(asyncio.to_thread(_probe, u) for u in urls))
        d.probes += len(results)
        d.failed += results.count(False)
        await asyncio.sleep(max(0.0, PROBE_PERIOD - (time.monotonic() - tick)))
    d.seconds = time.monotonic() - started
    after = _node_cpu(st, pods, proxies)
    d.cpu = {k: after[k] - before[k] for k in before}


async def _frozen_variant(
    st: Stack,
    chains: list[tuple[Pod, int]],
    seconds: float,
    label: str,
    tree: Path | None = None,
) -> Density:
    """Every pod behind a freeze-proxy (the code in ``tree`` if given), frozen; the probes
    re-aimed as the webhook does (queue-proxy's /ready/tcp, kubelet's tcpSocket + httpGet
    liveness at /probe/...)."""
    d = Density(label)
    python = proxy_python() if tree is None else proxy_python(root=tree)
    async with contextlib.AsyncExitStack() as proxies:
        started = []
        for pod, app_port in chains:
            proxy = await proxies.enter_async_context(
                st.proxy(pod, app_port, "--grace=0", python=python, cwd=tree)
            )
            started.append((pod, app_port, proxy))
        urls: list[str] = []
        for pod, app_port, proxy in started:
            base = proxy.health_url.removesuffix(contract.HEALTH_PATH)
            paths = [
                contract.probe_path(contract.PROBE_TCP, app_port, whole_path=True),
                contract.probe_path(contract.PROBE_TCP, app_port, whole_path=False),
                contract.probe_path(
                    contract.PROBE_HTTP, app_port, "/healthz?sleep=0", whole_path=False
                ),
            ]
            await pod.wait_frozen(CONTAINER)
            for path in paths:  # a first result each (wakes the app at most once per probe)
                await asyncio.to_thread(_probe, base + path)
            urls += [base + path for path in paths]
        for pod, _, _ in started:
            await pod.wait_frozen(CONTAINER)
        resumes0 = [int(str(_get(p.health_url)[1]["resumes"])) for _, _, p in started]
        pids = [proxy.proc.pid for _, _, proxy in started]
        await _idle_window(st, [c[0] for c in chains], pids, urls, seconds, d)
        resumes1 = [int(str(_get(p.health_url)[1]["resumes"])) for _, _, p in started]
        d.wakes = sum(resumes1) - sum(resumes0)
        frozen = sum(pod.freezer_state(CONTAINER) == "FROZEN" for pod, _ in chains)
        if frozen != len(chains):
            raise RuntimeError(f"{label}: {frozen}/{len(chains)} pods frozen after the window")
        d.memory_mib = {
            "app": sum(_app_memory_mib(p) for p, _ in chains) / len(chains),
            "proxy_rss": sum(memory_mib(pid)["rss_mib"] for pid in pids) / len(pids),
        }
    return d


async def _density(table: Table, pods: int, seconds: float) -> None:
    """``pods`` idle sleeptalker pods on one node, probed as kubelet would: without freeze-proxy
    (probes at the apps) and frozen behind freeze-proxy (probes at the proxies' re-aimed paths;
    with ``--before``, also behind that ref's proxy), one after the other on the same pods."""
    async with stack() as st:
        st.sleeptalker_image()
        chains = [await st.sleeptalker_pod(name=f"dense-{i}") for i in range(pods)]
        variants: list[Density] = []
        plain = Density("without freeze-proxy")
        urls = [
            u
            for _, port in chains
            for u in (f"tcp://127.0.0.1:{port}", f"http://127.0.0.1:{port}/healthz?sleep=0")
        ]
        await _idle_window(st, [c[0] for c in chains], [], urls, seconds, plain)
        plain.memory_mib = {"app": sum(_app_memory_mib(p) for p, _ in chains) / len(chains)}
        variants.append(plain)
        variants.append(await _frozen_variant(st, chains, seconds, "frozen, freeze-proxy"))
        before_ref = os.environ.get("BENCH_BEFORE_REF")
        if before_ref:
            with before_tree(before_ref) as tree:
                label = f"frozen, freeze-proxy @{before_ref}"
                variants.append(await _frozen_variant(st, chains, seconds, label, tree))
    for d in variants:
        per_min = {k: v * 60 / d.seconds for k, v in d.cpu.items()}
        table.add(
            BENCH,
            f"density: {pods} idle pods, {d.label}",
            node_cpu_s_per_min=round(sum(per_min.values()), 4),
            **{f"{k}_cpu_s_per_min": round(v, 4) for k, v in per_min.items()},
            proxy_cpu_s_per_pod_per_min=round(per_min.get("proxies", 0.0) / pods, 5),
            probe_wakes_per_pod_per_hour=round(d.wakes * 3600 / d.seconds / pods, 2),
            probes=d.probes,
            failed=d.failed,
            **{f"{k}_mib_per_pod": round(v, 1) for k, v in d.memory_mib.items()},
            seconds=round(d.seconds, 1),
            note="probed every 10 s: tcpSocket + httpGet (and queue-proxy's /ready when frozen)",
        )
