"""The HTTP/1.1 relay between queue-proxy and the app, on plain asyncio protocols.

Heads are parsed (``http1.py``) and rewritten; bodies are copied as raw bytes the moment they
arrive, both ways, with back-pressure (a slow reader pauses the other side). Keep-alive
connections to the app are pooled. A ``101 Switching Protocols`` (websockets) turns the pair
into a byte tunnel. No aiohttp here: this is the hot path, and its cost and memory are what the
benchmarks measure (README, "Performance").

Every request is admitted through an ``Admission`` (the freeze gate) before a byte of it reaches
the app, and departs exactly once when its response has ended or either side went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from freeze_proxy import http1
from freeze_proxy.durations import format_duration
from freeze_proxy.http1 import CHUNKED, END_OF_HEAD, LENGTH, NO_BODY, UNTIL_CLOSE, HttpError

log = logging.getLogger("freeze_proxy.relay")

# A request the app may resend (``http1.may_send_again``) up to this size is kept until the app
# answers, to send it once more if a pooled connection turns out stale (closed by the app).
REPLAY_LIMIT = 65536
MAX_POOLED = 256  # idle keep-alive connections kept to the app
BUFFER_LIMIT = 262144  # bytes read ahead from a client before we stop reading it
PARKED_READ_AHEAD = 65536  # the same while its request waits to be forwarded (a resume)
# How long a request, once the app is resumed, waits for the connection opened during the resume
# (a handshake in the pod's loopback takes microseconds; a dropped SYN is retried after 1 s).
EARLY_CONNECT_WAIT = 0.02

# What a client may hold (README, "Timeouts and limits"). queue-proxy, the proxy's only client in
# a pod, sends a request head in one write the moment it has one, and keeps connections alive
# for Go's IdleConnTimeout (90 s, http.DefaultTransport, which knative.dev/pkg's transport
# clones), also ones it opened for a request another connection served first (Go's dial race):
# so a connection may wait that long before its FIRST request too. A server that closes an idle
# connection as the client sends on it fails that request (Go resends only idempotent ones), so
# the idle timeout is well above the client's: queue-proxy always closes first.
HEADER_TIMEOUT = 10.0  # from a head's first byte to its end; then 408 and close
IDLE_TIMEOUT = 300.0  # no request in progress, nothing received; then close
MAX_CONNECTIONS = 10000  # client connections at once; the next one gets 503 and is closed


def files_needed(max_connections: int) -> int:
    """Descriptors the proxy may need: each client connection may hold one to the app, plus
    the pool, the health port's connections, the daemon client's and the logs'."""
    return 2 * max_connections + 256 + 1024


# After our own answer to a client that may still be sending (a refusal, or the app answered
# before reading the whole body): half-closed, its input discarded for this long, then closed.
# Closing a socket with unread input makes the kernel send RST, and a RST can destroy the answer
# before the client reads it (RFC 9112 §9.6); Go's server waits the same 500 ms.
LINGER = 0.5
REFUSED_LINGERING = 100  # connections refused at the cap that linger at once; more close at once


