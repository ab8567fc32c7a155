"""Row 1: the hop's cost with the app awake: direct vs freeze-proxy vs Go's httputil proxy."""

from __future__ import annotations

import contextlib
import os

from bench.common import (
    Table,
    WrkResult,
    before_env,
    before_tree,
    bench_app,
    freeze_proxy_cmd,
    go_proxy_binary,
    process,
    proxy_python,
    wrk,
)
from testbed.processes import free_port


def run(table: Table, quick: bool = False) -> None:
    """Interleave the variants over rounds so machine noise hits all of them alike.

    ``freeze-proxy`` runs as its image ships it (stdlib event loop, no OpenSSL loaded);
    ``freeze-proxy+uvloop`` with the `fast` extra, the trade-off the image declines.

    With ``BENCH_BEFORE_REF`` set (``make bench ARGS="--before REF"``) the proxy as of that git
    ref runs beside the current one: an optimisation's before/after in the same run.
    """
    seconds, rounds = (1.0, 1) if quick else (5.0, 3)
    app_port, ours_port, fast_port, go_port = (free_port() for _ in range(4))
    go = go_proxy_binary()
    ports = {
        "direct": app_port,
        "freeze-proxy": ours_port,
        "freeze-proxy+uvloop": fast_port,
        "go-httputil": go_port,
    }
    before_ref = os.environ.get("BENCH_BEFORE_REF")
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(bench_app(app_port), app_port))
        for port, fast in ((ours_port, False), (fast_port, True)):
            cmd = freeze_proxy_cmd(port, app_port, "--no-freeze", python=proxy_python(fast))
            stack.enter_context(process(cmd, port))
        stack.enter_context(
            process(
                [str(go), f"-listen=127.0.0.1:{go_port}", f"-upstream=http://127.0.0.1:{app_port}"],
                go_port,
            )
        )
        if before_ref:
            port = ports[f"freeze-proxy@{before_ref}"] = free_port()
            tree = stack.enter_context(before_tree(before_ref))
            cmd = freeze_proxy_cmd(port, app_port, "--no-freeze", python=proxy_python(root=tree))
            stack.enter_context(process(cmd, port, env=before_env(tree), cwd=tree))
        variants = list(ports)
        for path, body in (("/small", "64B"), ("/big", "64KiB")):
            for conns in (1, 32):
                results: dict[str, list[WrkResult]] = {v: [] for v in variants}
                for _ in range(rounds):
                    for variant in variants:
                        url = f"http://127.0.0.1:{ports[variant]}{path}"
                        results[variant].append(wrk(url, conns, seconds, threads=2))
                best = {v: _median(rs) for v, rs in results.items()}
                for variant in variants:
                    r = best[variant]
                    table.add(
                        "overhead",
                        f"{body} c={conns} {variant}",
                        rps=round(r.rps),
                        p50_ms=r.p50_ms,
                        p99_ms=r.p99_ms,
                    )
                base = best["direct"]
                ours, go_ = best["freeze-proxy"], best["go-httputil"]
                added_ours = max(ours.p50_ms - base.p50_ms, 1e-6)
                added_go = max(go_.p50_ms - base.p50_ms, 1e-6)
                table.add(
                    "overhead",
                    f"{body} c={conns} ours/go",
                    added_p50_ratio=round(added_ours / added_go, 2),
                    rps_ratio=round(ours.rps / go_.rps, 2),
                    note="targets: added p50 at c=1 <= 1.25x Go's; rps at c=32 >= 0.75x Go's",
                )


def _median(results: list[WrkResult]) -> WrkResult:
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]
