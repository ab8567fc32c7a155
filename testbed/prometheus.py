"""A real Prometheus (Debian's ``prometheus`` package) scraping our programs' ``/metrics``.

Its own config, TSDB directory and port in a temporary directory, a 1 s scrape interval; the
process and the directory are gone after the ``with``. Queried through its HTTP API, as a
dashboard or an alert rule would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.processes import free_port, stop, wait_listening

BINARY = "/usr/bin/prometheus"


def missing() -> str | None:
    """Why a real Prometheus cannot run here (None: it can)."""
    if shutil.which(BINARY) is None:
        return f"{BINARY} not found: apt-get install prometheus (make setup does)"
    return None


@dataclass
class Prometheus:
    url: str
    work: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result vector (each: ``metric`` labels, ``value`` [t, "v"])."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, None while it has no sample yet."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise RuntimeError(f"{expr!r} has {len(result)} series; expected one: {result}")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as r:
            active: list[dict[str, Any]] = json.load(r)["data"]["activeTargets"]
        return active

    async def wait_value(self, expr: str, want: float, within: float = 30.0) -> float:
        """Wait (bounded) until ``expr`` equals ``want``; the error names the last value and
        the targets' health."""
        deadline = time.monotonic() + within
        while True:
            last = await asyncio.to_thread(self.value, expr)
            if last == want:
                return last
            if time.monotonic() > deadline:
                targets = [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    for t in await asyncio.to_thread(self.targets)
                ]
                raise AssertionError(
                    f"{expr} = {last}, not {want}, within {within:g} s; targets: {targets}"
                )
            await asyncio.sleep(0.2)  # Prometheus scrapes every second: nothing to await


def config(jobs: Mapping[str, Sequence[str]], interval: str = "1s") -> str:
    """prometheus.yml with one static job per name (targets ``host:port``, path /metrics).
    JSON is YAML, so no YAML writer is needed."""
    return json.dumps(
        {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": list(targets)}]}
                for name, targets in jobs.items()
            ],
        },
        indent=2,
    )


@contextlib.contextmanager
def prometheus(jobs: Mapping[str, Sequence[str]], interval: str = "1s") -> Iterator[Prometheus]:
    """Prometheus scraping ``jobs`` (name -> ``host:port`` targets) until the ``with`` ends."""
    why = missing()
    if why:
        raise RuntimeError(why)
    work = Path(tempfile.mkdtemp(prefix="freeze-prometheus-"))
    try:
        (work / "prometheus.yml").write_text(config(jobs, interval))
        port = free_port()
        log_file = work / "prometheus.log"
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(
                [
                    BINARY,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.format=json",
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            wait_listening(proc, "127.0.0.1", port, "prometheus", log_file)
            yield Prometheus(f"http://127.0.0.1:{port}", work)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
