"""The freeze record: an HTTP relay between the proxy and the real daemon, timing every call.

The daemon's and the proxy's logs carry wall-clock times (milliseconds, and the clock may be
slewed); the invariant needs the node's monotonic clock, as the app's log has it. So the proxy is
pointed at this relay (``--daemon-url``), which notes ``time.monotonic_ns()`` when a call reaches
it (after the proxy sent it) and when the daemon's answer is back (before the proxy has it) —
the order the soundness argument in ``reliability.invariants`` needs.
"""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from testbed.processes import free_port

from .invariants import FREEZE, THAW, Call

_OPS = {"/freeze": FREEZE, "/thaw": THAW}


class Recorder:
    def __init__(self, daemon_url: str) -> None:
        self.daemon_url = daemon_url
        self.calls: list[Call] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.Response:
        start = time.monotonic_ns()
        assert self._session is not None
        op = _OPS.get(request.path)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("token", "content-type")
        }
        try:
            async with self._session.request(
                request.method,
                f"{self.daemon_url}{request.path_qs}",
                headers=headers,
                data=await request.read(),
            ) as r:
                body = await r.read()
                status = r.status
                ctype = r.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if op is not None:
                self.calls.append(Call(op, start, time.monotonic_ns(), 0))
            # No answer, as the proxy would have seen without us (an error answer would tell it
            # "nothing frozen", which the daemon may not have kept to).
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502, text=f"recorder: no answer from the daemon: {exc}")
        if op is not None:
            self.calls.append(Call(op, start, time.monotonic_ns(), status))
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})
