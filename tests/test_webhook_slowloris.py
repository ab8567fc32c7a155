"""Slow and idle clients against the real ``python -m webhook`` (issue #15).

The webhook's clients are the API servers, but anything in the cluster can reach its Service:
connections that never finish a TLS handshake, heads trickled a byte at a time, and more
connections than the cap must each end after the documented timeout (``--header-timeout``,
``--max-connections``; ``bounded.connections``), memory must stay bounded, and a review is
answered meanwhile. Figures: ``make reliability`` (tests/reliability_report.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.procstat import fd_count, rss_kib
from tests.reliability_report import write_figure
from tests.test_admission import SERVICE_DNS, Webhook, review, running_webhook

pytestmark = pytest.mark.fuzz

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {}}, "spec": {}}


@pytest.fixture
def hook(tmp_path: Path) -> Iterator[Webhook]:
    limits = ("--header-timeout=1s", "--max-connections=400")
    with running_webhook(tmp_path, "--drain-delay=0", *limits) as started:
        yield started


def port_of(hook: Webhook) -> int:
    return int(hook.url.rsplit(":", 1)[1])


async def tls_connect(hook: Webhook) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port_of(hook), ssl=hook.ssl_for(hook.ca), server_hostname=SERVICE_DNS
    )


async def admit(hook: Webhook) -> int:
    """One AdmissionReview over a fresh TLS connection; the HTTP status."""
    body = json.dumps(review(POD)).encode()
    reader, writer = await tls_connect(hook)
    try:
        writer.write(
            b"POST /defaulting HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (SERVICE_DNS.encode(), len(body), body)
        )
        status = await asyncio.wait_for(reader.readline(), 10)
        return int(status.split()[1])
    finally:
        writer.close()


async def ready(hook: Webhook) -> None:
    for _ in range(100):
        try:
            await admit(hook)
            return
        except (OSError, ssl.SSLError):
            await asyncio.sleep(0.1)
    raise AssertionError("the webhook never answered")


async def closed_within(reader: asyncio.StreamReader, within: float) -> float:
    """When (``time.monotonic``) the webhook closed the connection: EOF or a reset."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        raise AssertionError(f"the webhook still holds the connection after {within} s") from None
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic()


async def test_silent_and_trickling_clients_are_cut_after_the_header_timeout(
    hook: Webhook,
) -> None:
    await ready(hook)
    pid = hook.proc.pid
    rss_before, fds_before = rss_kib(pid), fd_count(pid)
    n = 150
    started = time.monotonic()
    silent = [await asyncio.open_connection("127.0.0.1", port_of(hook)) for _ in range(n)]
    trickling = [await tls_connect(hook) for _ in range(n // 3)]

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST /defaulting HTTP/1.1\r\nHost: x\r\n")
        for _ in range(100):
            writer.write(b"X")
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(trickle(w)) for _, w in trickling]
    try:
        await asyncio.sleep(0.3)
        fds_held, rss_held = fd_count(pid), rss_kib(pid)
        t0 = time.monotonic()
        assert await admit(hook) == 200  # served meanwhile
        good_ms = (time.monotonic() - t0) * 1000
        ends = await asyncio.gather(*(closed_within(r, 8) for r, _ in [*silent, *trickling]))
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in [*silent, *trickling]:
            writer.close()
    assert fds_held >= fds_before + n, "the connections were not even accepted"
    longest = max(ends) - started
    assert longest < 4, f"a connection was held {longest:.1f} s (--header-timeout=1s)"
    async with asyncio.timeout(3):
        while fd_count(pid) > fds_before + 2:
            await asyncio.sleep(0.05)
    per_connection_kib = (rss_held - rss_before) / (n + n // 3)
    assert per_connection_kib < 100, f"{per_connection_kib:.0f} KiB per held connection"
    assert await admit(hook) == 200
    write_figure(
        "slowloris-webhook",
        silent=n,
        trickling=n // 3,
        header_timeout_s=1,
        longest_held_s=round(longest, 2),
        good_review_ms=round(good_ms, 1),
        rss_before_kib=rss_before,
        rss_held_kib=rss_held,
        rss_per_connection_kib=round(per_connection_kib, 1),
        fds_before=fds_before,
        fds_held=fds_held,
    )


async def test_held_connections_beyond_the_cap_never_lock_a_review_out(tmp_path: Path) -> None:
    cap = 20
    with running_webhook(tmp_path, "--drain-delay=0", f"--max-connections={cap}") as hook:
        await ready(hook)
        fds_before = fd_count(hook.proc.pid)
        # Idle kept-alive TLS connections, and connections that never start their handshake.
        held = [await tls_connect(hook) for _ in range(cap // 2)]
        held += [await asyncio.open_connection("127.0.0.1", port_of(hook)) for _ in range(cap)]
        await asyncio.sleep(0.2)  # older than the guard's protection of new connections
        statuses = [await admit(hook) for _ in range(5)]  # each evicts the oldest waiting one
        assert statuses == [200] * 5, statuses
        assert fd_count(hook.proc.pid) <= fds_before + cap + 1
        for _, writer in held:
            writer.close()
