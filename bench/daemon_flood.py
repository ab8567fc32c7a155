"""Row: a pod's wake while another pod floods the node daemon (issue #11, item 5).

Every pod of a node can reach freeze-daemon's hostPort, and behind hostPort's SNAT they all
arrive from one address. This row times what matters under attack: a good-token thaw of a
frozen pod on real containerd (a new connection per wake, as after an idle keep-alive closed),
side by side

- quiet;
- during a flood of bad tokens (junk and validly shaped tokens signed by a stranger's key) from
  the same address, over 16 keep-alive connections, as fast as the daemon answers;
- the same flood with the refusal limiter off (``--refusal-rate=0``): every bad token verified;
- during a flood of held connections: twice ``--max-connections``, half idle, half trickling a
  request head, each reopened as soon as the daemon closes it.

The flood runs in its own process (``python -m bench.daemon_flood tokens|held ...``), so it
competes with the daemon for the CPU as an attacking pod would, not with the timing client.
Freezes are not rate-limited here (``--freeze-rate=0``): the row freezes and thaws one pod
hundreds of times a minute on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Table, percentile
from testbed import tokens
from testbed.containerd import missing_prerequisites
from testbed.pods import Pod, ticker
from testbed.stack import program, stack

BENCH = "daemon_flood"
MAX_CONNECTIONS = 256  # the daemons' --max-connections here (default 1024): a quicker fill
DAEMON_ARGS = ["--freeze-rate=0", f"--max-connections={MAX_CONNECTIONS}"]


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    asyncio.run(_run(table, rounds=15 if quick else 150))


async def _run(table: Table, rounds: int) -> None:
    async with stack(daemon_args=DAEMON_ARGS) as st:
        pod = await st.client.create_pod([ticker()], name="woken", namespace="bench")
        token = Path(st.token_file(pod)).read_text()
        async with st.extra_daemon(*DAEMON_ARGS, "--refusal-rate=0") as (unlimited_url, _):
            scenarios: list[tuple[str, str, list[str]]] = [
                ("quiet", st.daemon_url, []),
                ("bad-token flood", st.daemon_url, ["tokens", st.daemon_url]),
                ("bad-token flood, no limiter", unlimited_url, ["tokens", unlimited_url]),
                (
                    f"held-connection flood ({2 * MAX_CONNECTIONS})",
                    st.daemon_url,
                    ["held", st.daemon_url, str(2 * MAX_CONNECTIONS)],
                ),
            ]
            for name, url, flood in scenarios:
                retries = [0]
                async with _flood(st.work, flood) as counts:
                    wakes = await _wakes(url, token, pod, rounds, retries)
                values: dict[str, float | int | str] = {
                    "p50_ms": round(percentile(wakes, 50), 2),
                    "p99_ms": round(percentile(wakes, 99), 2),
                    "max_ms": round(max(wakes), 2),
                    "wakes": len(wakes),
                    "retried": retries[0],
                }
                note = ""
                if counts:
                    seconds = counts.pop("seconds", 1) or 1
                    total = sum(v for k, v in counts.items() if k.isdigit())
                    if total:
                        values["flood_per_s"] = round(total / seconds)
                    note = "flood answers: " + ", ".join(f"{k}: {v}" for k, v in counts.items())
                table.add(BENCH, name, note=note, **values)


async def _wakes(url: str, token: str, pod: Pod, rounds: int, retries: list[int]) -> list[float]:
    """Freeze (untimed), then time a thaw with the pod's good token; a new connection each.
    A call whose connection is closed is retried like the proxy retries a resume (counted)."""
    headers = {"Token": token}
    out: list[float] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(rounds):
            await _post(http, f"{url}/freeze", headers, retries)
            await pod.wait_frozen("user-container")
            await asyncio.sleep(0.02)
            started = time.perf_counter()
            await _post(http, f"{url}/thaw", headers, retries)
            out.append((time.perf_counter() - started) * 1000)
    return out


async def _post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], retries: list[int]
) -> None:
    for attempt in range(50):
        try:
            async with http.post(url, headers=headers) as r:
                body = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}: {body}")
            return
        except aiohttp.ClientError:
            retries[0] += 1
            await asyncio.sleep(min(0.01 * 2**attempt, 0.5))
    raise RuntimeError(f"{url} failed 50 times")


@contextlib.asynccontextmanager
async def _flood(work: Path, args: list[str]) -> AsyncIterator[dict[str, Any]]:
    """Run a flood child for the block; yields its counts (filled in when it has stopped)."""
    counts: dict[str, Any] = {}
    if not args:
        yield counts
        return
    out = work / f"flood-{uuid.uuid4().hex[:6]}.json"
    async with program(["bench.daemon_flood", *args, str(out)], work / "flood.log") as proc:
        await asyncio.sleep(1.0)  # let it reach full speed
        if proc.poll() is not None:
            raise RuntimeError(
                f"the flood exited early: {(work / 'flood.log').read_text()[-2000:]}"
            )
        yield counts
    with contextlib.suppress(OSError, ValueError):
        counts.update(json.loads(out.read_text()))


# --------------------------------------------------------------------------- the flood child


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _bad_tokens(url: str, counts: Counter[str], stop: asyncio.Event) -> None:
    host, port = url.removeprefix("http://").split(":")
    stranger = tokens.new_rsa_key()
    forged = [
        tokens.mint_token(stranger, pod_uid=str(uuid.uuid4()), pod_name="x", namespace="x")
        for _ in range(64)
    ]
    junk = ["junk", "a.b.c", *forged]

    async def one(i: int) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                counts["connect_error"] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                n = i
                while not stop.is_set():
                    n += 1
                    token = junk[n % len(junk)]
                    writer.write(
                        f"POST /freeze HTTP/1.1\r\nHost: x\r\nToken: {token}\r\n"
                        "Content-Length: 0\r\n\r\n".encode()
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    counts[head.split()[1].decode()] += 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counts["closed"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(16)))


async def _held(url: str, n: int, counts: Counter[str], stop: asyncio.Event) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def one(i: int) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                counts["connect_error"] += 1
                await asyncio.sleep(0.05)
                continue
            counts["opened"] += 1
            try:
                if i % 2:
                    writer.write(b"POST /thaw HTTP/1.1\r\nHost: x\r\n")
                while not stop.is_set():
                    if i % 2:
                        writer.write(b"X")
                    try:
                        if not await asyncio.wait_for(reader.read(1024), 1.0):
                            break  # closed by the daemon
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                counts["closed_by_daemon"] += 0 if stop.is_set() else 1
                writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))


async def _child(kind: str, url: str, rest: list[str]) -> None:
    out = Path(rest[-1])
    _raise_nofile()
    counts: Counter[str] = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    started = time.monotonic()
    if kind == "tokens":
        work = asyncio.ensure_future(_bad_tokens(url, counts, stop))
    else:
        work = asyncio.ensure_future(_held(url, int(rest[0]), counts, stop))
    await stop.wait()
    await asyncio.wait([work], timeout=3)
    work.cancel()
    out.write_text(json.dumps({**counts, "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