class Wakeup:
    """One resume's outcome, awaited by every request parked behind it."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.ok = False


class Admission(Protocol):
    """Decides when a request may reach the app (``FreezeProxy`` in ``app.py``)."""

    def arrive(self) -> Wakeup | None:
        """None: forward now. Else wait for the wakeup; ``ok`` False means refuse (503)."""
        ...

    def depart(self) -> None: ...

    def refused(self) -> None: ...


class AlwaysAwake:
    """Admission without freezing (``--no-freeze``)."""

    def arrive(self) -> Wakeup | None:
        return None

    def depart(self) -> None:
        pass

    def refused(self) -> None:
        pass


def json_error(status: int, message: str, cause: str, keep_alive: bool = False) -> bytes:
    body = json.dumps({"error": message, "cause": cause}).encode()
    return http1.json_response(status, body, keep_alive)


RESUME_FAILED = (
    "the app could not be resumed, so the request was not forwarded; check that the "
    "freeze-daemon on this node is running and accepts this pod's token (see the freeze-proxy "
    "and freeze-daemon logs)"
)

NOT_SENT_AGAIN = (
    "the app closed a kept-alive connection without answering; the request was not sent again "
    "as the app may have acted on it (only GET, HEAD, OPTIONS, TRACE, or a request with an "
    "Idempotency-Key header, up to 64 KiB, is)"
)

WAIT_TIMED_OUT = (
    "the request waited {} for the app to be resumed and was not forwarded; check that the "
    "freeze-daemon on this node answers (see the freeze-proxy and freeze-daemon logs)"
)

HEAD_TIMED_OUT = (
    "the request head was not complete {} after its first byte; send it at once, or raise "
    "freeze-proxy's --header-timeout"
)

TOO_MANY_CONNECTIONS = (
    "freeze-proxy already holds {} client connections and closed this one unread; reuse "
    "kept-alive connections, or raise --max-connections"
)

# What a client connection is waiting for (the one timer a connection has is about it).
_EXCHANGE = 0  # a request is in progress: the app's answer, a resume, a tunnel (no timer)
_HEAD = 1  # the rest of a request head (header_timeout)
_IDLE = 2  # the next request (idle_timeout)
_LINGER = 3  # half-closed after our answer; what arrives is discarded (LINGER)


# Why a client connection is not being read (several may hold at once).
# (A client is read even while its request waits for the answer, so a client that goes away
# is noticed at once and its request departs: the app may freeze without waiting for it.)
_HOLD_UPSTREAM = 1  # the app reads the request body slower than the client sends it
_HOLD_BUFFER = 2  # BUFFER_LIMIT bytes read ahead (pipelined, or waiting for the app), or
# PARKED_READ_AHEAD while the request waits to be forwarded


class Upstream(asyncio.Protocol):
    """One connection to the app; lent to a ``Downstream`` for one exchange at a time."""

    __slots__ = ("closed", "owner", "relay", "reused", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.owner: Downstream | None = None
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.upstream_data(data)
        else:  # an idle connection must not speak: drop it
            self.close()

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.forget(self)
        if self.owner is not None:
            owner, self.owner = self.owner, None
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.hold(_HOLD_UPSTREAM)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.unhold(_HOLD_UPSTREAM)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Downstream(asyncio.Protocol):
    """One client connection (from queue-proxy): requests in order, each relayed to the app."""

    __slots__ = (
        "_buffer",
        "_chunks",
        "_closing",
        "_deadline",
        "_head_sent",
        "_held",
        "_in_exchange",
        "_peer",
        "_phase",
        "_remaining",
        "_req",
        "_req_done",
        "_resp",
        "_resp_buf",
        "_resp_chunks",
        "_resp_remaining",
        "_sent",
        "_timer",
        "_timer_at",
        "_tunnel",
        "_up",
        "_write_paused",
        "relay",
        "transport",
    )

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self._peer = b""
        self._buffer = b""  # bytes read from the client not yet relayed
        self._held = 0
        self._closing = False  # close once the current exchange ends
        self._in_exchange = False  # admitted: depart() is owed
        self._req: http1.RequestHead | None = None
        self._req_done = False
        self._remaining = 0
        self._chunks: http1.ChunkedScanner | None = None
        self._up: Upstream | None = None
        self._sent: list[bytes] | None = None  # what the app got so far, while replayable
        self._resp: http1.ResponseHead | None = None
        self._resp_buf = b""
        self._resp_remaining = 0
        self._resp_chunks: http1.ChunkedScanner | None = None
        self._head_sent = False
        self._tunnel = False
        self._write_paused = False  # the client reads slower than the app answers
        self._phase = _EXCHANGE
        self._deadline = 0.0  # when the current phase times out
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when _timer fires

    # -- asyncio callbacks (client side) ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        relay = self.relay
        if len(relay.downstreams) >= relay.max_connections:
            relay.connection_refused()
            self._closing = True
            message = TOO_MANY_CONNECTIONS.format(relay.max_connections)
            self.transport.write(json_error(503, message, "max-connections"))
            if len(relay.refused) < REFUSED_LINGERING:  # a flood of them stays bounded
                relay.refused.add(self)
                self._close_after_answer()
            else:
                self.transport.close()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = str(peer[0]).encode()
        relay.downstreams.add(self)
        self._wait(_IDLE, relay.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._phase == _LINGER:
            return
        if self._tunnel:
            if self._up is not None:
                self._up.write(data)
            return
        if self._req is not None and not self._req_done and self._up is not None:
            self._relay_request_body(data)
            return
        self._buffer += data
        if self._req is None:
            self._next_request()
        elif len(self._buffer) > (BUFFER_LIMIT if self._up is not None else PARKED_READ_AHEAD):
            self.hold(_HOLD_BUFFER)

    def eof_received(self) -> bool:
        # Like Go's net/http server: a client that stops sending has gone away, and its request
        # is abandoned (the app may freeze rather than finish work nobody will read).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.relay.closed(self)
        self._drop_upstream()
        self._end_exchange()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._up is not None and self._up.transport is not None:
            self._up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._up is not None and self._up.transport is not None and not self._up.closed:
            self._up.transport.resume_reading()

    def hold(self, reason: int) -> None:
        if not self._held and self.transport is not None:
            self.transport.pause_reading()
        self._held |= reason

    def unhold(self, reason: int) -> None:
        was = self._held
        self._held &= ~reason
        if was and not self._held and self.transport is not None:
            self.transport.resume_reading()

    # -- timeouts ---------------------------------------------------------------------------

    def _wait(self, phase: int, timeout: float) -> None:
        """Enter ``phase``, timing out ``timeout`` from now. The connection's one timer is moved
        only when it would fire too late: a later deadline is found when it fires (so a kept-
        alive connection costs a clock read per request, not a timer)."""
        loop = self.relay.loop
        self._phase = phase
        self._deadline = deadline = loop.time() + timeout
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._phase == _EXCHANGE or self.transport is None:
            return
        loop = self.relay.loop
        if self._deadline > loop.time() + 0.01:  # the deadline moved on since
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._expired)
            return
        if self._phase == _LINGER:
            self._close()
            return
        if self._phase == _HEAD:
            self.relay.head_timeouts += 1
            message = HEAD_TIMED_OUT.format(format_duration(self.relay.header_timeout))
            self._refuse(408, message, "header-timeout")
            return
        self.relay.idle_closed += 1
        self._close()  # idle: closed without a word, as Go's server does (RFC 9112 §9.6)

    # -- requests ---------------------------------------------------------------------------

    def _next_request(self) -> None:
        """Parse the next request head from the buffer and start relaying it."""
        end = self._buffer.find(END_OF_HEAD)
        if end < 0 and len(self._buffer) <= http1.MAX_HEAD:
            if self._phase != _HEAD:  # its first byte: the head must follow in time
                self._wait(_HEAD, self.relay.header_timeout)
            return
        if end < 0 or end > http1.MAX_HEAD:
            self._refuse(431, "the request head is larger than 64 KiB", "bad-request")
            return
        try:
            req = http1.parse_request(self._buffer[:end])
        except HttpError as exc:
            self._refuse(exc.status, str(exc), "bad-request")
            return
        self._buffer = self._buffer[end + 4 :]
        self._phase = _EXCHANGE  # the timer, if any, finds that out when it fires
        self._req = req
        self._req_done = req.framing == NO_BODY
        self._remaining = req.length
        self._chunks = http1.ChunkedScanner() if req.framing == CHUNKED else None
        self._resp = None
        self._resp_buf = b""
        self._head_sent = False
        if not req.keep_alive:
            self._closing = True
        self._in_exchange = True
        wakeup = self.relay.admission.arrive()
        if wakeup is None:
            self._forward()
            return
        self.relay.spawn(self._forward_after(wakeup))
        if len(self._buffer) > PARKED_READ_AHEAD:
            self.hold(_HOLD_BUFFER)

    async def _forward_after(self, wakeup: Wakeup) -> None:
        # The connection to the app is opened while it is being resumed: the handshake is the
        # kernel's (the connection waits in the app's accept queue), so the frozen app is not
        # touched and not a byte is sent before the resume has succeeded; the app finds the
        # connection the moment it thaws, and the request follows at once.
        early = asyncio.ensure_future(self.relay.connect())
        up: Upstream | None = None
        try:
            async with asyncio.timeout(self.relay.wait_timeout):
                await wakeup.event.wait()
            if wakeup.ok and self.transport is not None:
                await asyncio.wait((early,), timeout=EARLY_CONNECT_WAIT)
            up = _connected(early)
        except TimeoutError:
            if self.transport is not None:
                self.relay.admission.refused()
                message = WAIT_TIMED_OUT.format(format_duration(self.relay.wait_timeout))
                self._refuse(503, message, "wait-timeout")
            return
        finally:
            if up is None or self.transport is None or not wakeup.ok:
                _discard(early)
        if self.transport is None:
            return  # the client left while the app was being resumed
        if not wakeup.ok:
            self.relay.admission.refused()
            self._refuse(503, RESUME_FAILED, "resume-failed")
            return
        # The app was (maybe) frozen: connections pooled before are not trusted after, as
        # its keep-alive timers ran out meanwhile and fire now, just as we would send on them.
        self.relay.drop_idle()
        if up is not None:
            self._send(up, None)
            return
        # Still not connected: its SYN was dropped (the frozen app's accept queue was full)
        # and would be sent again only after a second; connect afresh to the awake app.
        self._forward()

    def _forward(self) -> None:
        """Send the request to the app on a pooled connection, or connect first."""
        up = self.relay.acquire()
        if up is None:
            self.relay.spawn(self._connect_then_send(None))
            return
        self._send(up, None)

    async def _connect_then_send(self, replay: bytes | None) -> None:
        try:
            up = await self.relay.connect()
        except OSError as exc:
            self._upstream_failed(exc)
            return
        if self.transport is None or self._req is None:
            self.relay.release(up)
            return
        self._send(up, replay)

    def _send(self, up: Upstream, replay: bytes | None) -> None:
        assert self._req is not None
        up.owner = self
        self._up = up
        if self._write_paused and up.transport is not None:
            up.transport.pause_reading()
        if replay is not None:
            self._sent = None  # sent again once: never a third time
            up.write(replay)
        else:
            head = http1.upstream_request(self._req, self._peer)
            self._sent = [head] if up.reused and http1.may_send_again(self._req) else None
            up.write(head)
        if not self._req_done:  # what was read ahead continues the body (a done one keeps it)
            buffered, self._buffer = self._buffer, b""
            self.unhold(_HOLD_BUFFER)
            if buffered:
                self._relay_request_body(buffered)

    def _relay_request_body(self, data: bytes) -> None:
        """Copy the body part of ``data`` to the app; keep what follows it for later."""
        assert self._up is not None and self._req is not None
        if self._chunks is not None:
            try:
                n = self._chunks.feed(data)
            except HttpError as exc:
                self._abort(f"bad chunked request body: {exc}")
                return
        else:
            n = self._remaining if self._remaining < len(data) else -1
            self._remaining -= len(data) if n < 0 else n
        body, rest = (data, b"") if n < 0 else (data[:n], data[n:])
        if self._sent is not None:
            self._sent.append(body)
            if sum(map(len, self._sent)) > REPLAY_LIMIT:
                self._sent = None
        self._up.write(body)
        if n >= 0 or (self._chunks is None and self._remaining == 0):
            self._req_done = True
            self._buffer = rest + self._buffer

    # -- responses --------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self._tunnel:
            if self.transport is not None:
                self.transport.write(data)
            return
        self._sent = None  # the app has answered: never replay
        if self._resp is None:
            data = self._resp_buf + data if self._resp_buf else data
            self._resp_buf = b""
            self._response_head(data)
        else:
            self._response_body(data, b"")

    def _response_head(self, data: bytes) -> None:
        assert self._req is not None and self.transport is not None
        while True:
            end = data.find(END_OF_HEAD)
            if end < 0 and len(data) <= http1.MAX_HEAD:
                self._resp_buf = data
                return
            if end < 0 or end > http1.MAX_HEAD:
                self._bad_response("the app sent a response head larger than 64 KiB")
                return
            try:
                resp = http1.parse_response(data[:end], self._req.method)
            except HttpError as exc:
                self._bad_response(str(exc))
                return
            data = data[end + 4 :]
            if resp.status >= 200 or resp.status == 101:
                break
            # Interim (100 Continue, 103 Early Hints): pass on, the final answer follows; not to
            # an HTTP/1.0 client, which would take it for the answer (RFC 9110 §15.2).
            if self._req.version != b"HTTP/1.0":
                self.transport.write(http1.interim_response(resp))
        self._resp = resp
        if resp.upgrade and self._req.upgrade:
            self._tunnel = self._head_sent = True
            self.unhold(_HOLD_BUFFER)
            self.transport.write(http1.downstream_response(resp, True))
            if self._buffer and self._up is not None:
                self._up.write(self._buffer)
            self._buffer = b""
            if data:
                self.transport.write(data)
            return
        http10 = self._req.version == b"HTTP/1.0"
        if resp.framing == UNTIL_CLOSE or (http10 and resp.framing == CHUNKED):
            self._closing = True  # the client could not tell where the next answer starts
        self._resp_remaining = resp.length
        self._resp_chunks = http1.ChunkedScanner() if resp.framing == CHUNKED else None
        head = http1.downstream_response(resp, not self._closing, http10)
        self._response_body(data, head)

    def _response_body(self, data: bytes, head: bytes) -> None:
        """Copy the body part of ``data`` to the client (after ``head``, in one write)."""
        assert self._resp is not None and self.transport is not None
        framing = self._resp.framing
        done = False
        extra = False  # the app sent bytes after the end of its response
        if framing == LENGTH:
            if len(data) >= self._resp_remaining:
                extra = len(data) > self._resp_remaining
                data = data[: self._resp_remaining]
                done = True
            self._resp_remaining -= len(data)
        elif framing == CHUNKED:
            assert self._resp_chunks is not None
            try:
                n = self._resp_chunks.feed(data)
            except HttpError as exc:
                self._bad_response(f"the app sent a bad chunked body: {exc}")
                return
            if n >= 0:
                extra = n < len(data)
                data = data[:n]
                done = True
        elif framing == NO_BODY:
            extra = bool(data)
            data = b""
            done = True
        out = head + data if head else data
        if out:
            self.transport.write(out)
            self._head_sent = True
        if done:
            self._response_done(reuse=not extra)

    def _response_done(self, reuse: bool) -> None:
        assert self._req is not None and self._resp is not None
        up, self._up = self._up, None
        if up is not None:
            up.owner = None
            if (
                reuse
                and self._req_done
                and self._resp.keep_alive
                and (self._req.version == b"HTTP/1.1" or http1.announces_keep_alive(self._resp))
                and up.transport is not None
                and not up.transport.get_write_buffer_size()  # still sending it the body
            ):
                self.relay.release(up)
            else:
                up.close()
                self._closing = self._closing or not self._req_done
        self._end_exchange()
        self._req = None
        self._resp = None
        if self._closing:
            if self._req_done:
                self._close()
            else:  # the client may still be sending the body the app did not read
                self._close_after_answer()
            return
        self.unhold(_HOLD_BUFFER | _HOLD_UPSTREAM)  # that app connection is no longer ours
        if self._buffer:
            self._next_request()
        else:
            self._wait(_IDLE, self.relay.idle_timeout)

    def upstream_lost(self, up: Upstream, exc: Exception | None) -> None:
        """The app's side closed during our exchange."""
        self._up = None
        if self._tunnel:
            self._close()
            return
        if self._resp is None:
            if up.reused and self._sent is not None and self.transport is not None:
                # A pooled connection the app closed (its idle timeout) as we sent on it, and
                # a request it may get twice: send it once more, on a fresh connection (a
                # failure there is the app's answer, Go's Transport rule).
                replay, self._sent = b"".join(self._sent), None
                self.relay.spawn(self._connect_then_send(replay))
                return
            if up.reused:
                exc = ConnectionError(NOT_SENT_AGAIN)
            self._upstream_failed(exc or ConnectionError("the app closed the connection"))
            return
        if self._resp.framing == UNTIL_CLOSE:
            self._response_done(reuse=False)
            return
        self._abort("the app closed the connection in the middle of a response")

    # -- endings ----------------------------------------------------------------------------

    def _upstream_failed(self, exc: BaseException) -> None:
        log.warning(
            "the app did not answer", extra={"upstream": self.relay.address, "err": str(exc)}
        )
        if self._head_sent:
            self._abort(f"the app went away: {exc}")
            return
        message = f"the app at {self.relay.address} did not answer: {exc}"
        self._refuse(502, message, "upstream")

    def _bad_response(self, why: str) -> None:
        """The app's answer cannot be relayed: a 502 if the client has seen none of it."""
        if self._head_sent:
            self._abort(why)
            return
        log.warning(
            "the app sent a bad response", extra={"upstream": self.relay.address, "err": why}
        )
        self._refuse(
            502, f"the app at {self.relay.address} sent a bad response: {why}", "bad-response"
        )

    def _refuse(self, status: int, message: str, cause: str) -> None:
        """Answer with our own error and close (what follows in the stream is unknowable)."""
        if self.transport is not None:
            self.transport.write(json_error(status, message, cause))
        self._end_exchange()
        self._close_after_answer()

    def _abort(self, why: str) -> None:
        log.warning("relay aborted", extra={"upstream": self.relay.address, "err": why})
        self._drop_upstream()
        self._end_exchange()
        if self.transport is not None:
            self.transport.abort()

    def _drop_upstream(self) -> None:
        """Close this exchange's app connection, if it has one (it is no longer ours)."""
        up, self._up = self._up, None
        if up is not None:
            up.owner = None
            up.close()

    def _end_exchange(self) -> None:
        if self._in_exchange:
            self._in_exchange = False
            self.relay.admission.depart()

    def _close(self) -> None:
        self._drop_upstream()
        if self.transport is not None:
            self.transport.close()

    def _close_after_answer(self) -> None:
        """Close without a RST: send what is written and a FIN, then discard the client's
        input until it closes too or LINGER has passed (see LINGER)."""
        self._drop_upstream()
        transport = self.transport
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._held = 0
        transport.resume_reading()
        self._wait(_LINGER, LINGER)

    @property
    def idle(self) -> bool:
        return self._req is None and not self._buffer

    def shutdown(self) -> None:
        """Stop after the current exchange; an idle connection or a tunnel closes now."""
        self._closing = True
        if self.idle or self._tunnel:
            self._close()


