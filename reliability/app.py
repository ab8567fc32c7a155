#!/usr/bin/env python3
"""The soak's app, run in the pod's user-container (Debian's python3 + aiohttp 3.8).

Its log on stdout is the arrival record the invariant checker trusts, taken inside the
container on CLOCK_MONOTONIC (the node's: containers share it):

* ``arrive <id> <ns>`` as the first thing a handler does, ``<id>`` from the ``X-Soak-Id`` header;
* ``tick <ns>`` every ``TICK_S`` seconds, so a container that runs when it should be frozen
  shows it even with no request.

Routes: ``POST /unary`` answers its id; ``GET /stream?chunks=N&gap=S`` streams ``<id> <k>``
lines; ``GET /ws`` echoes websocket text messages; anything else answers ``ok`` (readiness).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from aiohttp import WSMsgType, web

TICK_S = float(os.environ.get("TICK_S", "0.02"))


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def arrived(request: web.Request) -> str:
    t = time.monotonic_ns()
    rid = request.headers.get("X-Soak-Id", "-")
    log(f"arrive {rid} {t}")
    return rid


async def unary(request: web.Request) -> web.Response:
    rid = arrived(request)
    await request.read()
    return web.Response(text=rid, headers={"X-Soak-Id": rid})


async def stream(request: web.Request) -> web.StreamResponse:
    rid = arrived(request)
    chunks = int(request.query.get("chunks", "3"))
    gap = float(request.query.get("gap", "0.05"))
    resp = web.StreamResponse(headers={"X-Soak-Id": rid})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for k in range(chunks):
        if k:
            await asyncio.sleep(gap)
        await resp.write(f"{rid} {k}\n".encode())
    await resp.write_eof()
    return resp


async def ws(request: web.Request) -> web.WebSocketResponse:
    arrived(request)
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str(msg.data)
    return sock


async def ready(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def ticker() -> None:
    while True:
        log(f"tick {time.monotonic_ns()}")
        await asyncio.sleep(TICK_S)


async def main() -> None:
    app = web.Application()
    app.router.add_post("/unary", unary)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])).start()
    log(f"soak app listening pid={os.getpid()}")
    await ticker()


if __name__ == "__main__":
    asyncio.run(main())
