"""``make bench``: run the benchmark rows side by side and print one table (+ JSON)."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from bench.common import OUT_DIR, Table, machine

ROWS = {
    "overhead": "bench.overhead",
    "footprint": "bench.footprint",
    "churn": "bench.churn",
    "wake": "bench.wake",
    "wake_docker": "bench.wake_docker",
    "capacity": "bench.capacity",
    "idle_cpu": "bench.idle_cpu",
    "daemon_flood": "bench.daemon_flood",
    "throttle": "bench.throttle",
}


def main() -> None:
    p = argparse.ArgumentParser(description="freeze-proxy benchmarks (see README: Performance)")
    p.add_argument("--only", action="append", choices=sorted(ROWS), help="run only these rows")
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test, not numbers")
    p.add_argument("--out", default=str(OUT_DIR / "results.json"))
    p.add_argument(
        "--before",
        metavar="GIT_REF",
        help="also run the proxy as of this ref beside the current one (before/after rows)",
    )
    args = p.parse_args()
    if args.before:
        os.environ["BENCH_BEFORE_REF"] = args.before
    table = Table()
    for name in args.only or list(ROWS):
        print(f"== {name}", flush=True)
        module = importlib.import_module(ROWS[name])
        module.run(table, quick=args.quick)
    print()
    print(table.render())
    meta = machine() | {"quick": args.quick, "rows": args.only or list(ROWS)}
    table.write_json(Path(args.out), meta)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
