"""Rows 3 and the idle-grace row: what freezing costs when requests keep coming.

On real containerd (testbed.stack), sleeptalker answering ``?sleep=0``:
* back-to-back: one wrk client for a fixed time through freeze-proxy with freezing disabled,
  grace 0, and several graces: req/s, p50/p99, pause+resume cycles;
* paced arrivals at 1, 10 and 100 req/s: cycles per 1000 requests and the latency they add;
* the cost of one pause+resume cycle: CPU burnt by containerd, its shims and freeze-daemon.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp

from bench.common import Table, percentile, proxy_python, wrk
from testbed.containerd import shim_pids
from testbed.stack import Proxy, Stack, stack

GRACES = ("0", "10ms", "50ms", "250ms", "1s")
RATES = (1, 10, 100)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (children not included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


async def _cycles(proxy: Proxy) -> int:
    health = await proxy.health()
    return int(health["pauses"]) + int(health["resumes"])


async def back_to_back(table: Table, st: Stack, app_port: int, seconds: float) -> None:
    pod = st.client.pods[-1]
    variants: list[tuple[str, list[str]]] = [("freezing disabled", ["--no-freeze"])]
    variants += [(f"grace {g}", [f"--grace={g}"]) for g in GRACES]
    base_rps = 0.0
    for name, flags in variants:
        async with st.proxy(pod, app_port, *flags, python=proxy_python()) as proxy:
            await asyncio.sleep(0.3)  # let grace-0 proxies settle into the frozen state
            before = await _cycles(proxy) if "--no-freeze" not in flags else 0
            r = await asyncio.to_thread(wrk, f"{proxy.url}/?sleep=0", 1, seconds)
            cycles = (await _cycles(proxy) - before) if "--no-freeze" not in flags else 0
        if not base_rps:
            base_rps = r.rps
        table.add(
            "grace",
            f"back-to-back c=1, {name}",
            rps=round(r.rps),
            p50_ms=r.p50_ms,
            p99_ms=r.p99_ms,
            vs_disabled=round(r.rps / base_rps, 2),
            cycles=cycles // 2,
        )


async def paced(table: Table, st: Stack, app_port: int, quick: bool) -> None:
    """Requests at a fixed rate; each measured from send to full response."""
    pod = st.client.pods[-1]
    counts = {1: 2, 10: 5, 100: 20} if quick else {1: 20, 10: 200, 100: 1000}
    for rate in RATES:
        baseline: list[float] = []
        for name, flags in [("disabled", ["--no-freeze"])] + [
            (f"grace {g}", [f"--grace={g}"]) for g in GRACES
        ]:
            async with st.proxy(pod, app_port, *flags, python=proxy_python()) as proxy:
                await asyncio.sleep(0.3)
                before = await _cycles(proxy) if name != "disabled" else 0
                latencies = await _paced_run(proxy.url, rate, counts[rate])
                cycles = (await _cycles(proxy) - before) if name != "disabled" else 0
            if name == "disabled":
                baseline = latencies
            n = len(latencies)
            table.add(
                "churn",
                f"{rate}/s, {name}",
                p50_ms=round(percentile(latencies, 50), 2),
                p99_ms=round(percentile(latencies, 99), 2),
                added_p50_ms=round(percentile(latencies, 50) - percentile(baseline, 50), 2),
                cycles_per_1000=round(cycles / 2 * 1000 / n),
            )


async def _paced_run(url: str, rate: float, count: int) -> list[float]:
    interval = 1 / rate
    latencies: list[float] = []
    async with aiohttp.ClientSession() as s:
        start = time.perf_counter()
        for i in range(count):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            async with s.get(f"{url}/?sleep=0") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}")
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


async def cycle_cost(table: Table, st: Stack, app_port: int, cycles: int) -> None:
    """CPU burnt on the node per pause+resume: containerd + shims + freeze-daemon."""
    pod = st.client.pods[-1]
    token = st.token_file(pod).read_text()
    assert st.containerd.proc is not None
    daemon_pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _is_our_daemon(p, st.daemon_port)
    ]
    pids = [st.containerd.proc.pid, *shim_pids(st.containerd.socket), *daemon_pids]
    async with aiohttp.ClientSession(headers={"Token": token}) as s:
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        for _ in range(cycles):
            for action in ("freeze", "thaw"):
                async with s.post(f"{st.daemon_url}/{action}?container=user-container") as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{action} answered {r.status}")
        cpu, wall = cpu_seconds(pids) - cpu0, time.perf_counter() - t0
    table.add(
        "grace",
        "one pause+resume cycle (node cost)",
        cpu_ms=round(cpu / cycles * 1000, 2),
        wall_ms=round(wall / cycles * 1000, 2),
        note="CPU of containerd + shim + freeze-daemon per cycle",
    )
    idle = pod.cpu_usage_seconds("user-container")
    await asyncio.sleep(2)
    idle_rate = (pod.cpu_usage_seconds("user-container") - idle) / 2
    table.add(
        "grace",
        "sleeptalker awake and idle (app cost)",
        cpu_ms_per_s=round(idle_rate * 1000, 3),
        break_even_idle_s=round(cpu / cycles / max(idle_rate, 1e-9), 1),
        note="an idle period shorter than break-even costs more CPU frozen than awake",
    )


def _is_our_daemon(proc_dir: Path, port: int) -> bool:
    try:
        cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"daemon" in cmdline and f"--listen=127.0.0.1:{port}".encode() in cmdline


async def _run(table: Table, quick: bool) -> None:
    async with stack(daemon_args=["--freeze-rate=0"]) as st:  # cycles faster than a pod would
        st.sleeptalker_image()
        _, app_port = await st.sleeptalker_pod(tick=0.5)
        await cycle_cost(table, st, app_port, 10 if quick else 100)
        await back_to_back(table, st, app_port, 1 if quick else 30)
        await paced(table, st, app_port, quick)


def run(table: Table, quick: bool = False) -> None:
    asyncio.run(_run(table, quick))
