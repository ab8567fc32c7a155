"""The connection guard's bookkeeping, one function at a time, on stand-in transports.

The real servers behind it are tested in tests/test_daemon_limits.py (freeze-daemon) and
tests/test_webhook_slowloris.py (freeze-webhook).
"""

from __future__ import annotations

import asyncio

from bounded.connections import PROTECT, ConnectionGuard, ServerLimits


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def guard_with(max_connections: int, **kw: float) -> ConnectionGuard:
    return ConnectionGuard(ServerLimits(max_connections=max_connections, **kw))


async def test_guard_evicts_the_oldest_waiting_connection_never_a_busy_one() -> None:
    guard = guard_with(2)
    busy, idle, new = FakeTransport(), FakeTransport(), FakeTransport()
    assert guard.opened(busy) and guard.opened(idle)
    guard.busy(busy)
    await asyncio.sleep(PROTECT + 0.01)
    assert guard.opened(new)
    assert idle.aborted and not busy.aborted and len(guard) == 2
    # Both left are busy or brand new: the next newcomer is turned away instead.
    guard.busy(new)
    assert not guard.opened(FakeTransport())
    assert guard.rejected == 1 and guard.evicted == 1


async def test_guard_never_evicts_a_brand_new_connection() -> None:
    guard = guard_with(1)
    first = FakeTransport()
    assert guard.opened(first)
    assert not guard.opened(FakeTransport())  # first is younger than PROTECT
    assert not first.aborted


async def test_guard_cuts_a_slow_head_but_not_an_idle_connection() -> None:
    guard = guard_with(10, header_timeout=0.1)
    slow, idle, answered = FakeTransport(), FakeTransport(), FakeTransport()
    for t in (slow, idle, answered):
        guard.opened(t)
    guard.received(slow)
    guard.received(answered)
    guard.busy(answered)  # its head was complete in time
    await asyncio.sleep(0.2)
    assert slow.aborted and not idle.aborted and not answered.aborted
    assert guard.head_timeouts == 1 and len(guard) == 2
    guard.closed(idle)
    guard.closed(answered)
    assert len(guard) == 0
