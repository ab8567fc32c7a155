#!/usr/bin/env python3
"""sleeptalker: a tiny aiohttp app for watching a container being frozen and thawed.

* A background task prints ``tick <n> <UTC time>`` every ``TICK_INTERVAL`` seconds (default 0.5)
  to stdout, one flushed line each, ``n`` counting up from 1. While the container is frozen no
  ticks appear; the gap in the timestamps (and the counter, which does *not* jump) shows how long.
* Every request, on any path and method, streams ``Hello, this request will take two seconds..``
  at once, sleeps 2 s (``?sleep=SECONDS`` changes that, e.g. ``?sleep=0`` or ``?sleep=0.05``;
  anything else → 400), then sends ``.. world.`` — a request that spans a freeze is visible.
* One ``request ...`` line per request on stdout (method, path, status, duration).
* Listens on ``$HOST`` (default 0.0.0.0) : ``$PORT`` (default 8080).
* SIGTERM/SIGINT: stop listening, cancel in-flight requests, exit 0 — promptly.

Standalone (``python3 app.py``); works with aiohttp 3.8 (Debian bookworm's python3-aiohttp)
through 3.14, so it uses only APIs both have.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from datetime import UTC, datetime

from aiohttp import web

DEFAULT_SLEEP = 2.0
MAX_SLEEP = 3600.0
FIRST_LINE = b"Hello, this request will take two seconds..\n"
LAST_LINE = b".. world.\n"


def utc_now() -> str:
    """``2026-11-27T23:01:02.345Z``"""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def log(line: str) -> None:
    print(line, flush=True)


async def ticker(interval: float) -> None:
    """Print a numbered tick every ``interval`` s, on a fixed schedule (no drift)."""
    next_at = time.monotonic()
    n = 0
    while True:
        n += 1
        log(f"tick {n} {utc_now()}")
        next_at += interval
        delay = next_at - time.monotonic()
        if delay < -interval:
            # Far behind schedule (the process was frozen): restart the schedule from now
            # instead of printing a burst of catch-up ticks.
            next_at = time.monotonic()
        await asyncio.sleep(max(delay, 0.0))


def parse_sleep(raw: str | None) -> float:
    """The ``sleep`` query parameter in seconds; ``ValueError`` with a message if invalid."""
    if raw is None:
        return DEFAULT_SLEEP
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_SLEEP):
        raise ValueError(
            f"invalid sleep parameter {raw!r}: expected a number of seconds "
            f"between 0 and {MAX_SLEEP:g}, e.g. ?sleep=0.05"
        )
    return value


class App:
    def __init__(self) -> None:
        self.in_flight: set[asyncio.Task[object]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            try:
                seconds = parse_sleep(request.query.get("sleep"))
            except ValueError as exc:
                status = 400
                return web.Response(status=400, text=f"{exc}\n")
            resp = web.StreamResponse(status=200)
            resp.content_type = "text/plain"
            resp.charset = "utf-8"
            resp.headers["X-Sleep-Seconds"] = f"{seconds:g}"
            # When the request reached us, on the node's monotonic clock (containers share it):
            # lets a client on the node time a wake up to the moment the app has the request.
            resp.headers["X-Received-At"] = f"{started:.6f}"
            await resp.prepare(request)
            await resp.write(FIRST_LINE)  # write() drains: the line is on the wire now
            await asyncio.sleep(seconds)
            await resp.write(LAST_LINE)
            await resp.write_eof()
            status = 200
            return resp
        except asyncio.CancelledError:
            status = 499  # client went away, or we are shutting down
            raise
        finally:
            if task is not None:
                self.in_flight.discard(task)
            log(
                f"request {request.method} {request.path_qs} {status} "
                f"{time.monotonic() - started:.3f}s {utc_now()}"
            )

    async def cancel_in_flight(self, grace: float = 1.0) -> None:
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = float(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


async def serve(host: str, port: int, tick_interval: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    app_state = App()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_state.handle)
    # access_log=None: our own one-line log per request replaces aiohttp's.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log(f"sleeptalker listening on http://{host}:{port} tick={tick_interval:g}s pid={os.getpid()}")

    tick_task = asyncio.ensure_future(ticker(tick_interval))
    try:
        await stop.wait()
        log(f"sleeptalker stopping {utc_now()}")
    finally:
        tick_task.cancel()
        # Cancel requests ourselves: aiohttp 3.8 cancels them in cleanup() anyway, but newer
        # versions wait up to 60 s for them to finish — not "promptly".
        await app_state.cancel_in_flight()
        try:
            await asyncio.wait_for(runner.cleanup(), timeout=3.0)
        except TimeoutError:
            log("sleeptalker: cleanup timed out")
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
    log("sleeptalker stopped")


def main() -> int:
    try:
        host = os.environ.get("HOST") or "0.0.0.0"
        port = int(os.environ.get("PORT") or "8080")
        tick_interval = env_float("TICK_INTERVAL", 0.5)
    except ValueError as exc:
        print(f"sleeptalker: bad configuration: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(host, port, tick_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
