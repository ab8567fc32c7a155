"""The relay over real sockets, against scripted apps: the HTTP/1.1 corners a proxy gets wrong.

Each test drives raw bytes from a client socket through ``Relay`` to an app that answers with
exactly the bytes the test wants, and checks what the client sees and that every admitted
request departed exactly once (a missed ``depart()`` would keep the app awake forever; an extra
one would let it freeze under a request).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from freeze_proxy import relay as relay_module
from freeze_proxy.relay import Relay, Wakeup

AppHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class CountingAdmission:
    arrived: int = 0
    departed: int = 0
    wakeup: Wakeup | None = None  # when set, requests wait on it
    refusals: int = 0

    def arrive(self) -> Wakeup | None:
        self.arrived += 1
        return self.wakeup

    def depart(self) -> None:
        self.departed += 1
        assert self.departed <= self.arrived, "depart() without arrive()"

    def refused(self) -> None:
        self.refusals += 1


@dataclass
class Bed:
    admission: CountingAdmission
    relay: Relay
    port: int
    app_requests: list[bytes] = field(default_factory=list)

    async def client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, raw: bytes, read_until_close: bool = True) -> bytes:
        reader, writer = await self.client()
        writer.write(raw)
        try:
            return await asyncio.wait_for(reader.read(), 5) if read_until_close else b""
        finally:
            writer.close()

    async def settled(self) -> None:
        """Every admitted request departed (give the loop a moment to see closes)."""
        for _ in range(200):
            if self.admission.arrived == self.admission.departed:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.admission} never settled")


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.005)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length response: (head, body)."""
    head = await read_head(reader)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


@pytest.fixture
async def make_bed() -> AsyncIterator[Callable[[AppHandler], Awaitable[Bed]]]:
    servers: list[asyncio.Server] = []
    relays: list[Relay] = []

    async def make(app: AppHandler, **relay_options: Any) -> Bed:
        app_server = await asyncio.start_server(app, "127.0.0.1", 0)
        servers.append(app_server)
        app_port = app_server.sockets[0].getsockname()[1]
        admission = CountingAdmission()
        relay = Relay("127.0.0.1", app_port, admission, **relay_options)
        relays.append(relay)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(relay.protocol, "127.0.0.1", 0)
        servers.append(server)
        return Bed(admission, relay, server.sockets[0].getsockname()[1])

    yield make
    for relay in relays:
        await relay.drain(1)
    for server in servers:
        server.close()


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keepalive_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its request line as the body."""
    try:
        while True:
            head = await read_head(reader)
            writer.write(ok(head.split(b"\r\n")[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def test_pipelined_requests_are_answered_in_order(make_bed: Callable[..., Any]) -> None:
    bed: Bed = await make_bed(keepalive_app)
    reader, writer = await bed.client()
    writer.write(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_response(reader))[1] == b"GET /1 HTTP/1.1"
    assert (await read_response(reader))[1] == b"GET /2 HTTP/1.1"
    writer.close()
    await bed.settled()
    assert bed.admission.arrived == 2


async def test_chunked_request_body_reaches_the_app_intact(make_bed: Callable[..., Any]) -> None:
    received: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert b"transfer-encoding: chunked" in head.lower()
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(ok())
        await writer.drain()
        writer.close()

    bed: Bed = await make_bed(app)
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    reader, writer = await bed.client()
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    await writer.drain()
    for i in range(0, len(body), 7):  # dribbled, split across chunk boundaries
        writer.write(body[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0.005)
    head, answer = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200") and answer == b"hello"
    assert received == [body]
    writer.close()
    await bed.settled()


async def test_ambiguous_framing_is_refused_and_never_reaches_the_app(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(keepalive_app)
    answer = await bed.exchange(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"ambiguous" in answer and b"smuggled" not in answer
    assert bed.admission.arrived == 0


async def test_expect_100_continue_is_passed_through(make_bed: Callable[..., Any]) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(4)
        writer.write(ok(body))
        await writer.drain()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert (await read_head(reader)).startswith(b"HTTP/1.1 100")
    writer.write(b"data")
    assert (await read_response(reader))[1] == b"data"
    writer.close()
    await bed.settled()


async def test_a_pooled_connection_the_app_closed_is_replaced_without_an_error(
    make_bed: Callable[..., Any],
) -> None:
    """An app's idle timeout fires as a GET is sent: the GET is sent again, once."""
    connections = 0

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(ok())
        await writer.drain()
        if connections == 1:
            await read_head(reader)  # the second request arrives ... and the app drops it
            writer.transport.abort()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_response(reader))[1] == b"hello"
    writer.write(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
    assert connections == 2
    writer.close()
    await bed.settled()


@dataclass
class DroppingApp:
    """Answers the first request on each connection (``/slow`` ones late); reads every later
    one whole (it may have acted on it: it counts it) and drops the connection unanswered."""

    received: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = True
        try:
            while True:
                head = await read_head(reader)
                line = head.split(b"\r\n")[0]
                for header in head.split(b"\r\n")[1:]:
                    if header.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(header.split(b":")[1]))
                self.received.append(line)
                if not first or line.split(b" ")[1].startswith(b"/drop"):
                    writer.transport.abort()
                    return
                first = False
                if line.split(b" ")[1].startswith(b"/slow"):
                    await asyncio.sleep(0.1)
                writer.write(ok(line))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def count(self, line: bytes) -> int:
        return self.received.count(line)


