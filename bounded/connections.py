"""Bounded connections for an aiohttp server that anything on the network can reach.

aiohttp alone holds a connection as long as its client likes (its keep-alive timer runs for an
hour by default and nothing bounds how slowly a request head may arrive) and accepts as many as
the process has file descriptors. Behind :class:`ConnectionGuard` every connection is tracked:

- a request head must be complete within ``header_timeout`` of its first byte;
- an idle keep-alive connection is closed after ``idle_timeout`` (aiohttp's keep-alive timer);
- an unread request body is drained for at most ``body_timeout`` after the answer;
- at ``max_connections`` a new connection evicts the oldest one that is not being answered
  (idle, or still sending its head) and is older than ``PROTECT`` (0.1 s: time to send a first
  request), so held connections cannot lock a real client out; when there is none, the new one
  is closed at once.

Shared by freeze-daemon (a hostPort every pod of the node reaches) and freeze-webhook (a Service
in the cluster); both images ship this package.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("bounded.connections")


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits (the daemon's ``--max-connections`` ... flags; the webhook's)."""

    max_connections: int = 1024
    header_timeout: float = 5.0
    idle_timeout: float = 60.0
    body_timeout: float = 5.0
    backlog: int = 1024


_IDLE, _HEAD, _BUSY = "idle", "head", "busy"


PROTECT = 0.1  # seconds a new connection cannot be evicted (it is sending its first request)


class _Conn:
    __slots__ = ("deadline", "opened", "since", "state", "timer", "transport")

    def __init__(self, transport: asyncio.Transport, now: float) -> None:
        self.transport = transport
        self.state = _IDLE
        self.opened = now
        self.since = now
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None


def _key(transport: asyncio.BaseTransport) -> object:
    """What identifies a connection: its socket, which the TLS layer's transport reports too
    (so the middleware, which sees that one, finds the raw connection the guard tracks)."""
    return transport.get_extra_info("socket") or transport


class ConnectionGuard:
    """Tracks the server's connections and enforces :class:`ServerLimits` on them."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._conns: dict[object, _Conn] = {}
        self.evicted = 0
        self.head_timeouts = 0
        self.rejected = 0
        self._next_warning = 0.0

    def __len__(self) -> int:
        return len(self._conns)

    def protocol(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        return _GuardedProtocol(inner, self)

    # -- called by the protocol wrapper -----------------------------------------------------

    def opened(self, transport: asyncio.Transport) -> bool:
        """Register a new connection; False when it must be closed at once (all busy)."""
        now = time.monotonic()
        if len(self._conns) >= self.limits.max_connections:
            # A connection gets PROTECT seconds to send its head before it may be evicted:
            # without that, a burst of reconnects accepted in one loop turn could evict a new
            # connection before its first bytes are read.
            waiting = [
                c for c in self._conns.values() if c.state != _BUSY and now - c.opened >= PROTECT
            ]
            if not waiting:
                self.rejected += 1
                self._warn("connection limit reached: every connection is busy or brand new")
                return False
            victim = min(waiting, key=lambda c: c.since)
            self.evicted += 1
            self._warn("connection limit reached: closing the oldest waiting connection")
            self._drop(victim)
        self._conns[_key(transport)] = _Conn(transport, now)
        return True

    def received(self, transport: asyncio.BaseTransport) -> None:
        conn = self._conns.get(_key(transport))
        if conn is None or conn.state != _IDLE:
            return
        now = time.monotonic()
        conn.state, conn.since = _HEAD, now
        conn.deadline = now + self.limits.header_timeout
        if conn.timer is None:
            loop = asyncio.get_running_loop()
            conn.timer = loop.call_at(loop.time() + self.limits.header_timeout, self._check, conn)

    def closed(self, transport: asyncio.BaseTransport) -> None:
        conn = self._conns.pop(_key(transport), None)
        if conn is not None and conn.timer is not None:
            conn.timer.cancel()

    # -- called by the middleware -----------------------------------------------------------

    def busy(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._conns.get(_key(transport)) if transport is not None else None
        if conn is not None:
            conn.state, conn.since = _BUSY, time.monotonic()

    def idle(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._conns.get(_key(transport)) if transport is not None else None
        if conn is not None:
            conn.state, conn.since = _IDLE, time.monotonic()

    # -- internals --------------------------------------------------------------------------

    def _check(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.state != _HEAD or _key(conn.transport) not in self._conns:
            return
        left = conn.deadline - time.monotonic()
        if left > 0:  # a later head started the clock again
            loop = asyncio.get_running_loop()
            conn.timer = loop.call_at(loop.time() + left, self._check, conn)
            return
        self.head_timeouts += 1
        self._warn("request head too slow: connection closed")
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self.closed(conn.transport)
        conn.transport.abort()

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        if now < self._next_warning:
            return
        self._next_warning = now + 10.0
        log.warning(
            msg,
            extra={
                "connections": len(self._conns),
                "max_connections": self.limits.max_connections,
                "evicted_total": self.evicted,
                "rejected_total": self.rejected,
                "head_timeouts_total": self.head_timeouts,
            },
        )

    def middleware(self) -> Any:
        """Marks a connection busy while its request is being answered."""

        @web.middleware
        async def guard(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            transport = request.transport
            self.busy(transport)
            try:
                return await handler(request)
            finally:
                self.idle(transport)

        return guard


class _Guarded(asyncio.BaseProtocol):
    """A per-connection protocol with the guard told about opens, bytes and closes."""

    def __init__(self, inner: asyncio.Protocol | asyncio.BufferedProtocol, guard: ConnectionGuard):
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        keep = self._guard.opened(transport)
        self._inner.connection_made(transport)
        if not keep:
            transport.abort()

    def _received(self) -> None:
        if self._transport is not None:
            self._guard.received(self._transport)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _GuardedProtocol(_Guarded, asyncio.Protocol):
    """aiohttp's protocol on a plain connection."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        super().__init__(inner, guard)
        self._plain = inner

    def data_received(self, data: bytes) -> None:
        self._received()
        self._plain.data_received(data)


