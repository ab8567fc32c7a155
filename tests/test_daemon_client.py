"""HttpDaemonClient over real sockets: what each way of failing says about the app.

Only a call the daemon may have received and not answered can have frozen the app (``sent``);
a refused connection (``unreachable``) or an error answer (``status``) changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from freeze_proxy.daemon_client import DaemonError, HttpDaemonClient, TokenFile
from tests.proxy_harness import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def daemon(handler: Handler) -> AsyncIterator[tuple[asyncio.Server, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server, server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def client_for(tmp_path: Path, port: int, timeout: float = 0.3) -> HttpDaemonClient:
    (tmp_path / "token").write_text("token-1")
    token = TokenFile(str(tmp_path / "token"))
    await token.refresh()
    return HttpDaemonClient(f"http://127.0.0.1:{port}", token, [], call_timeout=timeout)


def answering(status: int, heads: list[bytes], close_after: bool = False) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode())
                await writer.drain()
                if close_after:
                    break
        writer.close()

    return handle


async def test_a_refused_connection_is_unreachable_and_not_sent(tmp_path: Path) -> None:
    client = await client_for(tmp_path, free_port())
    with pytest.raises(DaemonError) as caught:
        await client.pause()
    assert caught.value.unreachable and not caught.value.sent
    assert "knative.dev/container-runtime" in str(caught.value)


async def test_an_error_answer_is_not_sent(tmp_path: Path) -> None:
    heads: list[bytes] = []
    async with daemon(answering(502, heads)) as (_, port):
        client = await client_for(tmp_path, port)
        with pytest.raises(DaemonError) as caught:
            await client.pause()
        assert caught.value.status == 502
        assert not caught.value.sent and not caught.value.unreachable
        await client.close()


async def test_a_call_held_unanswered_is_sent(tmp_path: Path) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    async with daemon(hold) as (_, port):
        client = await client_for(tmp_path, port, timeout=0.2)
        with pytest.raises(DaemonError) as caught:
            await client.pause()
        assert caught.value.sent and "may still carry it out" in str(caught.value)
        await client.close()


async def test_calls_carry_an_increasing_sequence(tmp_path: Path) -> None:
    heads: list[bytes] = []
    async with daemon(answering(200, heads)) as (_, port):
        client = await client_for(tmp_path, port)
        await client.pause()
        await client.resume(1.0)
        await client.pause()
        await client.close()
    sequences = [
        int(line.split(b":")[1])
        for head in heads
        for line in head.split(b"\r\n")
        if line.startswith(b"Freeze-Sequence:")
    ]
    assert len(sequences) == 3 and sequences == sorted(sequences) and len(set(sequences)) == 3
    assert abs(sequences[-1] - time.monotonic_ns()) < 10 * 10**9  # CLOCK_MONOTONIC, in ns


async def test_a_pooled_connection_closed_while_idle_then_refused_is_unreachable(
    tmp_path: Path,
) -> None:
    """The daemon restarts (a DaemonSet rollout): it closed our idle keep-alive connection and
    nothing listens yet. The next pause never reached a daemon, so it froze nothing."""
    heads: list[bytes] = []
    async with daemon(answering(200, heads, close_after=True)) as (server, port):
        client = await client_for(tmp_path, port)
        await client.pause()  # answered with keep-alive, then the daemon closes the connection
        server.close()
        await server.wait_closed()
    pooled = client._conn
    assert pooled is not None, "the answered connection was not kept"
    deadline = time.monotonic() + 2
    while not pooled[0].at_eof():  # the daemon's FIN has been read
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    with pytest.raises(DaemonError) as caught:
        await client.pause()
    assert caught.value.unreachable and not caught.value.sent, caught.value
    await client.close()


async def test_a_resume_refused_for_its_whole_budget_is_unreachable(tmp_path: Path) -> None:
    """No daemon listens on the node (uninstalled, or down): every attempt is refused."""
    client = await client_for(tmp_path, free_port())
    started = time.monotonic()
    with pytest.raises(DaemonError) as caught:
        await client.resume(0.3)
    assert time.monotonic() - started >= 0.25, "gave up before the budget"
    assert caught.value.unreachable and not caught.value.sent, caught.value


async def test_a_resume_that_reached_a_daemon_once_is_not_unreachable(tmp_path: Path) -> None:
    """A daemon answered an attempt with an error, then went away: that daemon may hold the
    app frozen, so the resume failed (503 to the waiters), not "no daemon"."""
    heads: list[bytes] = []
    answered = asyncio.Event()

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 502 X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()
        answered.set()

    async with daemon(once) as (server, port):
        client = await client_for(tmp_path, port)
        resume = asyncio.ensure_future(client.resume(0.5))
        await asyncio.wait_for(answered.wait(), 2)
        server.close()
        await server.wait_closed()
        with pytest.raises(DaemonError) as caught:
            await resume
    assert len(heads) >= 1
    assert not caught.value.unreachable, caught.value
    await client.close()
