"""Row 5: memory of freeze-proxy (idle and under load) and freeze-daemon; start-up time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Table, process, proxy_python, wrk
from testbed.containerd import missing_prerequisites
from testbed.processes import free_port
from testbed.stack import stack
from testbed.tokens import new_rsa_key, write_jwks


def memory_mib(pid: int) -> dict[str, float]:
    """RSS beside PSS/USS: RSS counts shared library pages that pods of one image share."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    rollup: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            rollup[key] = int(parts[0]) / 1024
    uss = rollup.get("Private_Clean", 0.0) + rollup.get("Private_Dirty", 0.0)
    return {
        "rss_mib": round(rss, 1),
        "pss_mib": round(rollup.get("Pss", 0.0), 1),
        "uss_mib": round(uss, 1),
    }


def import_time_ms(module: str, python: str = sys.executable) -> float:
    """Wall time of a fresh interpreter importing the program's entry module."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([python, "-c", f"import {module}"], check=True)
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 1)


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add("footprint", "freeze-proxy", result=f"skipped: {why}")
    else:
        asyncio.run(_proxy_rows(table, 1 if quick else 5))
    _daemon_row(table)
    _import_rows(table)


async def _proxy_rows(table: Table, load_seconds: float) -> None:
    """The proxy as in a pod (an interpreter with only what its image has, see
    ``proxy_python``): freezing a real app on containerd, idle (app frozen), then after load at
    c=32; as the image ships it, and with the `fast` extra."""
    async with stack() as st:
        st.sleeptalker_image()
        pod, app_port = await st.sleeptalker_pod(name="footprint")
        for fast, label in ((False, ""), (True, ", with uvloop ([fast] extra)")):
            async with st.proxy(pod, app_port, python=proxy_python(fast)) as proxy:
                await pod.wait_frozen("user-container")
                await asyncio.sleep(0.5)
                pid = proxy.proc.pid
                note = "target RSS <= 25 MiB" if not fast else "uvloop loads OpenSSL"
                table.add(
                    "footprint",
                    f"freeze-proxy idle, app frozen{label}",
                    **memory_mib(pid),
                    note=note,
                )
                await asyncio.to_thread(wrk, f"{proxy.url}/?sleep=0", 32, load_seconds, 2)
                table.add_row(
                    "footprint", f"freeze-proxy after load (c=32){label}", memory_mib(pid)
                )


def _daemon_row(table: Table) -> None:
    daemon_port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="freeze-bench-") as keys,
        process(
            [
                sys.executable,
                "-m",
                "daemon",
                f"--listen=127.0.0.1:{daemon_port}",
                "--no-token-review",
                f"--jwks-file={write_jwks(Path(keys) / 'jwks.json', new_rsa_key())}",
                "--issuer=https://bench.invalid",
                "--containerd-socket=/nonexistent.sock",
                "--log-level=warning",
            ],
            daemon_port,
        ) as daemon,
    ):
        time.sleep(0.3)
        table.add_row("footprint", "freeze-daemon idle", memory_mib(daemon.pid))


def _import_rows(table: Table) -> None:
    for program, module, python in (
        ("freeze-proxy", "freeze_proxy.__main__", proxy_python()),  # as its image runs it
        ("freeze-daemon", "daemon.api", sys.executable),
        ("freeze-webhook", "webhook.app", sys.executable),
    ):
        table.add("footprint", f"{program} import", ms=import_time_ms(module, python))