class _CompactTLS(sslproto.SSLProtocol):
    """asyncio's TLS layer, reading 32 KiB at a time: its 256 KiB read buffer, allocated for
    every accepted connection, made a connection that never sent a byte cost 290 KiB."""

    max_size = 32 * 1024  # twice TLS's largest record


class _GuardedTLS(_Guarded, asyncio.BufferedProtocol):
    """The TLS layer under the guard: the guard sees each connection from its accept, so one
    that never finishes its handshake counts against the cap (and may be evicted), and the
    head's clock starts at its first byte (the ClientHello)."""

    def __init__(self, tls: sslproto.SSLProtocol, guard: ConnectionGuard) -> None:
        super().__init__(tls, guard)
        self._tls = tls

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._tls.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._received()
        self._tls.buffer_updated(nbytes)


def files_needed(limits: ServerLimits) -> int:
    """Descriptors a server may need: one per connection, plus its own (clients, logs)."""
    return limits.max_connections + 256


def guarded_runner(
    app: web.Application, guard: ConnectionGuard, shutdown_timeout: float
) -> web.AppRunner:
    """An aiohttp runner for ``app`` whose timers are the guard's limits (call ``setup()``)."""
    app.middlewares.insert(0, guard.middleware())
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=guard.limits.idle_timeout,
        lingering_time=guard.limits.body_timeout,
        shutdown_timeout=shutdown_timeout,
    )


async def listen(
    runner: web.AppRunner,
    guard: ConnectionGuard,
    host: str | None,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Serve the set-up ``runner`` on ``host``:``port``, every connection behind ``guard``; over
    TLS, the guard sits under the TLS layer and a handshake must end within ``header_timeout``
    (asyncio's default is 60 s)."""
    loop = asyncio.get_running_loop()
    http = runner.server
    assert http is not None, "runner.setup() first"

    def plain() -> asyncio.BaseProtocol:
        return guard.protocol(http())

    def over_tls(context: ssl.SSLContext) -> asyncio.BaseProtocol:
        layer = _CompactTLS(
            loop,
            http(),
            context,
            None,  # type: ignore[arg-type]  # no one waits for the handshake (asyncio allows it)
            server_side=True,
            ssl_handshake_timeout=guard.limits.header_timeout,  # type: ignore[arg-type]
        )
        return _GuardedTLS(layer, guard)

    return await loop.create_server(
        plain if tls is None else functools.partial(over_tls, tls),
        host,
        port,
        backlog=guard.limits.backlog,
        reuse_address=True,
        family=socket.AF_INET6 if host and ":" in host else socket.AF_UNSPEC,
    )