async def pool_connections(bed: Bed, n: int) -> None:
    """Leave ``n`` idle connections to the app in the pool (n concurrent slow requests)."""

    async def one(i: int) -> None:
        reader, writer = await bed.client()
        writer.write(b"GET /slow/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        await read_response(reader)
        writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    await bed.settled()


async def test_a_post_on_a_stale_pooled_connection_is_not_sent_twice(
    make_bed: Callable[..., Any],
) -> None:
    app = DroppingApp()
    bed: Bed = await make_bed(app)
    await pool_connections(bed, 1)
    reader, writer = await bed.client()
    writer.write(b"POST /charge HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n42")
    head, body = await asyncio.wait_for(read_response(reader), 5)
    assert app.count(b"POST /charge HTTP/1.1") == 1, "the app was charged twice"
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"Idempotency-Key" in body  # the cause says how to allow a retry
    writer.close()
    await bed.settled()


@pytest.mark.parametrize("key", [b"Idempotency-Key", b"x-idempotency-key"])
async def test_a_post_with_an_idempotency_key_is_sent_again_once(
    make_bed: Callable[..., Any], key: bytes
) -> None:
    app = DroppingApp()
    bed: Bed = await make_bed(app)
    await pool_connections(bed, 1)
    reader, writer = await bed.client()
    writer.write(b"POST /charge HTTP/1.1\r\nHost: a\r\n%s: k1\r\nContent-Length: 2\r\n\r\n42" % key)
    head, body = await asyncio.wait_for(read_response(reader), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"POST /charge HTTP/1.1"
    assert app.count(b"POST /charge HTTP/1.1") == 2
    writer.close()
    await bed.settled()


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
async def test_a_request_is_sent_again_at_most_once_however_many_pooled_connections_are_stale(
    make_bed: Callable[..., Any], method: bytes
) -> None:
    """Three stale pooled connections, and an app that drops the request on a fresh one too:
    GET & co are sent twice at most (once again, on a fresh connection), then 502; PUT and
    DELETE are idempotent by RFC, yet not retried without a key (as Go's Transport does)."""
    app = DroppingApp()
    bed: Bed = await make_bed(app)
    await pool_connections(bed, 3)
    answer = await bed.exchange(b"%s /drop HTTP/1.1\r\nHost: a\r\n\r\n" % method)
    assert answer.startswith(b"HTTP/1.1 502 ")
    sent = app.count(b"%s /drop HTTP/1.1" % method)
    assert sent == (2 if method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE") else 1)
    await bed.settled()


async def test_after_a_freeze_the_next_request_uses_a_fresh_connection(
    make_bed: Callable[..., Any],
) -> None:
    """Connections pooled before a freeze are not reused after it: the app's keep-alive timers
    ran out while it was frozen and fire as it resumes, just as the next request is sent."""
    app = FramedApp()
    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
    await read_response(reader)
    assert app.connections == 1
    wakeup = bed.admission.wakeup = Wakeup()  # the app is frozen: requests wait for a resume
    writer.write(b"POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    await until(lambda: bed.admission.arrived == 2)
    bed.admission.wakeup = None
    wakeup.ok = True
    wakeup.event.set()
    assert (await asyncio.wait_for(read_response(reader), 5))[1] == b"POST /after HTTP/1.1"
    assert app.connections == 2
    writer.close()
    await bed.settled()


async def test_an_app_that_answers_nothing_gives_502_not_a_retry_loop(
    make_bed: Callable[..., Any],
) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.transport.abort()

    bed: Bed = await make_bed(app)
    answer = await bed.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502")
    assert b'"cause": "upstream"' in answer
    await bed.settled()


async def test_a_response_ending_at_close_reaches_the_client_whole(
    make_bed: Callable[..., Any],
) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        writer.close()

    bed: Bed = await make_bed(app)
    answer = await bed.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert body == b"part one, part two"
    await bed.settled()


async def test_a_truncated_response_is_not_passed_off_as_complete(
    make_bed: Callable[..., Any],
) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await read_head(reader)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readexactly(100), 5)
    writer.close()
    await bed.settled()


async def test_http10_client_gets_its_answer_and_a_close(make_bed: Callable[..., Any]) -> None:
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    bed: Bed = await make_bed(app)
    answer = await bed.exchange(b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert b"\r\nconnection: close\r\n" in answer.lower()  # the client asked for no keep-alive
    assert b"\r\nconnection: keep-alive\r\n" in seen[0].lower()  # the app connection is ours
    await bed.settled()


async def test_client_leaving_mid_response_departs_once(make_bed: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nsome")
        await writer.drain()
        await release.wait()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await read_head(reader)
    assert bed.admission.departed == 0, "departed while the response was still streaming"
    writer.transport.abort()
    await bed.settled()
    release.set()
    assert bed.admission.arrived == 1


async def test_a_refused_resume_answers_503_and_the_app_sees_nothing(
    make_bed: Callable[..., Any],
) -> None:
    hits: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await read_head(reader))

    bed: Bed = await make_bed(app)
    wakeup = bed.admission.wakeup = Wakeup()
    reader, writer = await bed.client()
    writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    await asyncio.sleep(0.05)
    assert bed.admission.arrived == 1 and hits == []
    wakeup.ok = False
    wakeup.event.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"resume-failed" in answer
    assert bed.admission.refusals == 1 and hits == []
    writer.close()
    await bed.settled()


async def test_oversized_head_is_refused_with_431(make_bed: Callable[..., Any]) -> None:
    bed: Bed = await make_bed(keepalive_app)
    answer = await bed.exchange(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    assert bed.admission.arrived == 0


async def test_drain_lets_a_slow_response_finish_then_closes(make_bed: Callable[..., Any]) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.2)
        writer.write(ok(b"late"))
        await writer.drain()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0.05)
    idle_reader, idle_writer = await bed.client()
    drain = asyncio.ensure_future(bed.relay.drain(5))
    head, body = await read_response(reader)
    assert body == b"late" and b"connection: close" in head.lower()
    assert await asyncio.wait_for(idle_reader.read(), 5) == b"", "idle connection kept open"
    await drain
    for w in (writer, idle_writer):
        w.close()
    await bed.settled()


async def test_an_app_answering_before_reading_the_body_never_stalls_the_client(
    make_bed: Callable[..., Any],
) -> None:
    """The app answers at once and reads the upload later: when the response ends the proxy
    may still be blocked writing the body to it. The client's connection must then either
    close (its body was not all relayed) or serve the next request, never hang."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if not head.startswith(b"POST /upload"):
                writer.write(ok(head.split(b"\r\n")[0]))
                continue
            size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            writer.write(ok(b"early"))
            await writer.drain()
            await asyncio.sleep(0.2)  # the proxy's writes to us back up meanwhile
            await reader.readexactly(size)

    bed: Bed = await make_bed(app)
    for size in (64 << 10, 1 << 20, 8 << 20):  # within the kernel's buffers, and beyond
        reader, writer = await bed.client()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        sending = asyncio.ensure_future(_send_all(writer, b"u" * size))
        assert (await asyncio.wait_for(read_response(reader), 5))[1] == b"early"
        await asyncio.wait({sending}, timeout=5)
        writer.write(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            _, body = await asyncio.wait_for(read_response(reader), 5)
            assert body == b"GET /next HTTP/1.1"
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # closed: allowed, the client retries on a new connection
        writer.close()
        sending.cancel()
    await bed.settled()


async def _send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass


class FakeTransport:
    """Records flow control; a unit stand-in for one socket (only for the test below)."""

    def __init__(self, buffered: int = 0) -> None:
        self.reading = True
        self.closed = False
        self.written = b""
        self.buffered = buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 1) if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def test_backpressure_from_an_app_connection_ends_with_its_exchange() -> None:
    """The app answered while its connection still had our writes queued (it had not read the
    whole body): that connection's back-pressure must not keep the client paused afterwards,
    and a connection with bytes still queued is not pooled for the next request."""
    from freeze_proxy.relay import Downstream, Upstream

    relay = Relay("127.0.0.1", 1, CountingAdmission())
    down, client = Downstream(relay), FakeTransport()
    down.connection_made(client)  # type: ignore[arg-type]
    up, app = Upstream(relay), FakeTransport(buffered=300_000)
    up.connection_made(app)  # type: ignore[arg-type]
    relay.release(up)
    down.data_received(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert app.written.endswith(b"hello")
    up.pause_writing()  # the app is not reading: its socket and our buffer are full
    assert not client.reading
    up.data_received(ok(b"early"))
    assert client.written.endswith(b"early")
    assert client.reading, "the client stays paused by a connection that is no longer its own"
    assert app.closed and relay.acquire() is None, "a connection mid-body was pooled"
    down.data_received(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert relay.admission.arrived == 2  # type: ignore[attr-defined]


# -- framing is not a header (issue #11, item 1) ----------------------------------------------


@dataclass
class FramedApp:
    """An app that reads each request's body by its Content-Length (as a real server does) and
    answers with the request line; ``slow`` paths answer after a delay."""

    lines: list[bytes] = field(default_factory=list)
    connections: int = 0
    slow: bytes = b"/slow"

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await read_head(reader)
                line = head.split(b"\r\n")[0]
                self.lines.append(line)
                for header in head.split(b"\r\n")[1:]:
                    if header.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(header.split(b":")[1]))
                if line.split(b" ")[1].startswith(self.slow):
                    await asyncio.sleep(0.2)
                writer.write(ok(line))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_connection_naming_content_length_cannot_smuggle_a_request(
    make_bed: Callable[..., Any],
) -> None:
    """``Connection: content-length`` must not strip the framing the relay relays the body by:
    else the app reads the body as a second request on a pooled connection, and its answer
    goes to the next client that gets that connection."""
    app = FramedApp()
    bed: Bed = await make_bed(app)
    smuggled = b"GET /slow/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await bed.client()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
    )
    assert (await read_response(reader))[1] == b"POST /a HTTP/1.1"
    writer.close()
    reader, writer = await bed.client()  # another client, on the pooled app connection
    writer.write(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), 5))[1] == b"GET /b HTTP/1.1"
    writer.close()
    assert app.lines == [b"POST /a HTTP/1.1", b"GET /b HTTP/1.1"]
    assert app.connections == 1
    await bed.settled()


@pytest.mark.parametrize("named", [b"content-length", b"Content-Length, keep-alive"])
async def test_connection_naming_content_length_in_a_response_keeps_its_framing(
    make_bed: Callable[..., Any], named: bytes
) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(ok(b"hello", b"Connection: " + named + b"\r\n"))

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    for path in (b"/1", b"/2"):
        writer.write(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
        head, body = await asyncio.wait_for(read_response(reader), 5)
        assert b"\r\ncontent-length: 5\r\n" in head.lower() and body == b"hello"
    writer.close()
    await bed.settled()


async def test_connection_naming_host_does_not_strip_the_host(
    make_bed: Callable[..., Any],
) -> None:
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))
        writer.write(ok())
        await writer.drain()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: host\r\n\r\n")
    await read_response(reader)
    writer.close()
    assert b"\r\nHost: app.example\r\n" in seen[0]
    await bed.settled()


# -- HTTP/1.0 clients (issue #11, item 16) ----------------------------------------------------


def http10_app(body: bytes = b"ok", framing: bytes = b"") -> AppHandler:
    """Answers each request (its connection then closes, as asked by the relay) like a plain
    HTTP/1.0 server: with a Content-Length, or ``framing`` instead when given."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        if framing:
            writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body)
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    return app


async def test_an_http10_keep_alive_client_is_told_keep_alive_and_served_again(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(http10_app())
    reader, writer = await bed.client()
    for _ in range(2):
        writer.write(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        head, body = await asyncio.wait_for(read_response(reader), 5)
        assert b"\r\nconnection: keep-alive\r\n" in head.lower() and body == b"ok"
    writer.close()
    await bed.settled()
    assert bed.admission.arrived == 2


@pytest.mark.parametrize(
    "framing",
    [b"Transfer-Encoding: chunked\r\n", b""],  # chunked (unknown to 1.0), or ends at close
    ids=["chunked", "until-close"],
)
async def test_an_http10_client_is_closed_after_an_answer_it_cannot_delimit(
    make_bed: Callable[..., Any], framing: bytes
) -> None:
    body = b"2\r\nok\r\n0\r\n\r\n" if framing else b"ok"
    bed: Bed = await make_bed(http10_app(body, framing or b"X: 1\r\n"))
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # ends: the relay closes
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert answer.endswith(body)
    writer.close()
    await bed.settled()


# -- a bad or missing answer, a bounded wait (issue #11, item 8) ------------------------------


def answering(response: bytes) -> AppHandler:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(response)
        await writer.drain()
        await reader.read()  # keep the connection open: the relay must decide, not wait

    return app


@pytest.mark.parametrize(
    "response",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20x OK\r\n\r\n",
    ],
    ids=["garbage", "status", "ambiguous", "lengths", "header", "oversized", "after-100"],
)
async def test_a_malformed_response_gives_a_502_naming_the_cause(
    make_bed: Callable[..., Any], response: bytes
) -> None:
    bed: Bed = await make_bed(answering(response))
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    if answer.startswith(b"HTTP/1.1 100 "):  # passed on; then the final answer is ours
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
    body = json.loads(payload)
    assert body["cause"] == "bad-response"
    assert "the app" in body["error"]
    writer.close()
    await bed.settled()


@pytest.mark.parametrize("first", [b"", b"2\r\nok\r\n"], ids=["head-alone", "head-and-a-chunk"])
async def test_a_bad_body_after_the_head_was_sent_aborts_the_client(
    make_bed: Callable[..., Any], first: bytes
) -> None:
    """Once the client has the head, a 502 is no longer possible: the connection is reset, so
    the client cannot take the truncated body for a whole one."""
    head_seen = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + first)
        await writer.drain()
        await head_seen.wait()
        writer.write(b"zz\r\n")
        await writer.drain()
        await reader.read()

    bed: Bed = await make_bed(app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_head(reader)).startswith(b"HTTP/1.1 200 OK")
    head_seen.set()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    await bed.settled()


async def test_a_request_waiting_longer_than_wait_timeout_gets_a_503(
    make_bed: Callable[..., Any],
) -> None:
    hits: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await read_head(reader))

    bed: Bed = await make_bed(app, wait_timeout=0.2)
    bed.admission.wakeup = Wakeup()  # a resume that never ends
    answer = await bed.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["cause"] == "wait-timeout" and "200ms" in body["error"]
    assert hits == [] and bed.admission.refusals == 1
    await bed.settled()


async def test_a_parked_request_is_read_ahead_by_at_most_64_kib_plus_one_read(
    make_bed: Callable[..., Any],
) -> None:
    """A request waiting for a resume: its upload is not read into the proxy's memory beyond
    64 KiB (plus what one read brings) until it can be forwarded; then all of it arrives."""
    got: list[int] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        got.append(len(await reader.readexactly(4 << 20)))
        writer.write(ok())
        await writer.drain()

    bed: Bed = await make_bed(app)
    wakeup = bed.admission.wakeup = Wakeup()
    reader, writer = await bed.client()
    writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (4 << 20))
    sending = asyncio.ensure_future(_send_all(writer, b"u" * (4 << 20)))
    await until(lambda: any(d._held for d in bed.relay.downstreams))
    (down,) = bed.relay.downstreams
    assert len(down._buffer) <= (64 << 10) + READ_SIZE
    wakeup.ok = True
    wakeup.event.set()
    assert (await asyncio.wait_for(read_response(reader), 10))[1] == b"hello"
    assert got == [4 << 20]
    await sending
    writer.close()
    await bed.settled()