def _connected(connecting: asyncio.Future[Upstream]) -> Upstream | None:
    """The connection ``connecting`` made, if it is made and still open."""
    if not connecting.done() or connecting.cancelled() or connecting.exception() is not None:
        return None
    up = connecting.result()
    return None if up.closed else up


def _discard(connecting: asyncio.Future[Upstream]) -> None:
    """Give up an early connection: cancelled, or closed once made (a connect that finishes as
    it is cancelled still returns its connection). The app then accepts a connection that
    closes at once, with nothing sent on it."""
    connecting.cancel()
    connecting.add_done_callback(_close_if_made)


def _close_if_made(connecting: asyncio.Future[Upstream]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()


class Relay:
    """What the connections share: the app's address, the pool, the admission, the tasks."""

    def __init__(
        self,
        host: str,
        port: int,
        admission: Admission,
        connect_timeout: float = 10.0,
        wait_timeout: float = 30.0,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.admission = admission
        self.connect_timeout = connect_timeout
        self.wait_timeout = wait_timeout  # how long a request may wait for a resume: then 503
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        # Counted, never logged one by one (a flood of slow clients would flood the log).
        self.head_timeouts = 0
        self.idle_closed = 0
        self.refused_connections = 0
        self._next_warning = 0.0
        self.downstreams: set[Downstream] = set()
        self.refused: set[Downstream] = set()  # refused at the cap, lingering (LINGER)
        self._idle: list[Upstream] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed: asyncio.Event | None = None  # set up by drain()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def protocol(self) -> Downstream:
        return Downstream(self)

    def connection_refused(self) -> None:
        """One more connection refused at ``max_connections``: said at most once a minute."""
        self.refused_connections += 1
        now = self.loop.time()
        if now >= self._next_warning:
            self._next_warning = now + 60
            log.warning(
                "client connection limit reached: new connections get 503 and are closed",
                extra={
                    "max_connections": self.max_connections,
                    "refused_so_far": self.refused_connections,
                },
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def acquire(self) -> Upstream | None:
        while self._idle:
            up = self._idle.pop()
            if not up.closed:
                up.reused = True
                return up
        return None

    async def connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: Upstream(self), self.host, self.port),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            raise OSError(f"connect timed out after {self.connect_timeout} s") from exc
        return up

    def drop_idle(self) -> None:
        """Close every pooled connection (the app was frozen: they may be stale)."""
        idle, self._idle = self._idle, []
        for up in idle:
            up.close()

    def release(self, up: Upstream) -> None:
        if up.closed or len(self._idle) >= MAX_POOLED:
            up.close()
            return
        if up.transport is not None:
            up.transport.resume_reading()  # idle: read, to notice when the app closes it
        self._idle.append(up)

    def forget(self, up: Upstream) -> None:
        if up in self._idle:
            self._idle.remove(up)

    def closed(self, down: Downstream) -> None:
        self.downstreams.discard(down)
        self.refused.discard(down)
        if not self.downstreams and self._all_closed is not None:
            self._all_closed.set()

    async def drain(self, within: float) -> None:
        """Finish the exchanges in progress (at most ``within`` s), then close everything."""
        self._all_closed = asyncio.Event()
        for down in list(self.downstreams):
            down.shutdown()
        if self.downstreams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), within)
        for down in [*self.downstreams, *self.refused]:
            if down.transport is not None:
                down.transport.abort()
        for up in list(self._idle):
            up.close()
        self._idle.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
