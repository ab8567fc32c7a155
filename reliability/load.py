"""Load: many keep-alive connections through one proxy; many pods frozen and woken on one daemon.

Raw HTTP/1.1 over asyncio streams on the client side, so "1,000 connections" means exactly 1,000
sockets, each kept alive for all of its requests (a client library's pool could share them).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp

from bench.common import proxy_python
from freeze_proxy.openfiles import raise_open_files_limit
from testbed.pods import Pod, ticker
from testbed.stack import Stack

from . import procstat
from .soak import CONTAINER, soak_image, soak_pod
from .stats import percentile

BATCH = 10  # pods created and removed at once, as in bench/capacity.py


@dataclass
class ConnResult:
    connections: int
    requests_each: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)  # each connection's first request
    proxy_fds_peak: int = 0
    proxy_fds_before: int = 0
    proxy_fds_after: int = 0
    wall_s: float = 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _connection(
    host: str, port: int, idx: int, n: int, start: asyncio.Event, res: ConnResult
) -> None:
    rng = random.Random(idx)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    except (OSError, TimeoutError) as exc:
        res.errors.append(f"connect: {exc!r}")
        return
    try:
        await start.wait()  # every connection open before the first request
        for k in range(n):
            rid = f"c{idx}-{k}"
            req = (
                f"POST /unary HTTP/1.1\r\nHost: soak\r\nX-Soak-Id: {rid}\r\n"
                "Content-Length: 2\r\n\r\nhi"
            )
            t = time.perf_counter()
            try:
                writer.write(req.encode())
                status, body = await asyncio.wait_for(_read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                res.errors.append(f"{rid}: {exc!r}")
                return
            ms = (time.perf_counter() - t) * 1000
            (res.first_ms if k == 0 else res.latencies_ms).append(ms)
            if status == 200 and body == rid.encode():
                res.ok += 1
            else:
                res.errors.append(f"{rid}: {status} {body[:100]!r}")
            await asyncio.sleep(rng.uniform(0, 0.2))
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, TimeoutError):
            pass


async def connections(st: Stack, conns: int, requests_each: int) -> ConnResult:
    """``conns`` keep-alive connections opened to one proxy in front of a frozen pod, then all
    sending at once (the first request of each wakes the app), ``requests_each`` in turn."""
    raise_open_files_limit(conns * 4 + 1024)  # children inherit it: the proxy too
    soak_image(st)
    pod, app_port = await soak_pod(st, "load-conns")
    res = ConnResult(conns, requests_each)
    try:
        async with st.proxy(
            pod,
            app_port,
            f"--state-file={st.work / 'load-may-be-frozen'}",
            "--log-level=warning",
            python=proxy_python(),
        ) as proxy:
            await pod.wait_frozen(CONTAINER)
            pid = proxy.proc.pid
            res.proxy_fds_before = procstat.fd_count(pid)
            host, port = proxy.url.removeprefix("http://").split(":")
            start = asyncio.Event()
            tasks = [
                asyncio.ensure_future(_connection(host, int(port), i, requests_each, start, res))
                for i in range(conns)
            ]

            async def peak() -> None:
                while True:
                    res.proxy_fds_peak = max(res.proxy_fds_peak, procstat.fd_count(pid))
                    await asyncio.sleep(0.2)

            watcher = asyncio.ensure_future(peak())
            await asyncio.sleep(0.5)  # connections open (a frozen app needs none of them)
            t = time.perf_counter()
            start.set()
            await asyncio.gather(*tasks)
            res.wall_s = time.perf_counter() - t
            watcher.cancel()
            await pod.wait_frozen(CONTAINER)  # idle again: the pool is closed across a freeze
            res.proxy_fds_after = procstat.fd_count(pid)
    finally:
        await pod.remove()
    return res


@dataclass
class PodsResult:
    pods: int
    seconds: float
    create_s: float = 0.0
    thaw_ms: list[float] = field(default_factory=list)
    freeze_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused_429: int = 0
    state_mismatches: int = 0


async def _create_pods(st: Stack, count: int) -> list[Pod]:
    pods: list[Pod] = []
    for first in range(0, count, BATCH):
        pods += await asyncio.gather(
            *(
                st.client.create_pod([ticker()], name=f"load-{i}", namespace="load")
                for i in range(first, min(count, first + BATCH))
            )
        )
    return pods


async def pods_at_random(
    st: Stack, count: int, seconds: float, workers: int, seed: int
) -> PodsResult:
    """``count`` busybox pods on the stack's one daemon; ``workers`` clients pick pods at random
    for ``seconds`` and freeze a thawed one or thaw a frozen one (the thaw is a wake)."""
    res = PodsResult(count, seconds)
    t = time.perf_counter()
    pods = await _create_pods(st, count)
    res.create_s = time.perf_counter() - t
    try:
        tokens = [st.token_file(p).read_text() for p in pods]
        frozen = [False] * count
        busy = [False] * count
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    i = rng.randrange(count)
                    if busy[i]:
                        await asyncio.sleep(0)
                        continue
                    busy[i] = True
                    op = "thaw" if frozen[i] else "freeze"
                    t0 = time.perf_counter()
                    try:
                        async with session.post(
                            f"{st.daemon_url}/{op}",
                            headers={"Token": tokens[i]},
                            timeout=aiohttp.ClientTimeout(total=30),
                        ) as r:
                            body = await r.read()
                        ms = (time.perf_counter() - t0) * 1000
                        if r.status == 200:
                            frozen[i] = op == "freeze"
                            (res.thaw_ms if op == "thaw" else res.freeze_ms).append(ms)
                        elif r.status == 429:
                            res.refused_429 += 1
                        else:
                            res.errors.append(f"{op} {pods[i].name}: {r.status} {body[:200]!r}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        res.errors.append(f"{op} {pods[i].name}: {exc!r}")
                    finally:
                        busy[i] = False

            await asyncio.gather(*(worker() for _ in range(workers)))
            for i, p in enumerate(pods):
                state = p.freezer_state(CONTAINER)
                if (state == "FROZEN") != frozen[i]:
                    res.state_mismatches += 1
                    res.errors.append(f"{p.name}: kernel says {state}, daemon answered {frozen[i]}")
            # Thaw what is left frozen through the daemon, as the proxies would.
            for i in [i for i in range(count) if frozen[i]]:
                async with session.post(f"{st.daemon_url}/thaw", headers={"Token": tokens[i]}) as r:
                    body = await r.read()
                    if r.status != 200:
                        res.errors.append(f"final thaw {pods[i].name}: {r.status} {body[:200]!r}")
    finally:
        for first in range(0, len(pods), BATCH):
            await asyncio.gather(*(p.remove() for p in pods[first : first + BATCH]))
    return res


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(max(values), 2) if values else float("nan"),
    }