READ_SIZE = 128 << 10  # what one read from a socket brings at most here (asyncio reads up to
# 256 KiB; a loopback socket rarely holds more than this many unread bytes at once)


def http10_keep_alive_app(announce: bool, connections: list[int]) -> AppHandler:
    """A server that keeps an HTTP/1.0 connection when asked, and says so if ``announce``
    (else it answers and closes, as a server without 1.0 keep-alive does)."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await read_head(reader)
                kept = announce and b"connection: keep-alive" in head.lower()
                extra = b"Connection: keep-alive\r\n" if kept else b""
                writer.write(b"HTTP/1.0 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % extra)
                await writer.drain()
                if not kept:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return app


@pytest.mark.parametrize("client_keep_alive", [True, False])
async def test_http10_requests_share_a_pooled_app_connection_when_the_app_keeps_it(
    make_bed: Callable[..., Any], client_keep_alive: bool
) -> None:
    """The app connection is the relay's: it asks the app to keep it, whatever the client
    asked for its own connection, and pools it when the app says it keeps it."""
    connections: list[int] = []
    bed: Bed = await make_bed(http10_keep_alive_app(True, connections))
    connection = b"Connection: keep-alive\r\n" if client_keep_alive else b""
    for _ in range(3):
        reader, writer = await bed.client()
        writer.write(b"GET / HTTP/1.0\r\n%s\r\n" % connection)
        assert (await asyncio.wait_for(read_response(reader), 5))[1] == b"ok"
        writer.close()
        await bed.settled()
    assert len(connections) == 1


async def test_an_app_connection_is_not_pooled_after_an_http10_answer_without_keep_alive(
    make_bed: Callable[..., Any],
) -> None:
    connections: list[int] = []
    bed: Bed = await make_bed(http10_keep_alive_app(False, connections))
    reader, writer = await bed.client()
    for _ in range(3):
        writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[1] == b"ok"
    writer.close()
    await bed.settled()
    assert len(connections) == 3


async def test_a_request_sent_again_carries_the_body_that_arrived_meanwhile() -> None:
    """The app drops a pooled connection while a GET's body is still coming: the request goes
    again on a fresh connection, and the part of the body that arrived while that connection
    was being made follows what was sent before, in order."""
    from freeze_proxy.relay import Downstream, Upstream

    relay = Relay("127.0.0.1", 1, CountingAdmission())
    down, client = Downstream(relay), FakeTransport()
    down.connection_made(client)  # type: ignore[arg-type]
    stale, stale_app = Upstream(relay), FakeTransport()
    stale.connection_made(stale_app)  # type: ignore[arg-type]
    relay.release(stale)
    fresh, fresh_app = Upstream(relay), FakeTransport()
    fresh.connection_made(fresh_app)  # type: ignore[arg-type]
    connected = asyncio.Event()

    async def connect() -> Upstream:
        await connected.wait()
        return fresh

    relay.connect = connect  # type: ignore[method-assign]
    down.data_received(b"GET /q HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nfirst")
    assert stale_app.written.endswith(b"\r\n\r\nfirst")
    stale.connection_lost(ConnectionResetError())  # the app closed it: no answer
    down.data_received(b"-last")  # while the fresh connection is being made
    connected.set()
    await until(lambda: bool(fresh_app.written))
    assert fresh_app.written == stale_app.written + b"-last"
    fresh.data_received(ok())
    assert client.written.endswith(b"hello")
    assert relay.admission.departed == 1  # type: ignore[attr-defined]


async def test_an_http10_client_gets_no_interim_response(make_bed: Callable[..., Any]) -> None:
    """A 1xx is not for an HTTP/1.0 client (RFC 9110 §15.2): it would take it for the answer."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok())
        await writer.drain()

    bed: Bed = await make_bed(app)
    for version, hints in ((b"HTTP/1.0", False), (b"HTTP/1.1", True)):
        reader, writer = await bed.client()
        writer.write(b"GET / %s\r\nHost: a\r\n\r\n" % version)
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 103 ") is hints
        writer.close()
    await bed.settled()


