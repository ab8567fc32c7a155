"""``make reliability``: the soak, the load runs and the fault/fuzz tests' figures in one table.

``--minutes`` (default 10) sets the soak's length; the seed is printed so a failing schedule is
replayed with ``--seed``. Exits 1 when an invariant was violated or a request was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, Table, machine
from testbed.containerd import missing_prerequisites
from testbed.stack import stack

from .load import connections, pods_at_random, summary_ms
from .soak import SoakResult, run_soak

BENCH = "reliab"
REPO = Path(__file__).resolve().parent.parent


def _mib(kib: int) -> float:
    return round(kib / 1024, 2)


def report_soak(table: Table, r: SoakResult) -> None:
    kinds: dict[str, int] = {}
    for s in r.sent:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    table.add(
        BENCH,
        f"soak {r.seconds / 60:.1f} min, seed {r.seed}",
        episodes=r.episodes,
        requests=r.requests,
        ws_messages=kinds.get("ws-message", 0),
        aborted=sum(1 for s in r.sent if s.aborted),
        lost=r.lost,
        violations=len(r.violations),
        note=", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    )
    table.add(
        BENCH,
        "soak: freezes (recorded at the daemon)",
        pauses=r.pauses,
        resumes=r.resumes,
        arrivals_logged=r.arrivals,
        note="pauses and resumes alternate; the proxy's own counters agree",
    )
    for name, d in r.drift.items():
        table.add(
            BENCH,
            f"soak: {name} RSS / fds drift after warm-up",
            rss_mib=_mib(d.rss_kib),
            fds=d.fds,
            rss_max_mib=_mib(d.rss_max_kib),
            fds_max=d.fds_max,
            samples=d.samples,
        )
    for v in r.violations[:20]:
        print(f"  VIOLATION {v.kind}: {v.detail}", flush=True)


def run_tests(examples: int) -> dict[str, dict[str, Any]]:
    """``pytest -m "faults or fuzz"`` with figure files collected from FREEZE_RELIABILITY_OUT."""
    out = Path(tempfile.mkdtemp(prefix="freeze-reliability-"))
    env = {
        **os.environ,
        "FREEZE_RELIABILITY_OUT": str(out),
        "FREEZE_FUZZ_EXAMPLES": str(examples),
        "FREEZE_FLOOD_SECONDS": os.environ.get("FREEZE_FLOOD_SECONDS", "30"),  # the 30 s
    }
    rc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "faults or fuzz", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        check=False,
    ).returncode
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    for p in out.glob("*.json"):
        p.unlink()
    out.rmdir()
    figures["_pytest"] = {"exit": rc, "note": "5: no fault/fuzz tests collected"}
    return figures


def report_figures(table: Table, figures: dict[str, dict[str, Any]]) -> None:
    for name, fields in figures.items():
        values = {k: v for k, v in fields.items() if isinstance(v, int | float | str)}
        table.add_row(BENCH, name.lstrip("_"), values)


async def _main(args: argparse.Namespace, table: Table) -> list[str]:
    failures: list[str] = []
    async with stack() as st:
        print(f"== soak: {args.minutes} min, seed {args.seed}", flush=True)
        r = await run_soak(st, args.minutes * 60, args.seed, sample_every=args.sample_every)
        report_soak(table, r)
        if r.violations:
            failures.append(f"soak: {len(r.violations)} violations (seed {args.seed})")
        print(f"== {args.connections} keep-alive connections through one proxy", flush=True)
        c = await connections(st, args.connections, args.requests_each)
        table.add(
            BENCH,
            f"{c.connections} keep-alive conns, one proxy",
            requests=c.connections * c.requests_each,
            ok=c.ok,
            errors=len(c.errors),
            **{f"wake_{k}": v for k, v in summary_ms(c.first_ms).items()},
            **summary_ms(c.latencies_ms),
            proxy_fds_before=c.proxy_fds_before,
            proxy_fds_peak=c.proxy_fds_peak,
            proxy_fds_after=c.proxy_fds_after,
            note="all open, then all send at once to the frozen app (wake_*), then in turn",
        )
        for e in c.errors[:10]:
            print(f"  ERROR {e}", flush=True)
        if c.errors:
            failures.append(f"{len(c.errors)} errors on {c.connections} connections")
    async with stack() as st:
        print(f"== {args.pods} pods frozen and woken at random on one daemon", flush=True)
        workers = max(1, min(args.workers, args.pods // 2))  # fewer clients than pods: no spinning
        p = await pods_at_random(st, args.pods, args.pod_seconds, workers, args.seed)
        table.add(
            BENCH,
            f"{p.pods} pods, one daemon, {workers} clients",
            wakes=len(p.thaw_ms),
            freezes=len(p.freeze_ms),
            **{f"wake_{k}": v for k, v in summary_ms(p.thaw_ms).items()},
            errors=len(p.errors),
            refused_429=p.refused_429,
            state_mismatches=p.state_mismatches,
            note=f"pods created in {p.create_s:.0f} s; wake = the daemon's POST /thaw round trip",
        )
        for e in p.errors[:10]:
            print(f"  ERROR {e}", flush=True)
        if p.errors:
            failures.append(f"{len(p.errors)} errors on {p.pods} pods")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description="freeze-proxy soak and load (README: Reliability)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak length")
    p.add_argument("--seed", type=int, default=None, help="the schedule's seed (default random)")
    p.add_argument("--sample-every", type=float, default=10.0, help="RSS/fd sampling, seconds")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--requests-each", type=int, default=5)
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--pod-seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--no-tests", action="store_true", help="skip pytest -m 'faults or fuzz'")
    p.add_argument("--fuzz-examples", type=int, default=2000)
    p.add_argument("--out", default=str(OUT_DIR / "reliability.json"))
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    why = missing_prerequisites()
    if why:
        sys.exit(f"reliability needs a real containerd: {why}")
    table = Table()
    failures = asyncio.run(_main(args, table))
    if not args.no_tests:
        print("== pytest -m 'faults or fuzz'", flush=True)
        report_figures(table, run_tests(args.fuzz_examples))
    print()
    print(table.render())
    meta = machine() | {"seed": args.seed, "minutes": args.minutes, "failures": failures}
    table.write_json(Path(args.out), meta)
    print(f"\nwritten to {args.out}")
    if failures:
        print("FAILED: " + "; ".join(failures), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
