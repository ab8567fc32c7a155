"""The relay around a real freeze (the in-process proxy, a daemon stand-in, an aiohttp app)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.proxy_harness import Harness, start_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path)
    await h.wait_for(lambda: h.daemon.frozen)
    yield h
    await h.close()
    assert h.app.violations == [], "the app received work while frozen"


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