# -- slow and idle clients (README, "Timeouts and limits") --------------------------------------


async def test_a_kept_alive_connection_closes_after_the_idle_timeout_counted_from_its_last_answer(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(keepalive_app, idle_timeout=0.4, header_timeout=5.0)
    reader, writer = await bed.client()
    started = time.monotonic()
    for i in range(3):  # each answer starts the idle clock again
        writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == b"GET /%d HTTP/1.1" % i
        await asyncio.sleep(0.25)
    last = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed without a word
    assert time.monotonic() - last > 0.1 and time.monotonic() - started > 0.9
    assert bed.relay.idle_closed == 1
    writer.close()


async def test_a_head_that_never_ends_gets_408_after_the_header_timeout(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(keepalive_app, idle_timeout=30.0, header_timeout=0.3)
    reader, writer = await bed.client()
    writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /2 HTTP/1.1\r\n")  # the next head starts, then trickles
    started = time.monotonic()

    async def trickle() -> None:
        for _ in range(50):
            writer.write(b"X")
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 3)
    finally:
        task.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"--header-timeout" in answer, answer
    assert 0.25 < time.monotonic() - started < 1.5
    assert bed.relay.head_timeouts == 1
    await bed.settled()


async def test_a_connection_beyond_max_connections_gets_503_and_the_others_are_served(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(keepalive_app, max_connections=2)
    first = await bed.client()
    second = await bed.client()
    third_reader, third_writer = await bed.client()
    answer = await asyncio.wait_for(third_reader.read(), 3)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer, answer
    third_writer.close()
    for reader, writer in (first, second):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0].startswith(b"HTTP/1.1 200")
        writer.close()
    assert bed.relay.refused_connections == 1


# A refusal is read by the client even when it is still sending: the proxy half-closes after its
# answer and discards what follows for a moment, because closing a socket with unread input makes
# the kernel send RST, and a RST can destroy the answer before the client reads it (RFC 9112
# §9.6). Seen in CI: clients still trickling a head got ECONNRESET instead of their 408.


async def _refusal_while_sending(bed: Bed, head: bytes, body_size: int) -> bytes:
    reader, writer = await bed.client()
    writer.write(head)
    sending = asyncio.ensure_future(_send_all(writer, b"u" * body_size))
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        sending.cancel()
        writer.close()


async def test_a_431_reaches_a_client_still_sending(make_bed: Callable[..., Any]) -> None:
    bed: Bed = await make_bed(keepalive_app)
    answer = await _refusal_while_sending(bed, b"GET / HTTP/1.1\r\nX-Big: ", 4 << 20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


async def test_a_failed_resume_503_reaches_a_client_still_uploading(
    make_bed: Callable[..., Any],
) -> None:
    bed: Bed = await make_bed(keepalive_app)
    wakeup = bed.admission.wakeup = Wakeup()
    size = 4 << 20
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
    answering = asyncio.ensure_future(_refusal_while_sending(bed, head, size))
    await until(lambda: any(d._held for d in bed.relay.downstreams))  # the upload is parked
    wakeup.ok = False
    wakeup.event.set()
    answer = await answering
    assert answer.startswith(b"HTTP/1.1 503 ") and b"resume-failed" in answer, answer
    await bed.settled()


async def test_the_refused_connection_is_closed_after_the_linger(
    make_bed: Callable[..., Any],
) -> None:
    """The linger is bounded: a client that never stops sending is closed all the same."""
    bed: Bed = await make_bed(keepalive_app)
    reader, writer = await bed.client()
    writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000)
    head = await asyncio.wait_for(read_head(reader), 5)
    assert head.startswith(b"HTTP/1.1 431 ")
    started = time.monotonic()
    try:
        while time.monotonic() - started < 5:
            writer.write(b"b" * 1024)
            await writer.drain()
            await asyncio.sleep(0.01)
        raise AssertionError("the proxy kept a refused connection open for 5 s")
    except ConnectionError:
        pass
    finally:
        writer.close()
    assert time.monotonic() - started < 2
    await until(lambda: not bed.relay.downstreams)


async def test_refusals_at_the_cap_linger_a_bounded_number_at_once(
    make_bed: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of connections beyond --max-connections: each gets its 503, and at most
    REFUSED_LINGERING of them are kept for the linger (the rest close at once)."""
    monkeypatch.setattr(relay_module, "REFUSED_LINGERING", 2)
    bed: Bed = await make_bed(keepalive_app, max_connections=1)
    held = await bed.client()
    extra = [await bed.client() for _ in range(6)]
    answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 3) for r, _ in extra))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer, answer
    assert len(bed.relay.refused) <= 2
    await until(lambda: not bed.relay.refused, within=2)
    for _, writer in [held, *extra]:
        writer.close()
