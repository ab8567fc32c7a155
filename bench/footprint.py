"""Row 5: memory of freeze-proxy (idle and under load) and freeze-daemon; start-up time."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Table, bench_app, free_port, freeze_proxy_cmd, process, wrk
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


def import_time_ms(module: str) -> float:
    """Wall time of a fresh interpreter importing the program's entry module."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 1)


def run(table: Table, quick: bool = False) -> None:
    app_port, proxy_port = free_port(), free_port()
    with (
        process(bench_app(app_port), app_port),
        process(freeze_proxy_cmd(proxy_port, app_port, "--no-freeze"), proxy_port) as proxy,
    ):
        time.sleep(0.3)
        table.add(
            "footprint", "freeze-proxy idle", **memory_mib(proxy.pid), note="target RSS <= 25 MiB"
        )
        wrk(f"http://127.0.0.1:{proxy_port}/big", 32, 1 if quick else 5, threads=2)
        table.add_row("footprint", "freeze-proxy after load (c=32)", memory_mib(proxy.pid))
    daemon_port = free_port()
    jwks = write_jwks(Path(tempfile.mkdtemp(prefix="freeze-bench-")) / "jwks.json", new_rsa_key())
    with process(
        [
            sys.executable,
            "-m",
            "daemon",
            f"--listen=127.0.0.1:{daemon_port}",
            "--no-token-review",
            f"--jwks-file={jwks}",
            "--issuer=https://bench.invalid",
            "--containerd-socket=/nonexistent.sock",
            "--log-level=warning",
        ],
        daemon_port,
    ) as daemon:
        time.sleep(0.3)
        table.add_row("footprint", "freeze-daemon idle", memory_mib(daemon.pid))
    for program, module in (
        ("freeze-proxy", "freeze_proxy.app"),
        ("freeze-daemon", "daemon.api"),
        ("freeze-webhook", "webhook.app"),
    ):
        table.add("footprint", f"{program} import", ms=import_time_ms(module))
