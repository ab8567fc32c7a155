"""The relay opens its connection to the app while the app is being resumed, and sends nothing
on it before the resume has succeeded.

The "frozen app" here is what the kernel does for one: a listening socket nobody accepts on
(the handshake completes in the kernel, the connection waits in the accept queue). The test
plays the gate: it holds the request's wakeup and decides the resume's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from freeze_proxy.relay import Relay, Wakeup

REQUEST = b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class HeldResume:
    """An admission whose every request waits for one resume the test completes."""

    wakeup: Wakeup = field(default_factory=Wakeup)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    refusals: int = 0

    def arrive(self) -> Wakeup:
        self.arrived.set()
        return self.wakeup

    def depart(self) -> None:
        pass

    def refused(self) -> None:
        self.refusals += 1

    def finish(self, ok: bool) -> None:
        self.wakeup.ok = ok
        self.wakeup.event.set()


def frozen_app(backlog: int) -> socket.socket:
    """A listening socket that accepts nothing until the test does: a frozen app's."""
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(backlog)
    app.setblocking(False)
    return app


@contextlib.asynccontextmanager
async def relay_to(app: socket.socket, admission: HeldResume) -> AsyncIterator[int]:
    """A relay in front of ``app``; yields its port."""
    relay = Relay("127.0.0.1", app.getsockname()[1], admission, connect_timeout=5.0)
    server = await asyncio.get_running_loop().create_server(relay.protocol, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await relay.drain(1.0)
        await server.wait_closed()


async def accepted(app: socket.socket) -> socket.socket:
    """The next connection in the app's accept queue (waits for it, bounded)."""
    loop = asyncio.get_running_loop()
    conn, _ = await asyncio.wait_for(loop.sock_accept(app), 5.0)
    conn.setblocking(False)
    return conn


async def recv_some(conn: socket.socket) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(conn, 65536), 5.0)


async def test_the_connection_is_open_while_the_app_resumes_and_carries_nothing_before() -> None:
    admission = HeldResume()
    app = frozen_app(backlog=16)
    async with relay_to(app, admission) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await asyncio.wait_for(admission.arrived.wait(), 5.0)
        conn = await accepted(app)  # opened while the request waits for the resume
        with pytest.raises(BlockingIOError):
            conn.recv(1)  # not a byte before the resume succeeded
        admission.finish(ok=True)
        received = await recv_some(conn)
        assert received.startswith(b"GET /x HTTP/1.1\r\n")
        await asyncio.get_running_loop().sock_sendall(conn, RESPONSE)
        status = await asyncio.wait_for(reader.readline(), 5.0)
        assert status == b"HTTP/1.1 200 OK\r\n"
        writer.close()
        conn.close()
    app.close()


async def test_a_failed_resume_closes_the_early_connection_with_nothing_sent() -> None:
    admission = HeldResume()
    app = frozen_app(backlog=16)
    async with relay_to(app, admission) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await asyncio.wait_for(admission.arrived.wait(), 5.0)
        conn = await accepted(app)
        admission.finish(ok=False)
        status = await asyncio.wait_for(reader.readline(), 5.0)
        assert status.startswith(b"HTTP/1.1 503 ")
        assert admission.refusals == 1
        assert await recv_some(conn) == b"", "the app must see the connection close, empty"
        writer.close()
        conn.close()
    app.close()


async def test_a_full_accept_queue_does_not_stall_the_request_until_the_syn_is_retried() -> None:
    """A frozen app's full queue drops the early connection's SYN, which the kernel would send
    again only after a second: the request must not wait for that once the app is awake."""
    admission = HeldResume()
    app = frozen_app(backlog=0)  # the kernel still queues one
    fillers = []
    for _ in range(4):  # more than the queue holds: later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(app.getsockname())
        fillers.append(filler)
    async with relay_to(app, admission) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await asyncio.wait_for(admission.arrived.wait(), 5.0)
        await asyncio.sleep(0.05)  # the early SYN has been sent (and dropped) meanwhile

        async def awake_app() -> None:
            """The thawed app: drains its queue, answering the one connection with a request."""
            loop = asyncio.get_running_loop()
            while True:
                conn, _ = await loop.sock_accept(app)
                conn.setblocking(False)
                data = b""
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(loop.sock_recv(conn, 65536), 0.05)
                if data.startswith(b"GET /x"):
                    await loop.sock_sendall(conn, RESPONSE)
                conn.close()

        for filler in fillers:
            filler.close()
        server = asyncio.ensure_future(awake_app())
        started = asyncio.get_running_loop().time()
        admission.finish(ok=True)
        status = await asyncio.wait_for(reader.readline(), 5.0)
        waited = asyncio.get_running_loop().time() - started
        assert status == b"HTTP/1.1 200 OK\r\n"
        assert waited < 0.9, f"the request waited {waited:.2f} s: for the kernel's SYN retry"
        server.cancel()
        writer.close()
    app.close()
