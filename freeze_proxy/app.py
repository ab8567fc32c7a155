"""Wires the gate, the forwarder and the daemon client into the running proxy.

The gate decides; this module carries its decisions out: it runs pause/resume calls as tasks,
keeps the single idle timer, parks requests that must wait for a resume and releases (or refuses)
them, and handles start-up (pause only once the app accepts connections) and SIGTERM (resume,
stop accepting, drain).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from freeze_proxy.backlog import read_queued_connections
from freeze_proxy.daemon_client import DaemonError, FreezeClient, HttpDaemonClient, TokenFile
from freeze_proxy.forward import Forwarder, error_response, make_session
from freeze_proxy.gate import AppState, Decision, Gate
from freeze_proxy.marker import FrozenMarker

log = logging.getLogger("freeze_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Settings:
    listen: str = "0.0.0.0:9999"
    health_listen: str = "0.0.0.0:9998"
    upstream: str = "http://127.0.0.1:8080"
    daemon_url: str = "http://127.0.0.1:9696"
    token_file: str = "/var/run/projected/token"
    state_file: str = "/var/run/freeze-proxy/may-be-frozen"
    containers: list[str] = field(default_factory=list)
    grace: float = 0.0
    resume_timeout: float = 5.0
    drain_timeout: float = 20.0
    freeze: bool = True  # False: a plain proxy (benchmarks, and a kill switch)
    # While frozen, resume the app when this many connections wait in its accept queue (TCP
    # probes of a frozen app pile up there; see freeze_proxy/backlog.py); 0 = never.
    wake_backlog: int = 4


@dataclass
class Counters:
    pauses: int = 0
    resumes: int = 0
    pause_failures: int = 0
    resume_failures: int = 0
    refused: int = 0
    backlog_wakes: int = 0


class _Wakeup:
    """One resume's outcome, awaited by every request parked behind it."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.ok = False


class FreezeProxy:
    """Carries out the gate's decisions around every forwarded request."""

    def __init__(
        self,
        gate: Gate,
        forward: Handler,
        client: FreezeClient,
        resume_timeout: float,
        marker: FrozenMarker,
    ) -> None:
        self.gate = gate
        self._marker = marker
        self.counters = Counters()
        self._forward = forward
        self._client = client
        self._resume_timeout = resume_timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._wakeup: _Wakeup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _arrive(self) -> _Wakeup | None:
        """Count one more piece of work in flight; pair it with ``_depart()`` in a ``finally``.

        None: the app is awake, go ahead. Otherwise wait on the returned wakeup; its ``ok``
        then says whether the resume worked.
        """
        decision = self.gate.arrive(self._loop.time())
        wakeup = None
        if not self.gate.may_forward:
            wakeup = self._wakeup = self._wakeup or _Wakeup()
        self._apply(decision)
        return wakeup

    def _depart(self) -> None:
        self._apply(self.gate.depart(self._loop.time()))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wakeup = self._arrive()
        try:
            if wakeup is not None:
                await wakeup.event.wait()
                if not wakeup.ok:
                    self.counters.refused += 1
                    return error_response(
                        503,
                        "the app could not be resumed, so the request was not forwarded; "
                        "check that the freeze-daemon on this node is running and accepts this "
                        "pod's token (see the freeze-proxy and freeze-daemon logs)",
                        cause="resume-failed",
                    )
            return await self._forward(request)
        finally:
            self._depart()

    async def wake_for_backlog(
        self, queued: Callable[[], Awaitable[int | None]], settle: float = 1.0
    ) -> bool:
        """Resume the frozen app, like a request would, until it has accepted the connections
        waiting in its accept queue (at most ``settle`` s); then it idles as after a request
        (grace, pause). False when the resume failed."""
        wakeup = self._arrive()
        try:
            if wakeup is not None:
                await wakeup.event.wait()
                if not wakeup.ok:
                    return False
            self.counters.backlog_wakes += 1
            for _ in range(max(1, round(settle / 0.01))):  # a netlink query: nothing to await
                if not await queued():
                    break
                await asyncio.sleep(0.01)
            return True
        finally:
            self._depart()

    # -- carrying out decisions -------------------------------------------------------------

    def _apply(self, d: Decision) -> None:
        if d.release or d.fail:
            wakeup, self._wakeup = self._wakeup, None
            if wakeup is not None:
                wakeup.ok = d.release
                wakeup.event.set()
        if d.timer_at is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(d.timer_at, self._on_timer)
        if d.pause:
            self._spawn(self._pause())
        if d.resume:
            self._spawn(self._resume())

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.gate.timer(self._loop.time()))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self) -> None:
        started = time.perf_counter()
        try:
            self._marker.set()
        except OSError as exc:
            self.counters.pause_failures += 1
            log.error(
                "cannot write the frozen marker, so the app is not paused (a crash would leave "
                "it frozen unknown to us); check the freeze-proxy-state volume",
                extra={"path": self._marker.path, "err": str(exc)},
            )
            self._apply(self.gate.pause_done(False, self._loop.time()))
            return
        try:
            await self._client.pause()
            ok = True
            self.counters.pauses += 1
            log.info("app paused", extra={"took_ms": _ms_since(started)})
        except DaemonError as exc:
            ok = False
            self.counters.pause_failures += 1
            log.warning(
                "pause failed; the app stays awake and it is retried", extra={"err": str(exc)}
            )
        self._apply(self.gate.pause_done(ok, self._loop.time()))

    async def _resume(self) -> None:
        started = time.perf_counter()
        try:
            await self._client.resume(self._resume_timeout)
            self._marker.clear()
            ok = True
            self.counters.resumes += 1
            log.info("app resumed", extra={"took_ms": _ms_since(started)})
        except DaemonError as exc:
            ok = False
            self.counters.resume_failures += 1
            log.error("resume failed; waiting requests get 503", extra={"err": str(exc)})
        self._apply(self.gate.resume_done(ok, self._loop.time()))

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """The app accepts connections: an idle app may now be paused."""
        self._apply(self.gate.start(self._loop.time()))

    async def stop(self) -> None:
        """Resume the app if frozen and wait for pending calls; it is never paused again."""
        self._apply(self.gate.stop())
        if self._timer is not None:
            self._timer.cancel()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.gate.state is not AppState.AWAKE:
            log.error(
                "the app may still be frozen at shutdown", extra={"state": self.gate.state.value}
            )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def upstream_address(upstream: str) -> tuple[str, int]:
    """The app's host and port, from ``--upstream``."""
    parts = urlsplit(upstream)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


