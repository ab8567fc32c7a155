"""The relay around a real freeze (the in-process proxy, a daemon stand-in, an aiohttp app)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from freeze_proxy.app import FreezeProxy
from freeze_proxy.gate import Gate
from freeze_proxy.marker import FrozenMarker
from tests.proxy_harness import Harness, start_harness


async def test_no_connection_to_the_app_is_reused_across_a_freeze(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/a", "/b"):
            async with s.post(harness.proxy_url + path, data=b"x") as r:
                assert r.status == 200
            await harness.wait_for(lambda: harness.daemon.frozen)
    assert harness.daemon.count("freeze") == 3
    first, second = harness.app.peers
    assert first != second, "a connection pooled before the freeze was used after it"


async def test_without_a_freeze_the_connection_is_reused(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, grace=30.0)  # no freeze between the requests
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/a", "/b"):
                async with s.post(h.proxy_url + path, data=b"x") as r:
                    assert r.status == 200
        first, second = h.app.peers
        assert first == second
    finally:
        await h.close()


class _RecordingClient:
    """A FreezeClient that records the calls it gets, in order with ``events``."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def pause(self) -> None:
        self.events.append("pause")

    async def resume(self, budget: float) -> None:
        self.events.append("resume")


async def test_pooled_connections_are_dropped_before_every_pause(tmp_path: Path) -> None:
    """Not only a request released by a resume: after a probe woke the app, requests arrive while
    the app is awake, and must not meet a connection pooled before the freeze."""
    events: list[str] = []
    proxy = FreezeProxy(
        Gate(grace=0.0), _RecordingClient(events), 1.0, FrozenMarker(str(tmp_path / "m"))
    )
    proxy.on_pause = lambda: events.append("drop pooled")
    proxy.start()
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.01)
    assert events == ["drop pooled", "pause"]
