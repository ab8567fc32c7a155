"""The app behind the proxies in the overhead benchmark: fixed small and 64 KiB bodies."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from aiohttp import web

SMALL = b"x" * 64
BIG = b"y" * 65536


async def small(_: web.Request) -> web.Response:
    return web.Response(body=SMALL)


async def big(_: web.Request) -> web.Response:
    return web.Response(body=BIG)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/big", big)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=loop_factory(),
    )


if __name__ == "__main__":
    main()