async def wait_for_app(upstream: str, poll: float = 0.05) -> None:
    """Return once the app accepts TCP connections (never freeze an app that is starting)."""
    host, port = upstream_address(upstream)
    last_log = 0.0
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError as exc:
            now = time.monotonic()
            if now - last_log > 10:
                log.info(
                    "waiting for the app to accept connections",
                    extra={"upstream": upstream, "err": str(exc)},
                )
                last_log = now
            await asyncio.sleep(poll)


async def watch_backlog(
    proxy: FreezeProxy, port: int, threshold: int, interval: float = 1.0
) -> None:
    """While the app is frozen, resume it whenever ``threshold`` connections wait to be
    accepted on ``port`` (see freeze_proxy/backlog.py). Runs until cancelled."""

    async def queued() -> int | None:
        return read_queued_connections(port)  # ~35 µs, no I/O wait (see backlog.py)

    while True:
        await asyncio.sleep(interval)
        if proxy.gate.state is not AppState.FROZEN:
            continue
        try:
            waiting = await queued()
            if waiting is None or waiting < threshold or proxy.gate.state is not AppState.FROZEN:
                continue
            log.info(
                "connections are waiting at the frozen app's port (TCP probes): resuming it to "
                "accept them",
                extra={"port": port, "queued": waiting},
            )
            await proxy.wake_for_backlog(queued)
        except Exception:  # never let the watcher die (it runs beside the token refresh)
            log.exception("checking the app's accept queue failed", extra={"port": port})


def health_app(proxy: FreezeProxy | None, stopping: asyncio.Event) -> web.Application:
    """``GET /healthz`` on its own port, so it never shadows a path of the app."""

    async def healthz(_: web.Request) -> web.Response:
        body: dict[str, object] = {"status": "stopping" if stopping.is_set() else "ok"}
        if proxy is not None:
            body.update(
                state=proxy.gate.state.value,
                in_flight=proxy.gate.in_flight,
                **vars(proxy.counters),
            )
        return web.json_response(body, status=503 if stopping.is_set() else 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    session = make_session()
    forwarder = Forwarder(session, settings.upstream)
    proxy: FreezeProxy | None = None
    handler: Handler = forwarder
    token = TokenFile(settings.token_file)
    if settings.freeze:
        client = HttpDaemonClient(session, settings.daemon_url, token, settings.containers)
        marker = FrozenMarker(settings.state_file)
        left_frozen = marker.may_be_frozen()
        if left_frozen:
            log.info(
                "the app may have been left frozen (by an earlier instance, or no state dir to "
                "tell): the first request resumes it",
                extra={"state_file": settings.state_file, "state_dir_usable": marker.usable},
            )
        gate = Gate(settings.grace, may_be_frozen=left_frozen)
        proxy = FreezeProxy(gate, forwarder, client, settings.resume_timeout, marker)
        handler = proxy.handle

    # A low-level server: every path goes to one handler, so no router or middleware runs.
    server = web.Server(handler, access_log=None, max_field_size=16384)  # type: ignore[arg-type]
    stopping = asyncio.Event()
    runner = web.ServerRunner(server, shutdown_timeout=settings.drain_timeout)
    health = web.AppRunner(health_app(proxy, stopping), access_log=None)
    await runner.setup()
    await health.setup()
    await web.TCPSite(runner, *_host_port(settings.listen), reuse_address=True).start()
    await web.TCPSite(health, *_host_port(settings.health_listen), reuse_address=True).start()
    log.info(
        "listening",
        extra={
            "listen": settings.listen,
            "upstream": settings.upstream,
            "daemon_url": settings.daemon_url if settings.freeze else None,
            "grace_s": settings.grace,
            "containers": settings.containers or "all",
        },
    )

    async def arm() -> None:
        await wait_for_app(settings.upstream)
        log.info("the app accepts connections", extra={"upstream": settings.upstream})
        await token.wait_ready()
        assert proxy is not None
        proxy.start()
        if settings.wake_backlog > 0:
            _, port = upstream_address(settings.upstream)
            await asyncio.gather(
                token.keep_fresh(), watch_backlog(proxy, port, settings.wake_backlog)
            )
        else:
            await token.keep_fresh()

    armer = asyncio.ensure_future(arm()) if proxy is not None else None
    try:
        await stop.wait()
    finally:
        log.info("shutting down: resuming the app, then draining")
        stopping.set()
        if armer is not None:
            armer.cancel()
        if proxy is not None:
            await proxy.stop()
        await forwarder.close_websockets()
        await runner.cleanup()  # stops accepting, waits for in-flight requests (drain_timeout)
        await health.cleanup()
        await session.close()
        log.info("stopped")
