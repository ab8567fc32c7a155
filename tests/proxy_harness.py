"""A real proxy in front of a real aiohttp app, with a recording stand-in for the node daemon.

The stand-in models the one thing the proxy must respect: while it says "frozen", the app must
not receive a request. The app records every request that arrives while frozen as a violation.
The real daemon and containerd are exercised by the end-to-end tests; this harness isolates the
proxy's ordering rules so they can be provoked precisely (slow or failing daemon calls).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from freeze_proxy.app import Settings, serve
from testbed.processes import free_port


@dataclass
class DaemonStub:
    frozen: bool = False
    events: list[tuple[str, float, str]] = field(default_factory=list)  # (action, time, token)
    delay: float = 0.0
    fail_thaw: int = 0  # answer 502 to this many thaw calls
    fail_freeze: bool = False
    down: bool = False
    queries: list[str] = field(default_factory=list)  # each call's query string, in order

    def count(self, action: str) -> int:
        return sum(1 for e in self.events if e[0] == action)

    async def handle(self, request: web.Request) -> web.Response:
        action = request.path.strip("/")
        token = request.headers.get("Token", "")
        if self.delay:
            await asyncio.sleep(self.delay)
        if action == "thaw" and self.fail_thaw:
            self.fail_thaw -= 1
            return web.json_response({"error": "runtime failed"}, status=502)
        if action == "freeze" and self.fail_freeze:
            return web.json_response({"error": "runtime failed"}, status=502)
        self.events.append((action, time.monotonic(), token))
        self.queries.append(request.query_string)
        self.frozen = action == "freeze"
        return web.json_response({"state": "frozen" if self.frozen else "thawed"})


@dataclass
class AppStub:
    daemon: DaemonStub
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # the proxy's port of each request's connection
    violations: list[str] = field(default_factory=list)

    def _check(self, request: web.Request) -> None:
        if self.daemon.frozen:
            self.violations.append(request.path_qs)
        self.seen.append((request.raw_path, dict(request.headers)))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer[1] if peer else 0)

    async def hello(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.Response(text="hello")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(f"chunk {i}\n".encode())
            await asyncio.sleep(float(request.query.get("every", "0.05")))
            if self.daemon.frozen:
                self.violations.append("frozen while streaming")
        await resp.write_eof()
        return resp

    async def echo(self, request: web.Request) -> web.StreamResponse:
        """Echo the body: small ones whole (with their length), big ones streamed back."""
        self._check(request)
        if request.content_length is not None and request.content_length <= 1 << 20:
            body = await request.read()
            return web.Response(body=body, headers={"X-Length": str(len(body))})
        resp = web.StreamResponse()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self._check(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if self.daemon.frozen:
                    self.violations.append("frozen during websocket")
                await ws.send_str("echo:" + msg.data)
        return ws

    async def code(self, request: web.Request) -> web.Response:
        """Answer with the status the path names, after ``?sleep=`` seconds (a probe target:
        the app must stay awake until it has answered)."""
        self._check(request)
        await asyncio.sleep(float(request.query.get("sleep", "0")))
        if self.daemon.frozen:
            self.violations.append("frozen while answering " + request.path_qs)
        return web.Response(status=int(request.match_info["status"]), text="code")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/code/{status:[0-9]+}", self.code)
        app.router.add_get("/stream", self.stream)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.hello)
        return app


async def start_site(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@dataclass
class Harness:
    daemon: DaemonStub
    app: AppStub
    proxy_url: str
    health_url: str
    app_port: int
    token_file: Path
    stop: asyncio.Event
    task: asyncio.Task[None]
    runners: list[web.AppRunner]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        for runner in self.runners:
            await runner.cleanup()


async def start_harness(
    tmp_path: Path,
    grace: float = 0.0,
    resume_timeout: float = 1.0,
    start_app: bool = True,
    state_file: Path | None = None,
    mode: str = "freeze",
    throttle_cpu: str = "10m",
    **settings: Any,
) -> Harness:
    """The proxy's ``serve`` between stubs of the daemon and the app; ``settings`` go to
    ``Settings`` as they are (e.g. the relay's ``header_timeout``)."""
    daemon = DaemonStub()
    app = AppStub(daemon)
    daemon_port, app_port, proxy_port, health_port = (free_port() for _ in range(4))
    d = web.Application()
    d.router.add_post("/{action}", daemon.handle)
    runners = [await start_site(d, daemon_port)]
    if start_app:
        runners.append(await start_site(app.app(), app_port))
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    configured = Settings(
        listen=f"127.0.0.1:{proxy_port}",
        health_listen=f"127.0.0.1:{health_port}",
        upstream=f"http://127.0.0.1:{app_port}",
        daemon_url=f"http://127.0.0.1:{daemon_port}",
        token_file=str(token_file),
        state_file=str(state_file or tmp_path / "no-such-dir" / "may-be-frozen"),
        grace=grace,
        resume_timeout=resume_timeout,
        drain_timeout=2.0,
        mode=mode,
        throttle_cpu=throttle_cpu,
        **settings,
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(configured, stop))
    h = Harness(
        daemon,
        app,
        f"http://127.0.0.1:{proxy_port}",
        f"http://127.0.0.1:{health_port}/healthz",
        app_port,
        token_file,
        stop,
        task,
        runners,
    )
    for _ in range(500):  # until the proxy listens
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.01)
    return h
