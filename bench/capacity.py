"""Row 3: daemon capacity — one freeze-daemon, many pods, pause/resume calls arriving together.

One daemon serves every pod of a node; with many scale-to-zero apps, wakes and freezes of
different pods overlap. This measures how many pause/resume calls per second the daemon (and
the one containerd behind it) completes, and what each call costs, at several concurrencies,
with the containerd backend (Tasks API) and the cgroup backend (the freezer written directly).
The concurrency levels and the backends take turns round by round, so they share the noise.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.common import Table, percentile
from testbed.containerd import missing_prerequisites
from testbed.pods import Pod, ticker
from testbed.stack import Stack, stack

BENCH = "capacity"
CONTAINER = "user-container"
LEVELS = (1, 10, 50)
BATCH = 10  # pods created (and removed) at once: like a node starting many pods


@dataclass
class Level:
    """What one concurrency level measured, summed over the rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    took_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    asyncio.run(_run(table, pods=5 if quick else 50, rounds=2 if quick else 10))


async def _create_pods(st: Stack, count: int) -> list[Pod]:
    pods: list[Pod] = []
    for first in range(0, count, BATCH):
        pods += await asyncio.gather(
            *(
                st.client.create_pod([ticker()], name=f"cap-{i}")
                for i in range(first, min(count, first + BATCH))
            )
        )
    return pods


async def _remove_pods(pods: Sequence[Pod]) -> None:
    for first in range(0, len(pods), BATCH):
        await asyncio.gather(*(p.remove() for p in pods[first : first + BATCH]))


async def _call(session: aiohttp.ClientSession, url: str, token: str, level: Level) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, headers={"Token": token}) as r:
            body = await r.read()
        level.latencies_ms.append((time.perf_counter() - started) * 1000)
        if r.status == 200:
            level.took_ms.append(float(json.loads(body)["took_ms"]))
        else:
            level.errors += 1
    except aiohttp.ClientError:
        level.errors += 1


async def _pass(
    session: aiohttp.ClientSession,
    daemon_url: str,
    targets: Sequence[tuple[Pod, str]],
    concurrency: int,
    level: Level,
) -> None:
    """Every pod frozen then thawed once, by ``concurrency`` clients each owning some pods.

    Each pod belongs to one client, so two calls for one pod never overlap (the daemon would
    serialize them per pod anyway); the calls of different pods do.
    """

    async def client(mine: Sequence[tuple[Pod, str]]) -> None:
        for _pod, token in mine:
            await _call(session, f"{daemon_url}/freeze", token, level)
            await _call(session, f"{daemon_url}/thaw", token, level)

    started = time.perf_counter()
    await asyncio.gather(*(client(targets[i::concurrency]) for i in range(concurrency)))
    level.wall_s += time.perf_counter() - started


async def _run(table: Table, pods: int, rounds: int) -> None:
    levels = sorted({min(c, pods) for c in LEVELS})
    results: dict[tuple[str, int], Level] = defaultdict(Level)
    async with stack(daemon_args=["--freeze-rate=0"]) as st:  # cycles faster than a pod would
        started = time.perf_counter()
        created = await _create_pods(st, pods)
        create_s = time.perf_counter() - started
        try:
            targets = [(p, st.token_file(p).read_text()) for p in created]
            connector = aiohttp.TCPConnector(limit=0)
            cgroup_args = (
                "--freeze-rate=0",
                "--runtime=cgroup",
                f"--cri-socket={st.containerd.socket}",
            )
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                st.extra_daemon(*cgroup_args) as (cgroup_url, _),
            ):
                # Both backends on the same pods, taking turns: every pass ends with every pod
                # thawed by the backend that froze it, so the two never mix on one container.
                daemons = {"containerd": st.daemon_url, "cgroup": cgroup_url}
                # One untimed pass each: the daemons' key and container-id caches are warm, as
                # they are on a node that has been up for a while.
                for url in daemons.values():
                    await _pass(session, url, targets, max(levels), Level())
                for _ in range(rounds):
                    for c in levels:
                        for backend, url in daemons.items():
                            await _pass(session, url, targets, c, results[backend, c])
            thawed = sum(p.freezer_state(CONTAINER) == "THAWED" for p in created)
        finally:
            await _remove_pods(created)
    table.add(
        BENCH,
        f"{pods} busybox pods created",
        seconds=round(create_s, 2),
        batch=BATCH,
        thawed_at_end=f"{thawed}/{pods}",
    )
    for c in levels:
        for backend in ("containerd", "cgroup"):
            r = results[backend, c]
            ops = len(r.latencies_ms)
            table.add(
                BENCH,
                f"{backend}: {pods} pods, concurrency {c}",
                ops_per_s=round(ops / r.wall_s, 1) if r.wall_s else 0.0,
                p50_ms=round(percentile(r.latencies_ms, 50), 2),
                p99_ms=round(percentile(r.latencies_ms, 99), 2),
                took_p50_ms=round(percentile(r.took_ms, 50), 2),
                ops=ops,
                errors=r.errors,
                note="" if c > 1 else "one call at a time: the per-call cost without contention",
            )
