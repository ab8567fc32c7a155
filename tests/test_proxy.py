"""The proxy's behaviour over real HTTP: ordering, streaming, failures, start-up and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from freeze_proxy.daemon_client import TokenFile
from freeze_proxy.http1 import HOP_BY_HOP
from tests.proxy_harness import Harness, free_port, start_harness, start_site


async def test_idle_app_is_frozen_and_a_request_wakes_it_first(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s, s.get(harness.proxy_url + "/hi") as r:
        assert r.status == 200
        assert await r.text() == "hello"
    await harness.wait_for(lambda: harness.daemon.frozen)
    actions = [e[0] for e in harness.daemon.events]
    assert actions == ["freeze", "thaw", "freeze"]
    assert all(e[2] == "token-1" for e in harness.daemon.events)


async def test_concurrent_requests_share_one_resume(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> str:
            async with s.get(f"{harness.proxy_url}/r{i}") as r:
                return await r.text()

        assert await asyncio.gather(*(one(i) for i in range(20))) == ["hello"] * 20
    assert harness.daemon.count("thaw") <= 2
    assert len(harness.app.seen) == 20


async def test_streaming_response_keeps_the_app_awake_until_the_last_byte(
    harness: Harness,
) -> None:
    chunks: list[bytes] = []
    async with (
        aiohttp.ClientSession() as s,
        s.get(harness.proxy_url + "/stream?n=6&every=0.05") as r,
    ):
        async for chunk in r.content.iter_any():
            chunks.append(chunk)
            assert not harness.daemon.frozen
    assert b"".join(chunks).count(b"chunk") == 6
    assert len(chunks) > 1, "the body was buffered instead of streamed"
    await harness.wait_for(lambda: harness.daemon.frozen)


async def test_request_arriving_during_a_slow_pause_waits_for_pause_then_resume(
    harness: Harness,
) -> None:
    harness.daemon.delay = 0.2
    async with aiohttp.ClientSession() as s:
        async with s.get(harness.proxy_url + "/a") as r:  # thaw (slow), then freeze (slow)
            assert r.status == 200
        await asyncio.sleep(0.05)  # the freeze call is now in flight
        async with s.get(harness.proxy_url + "/b") as r:
            assert r.status == 200
    assert [e[0] for e in harness.daemon.events][-2:] == ["freeze", "thaw"]


async def test_post_body_streams_through(harness: Harness) -> None:
    body = os.urandom(1 << 20)
    async with (
        aiohttp.ClientSession() as s,
        s.post(harness.proxy_url + "/echo", data=body) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Length"] == str(len(body))
        assert await r.read() == body


async def test_headers_path_and_query_are_forwarded_faithfully(harness: Harness) -> None:
    headers = {"X-Custom": "1", "Connection": "keep-alive, X-Drop", "X-Drop": "secret"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(harness.proxy_url + "/a%2Fb/c?x=1&x=2&y=%20", headers=headers) as r,
    ):
        assert r.status == 200
    raw_path, seen = harness.app.seen[-1]
    assert raw_path == "/a%2Fb/c?x=1&x=2&y=%20"
    assert seen["X-Custom"] == "1"
    assert "X-Drop" not in seen
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert not HOP_BY_HOP & {k.lower().encode() for k in seen} - {b"connection"}


async def test_websocket_passes_through_and_keeps_the_app_awake(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(harness.proxy_url + "/ws") as ws:
        for i in range(3):
            await ws.send_str(f"m{i}")
            assert (await ws.receive_str()) == f"echo:m{i}"
            await asyncio.sleep(0.05)
            assert not harness.daemon.frozen
    await harness.wait_for(lambda: harness.daemon.frozen)


async def test_failed_resume_answers_503_and_the_next_request_retries(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, resume_timeout=0.3)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        h.daemon.fail_thaw = 1000
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.get(h.proxy_url + "/x") as r:
                assert r.status == 503
                body = await r.json()
                assert body["cause"] == "resume-failed"
            assert time.monotonic() - started < 2
            assert h.app.seen == [], "a request reached an app that could not be resumed"
            h.daemon.fail_thaw = 0
            async with s.get(h.proxy_url + "/y") as r:
                assert r.status == 200
    finally:
        await h.close()
    assert h.app.violations == []


async def test_a_resume_that_finds_no_daemon_forwards_unfrozen_once_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """freeze-proxy uninstalled (the daemon's stop thawed the app) while the proxy believes the
    app frozen: its resume is refused for the whole budget, so it forwards, and from then on
    acts as on a node without a daemon: requests do not wait for, or call, a daemon."""
    h = await start_harness(tmp_path, resume_timeout=0.3)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        await h.runners.pop(0).cleanup()  # the daemon is gone...
        h.daemon.frozen = False  # ...and thawed what it froze on its way out
        thaws = h.daemon.count("thaw")
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy_url + "/x") as r:
                assert r.status == 200, await r.text()
            async with s.get(h.health_url) as r:
                health = await r.json()
            assert health["state"] == "awake" and health["daemon"] == "unreachable", health
            for i in range(3):
                started = time.monotonic()
                async with s.get(f"{h.proxy_url}/y{i}") as r:
                    assert r.status == 200
                assert time.monotonic() - started < 0.2, "a request waited for a resume"
        assert h.daemon.count("thaw") == thaws
    finally:
        await h.close()
    assert h.app.violations == []
    warned = [r for r in caplog.records if "uninstalled from this node" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING", warned
    assert "daemon unreachable at http://127.0.0.1:" in warned[0].getMessage()


async def test_transient_resume_failure_is_retried_within_the_budget(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, resume_timeout=2.0)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        h.daemon.fail_thaw = 3
        async with aiohttp.ClientSession() as s, s.get(h.proxy_url + "/x") as r:
            assert r.status == 200
    finally:
        await h.close()
    assert h.app.violations == []


async def test_failed_pause_leaves_the_app_serving(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    h = await start_harness(tmp_path, grace=0.2, state_file=tmp_path / "state" / "may-be-frozen")
    h.daemon.fail_freeze = True  # before the first pause, due after the grace
    try:
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s, s.get(h.proxy_url + "/x") as r:
            assert r.status == 200
        async with aiohttp.ClientSession() as s, s.get(h.health_url) as r:
            health = await r.json()
        assert health["pause_failures"] >= 1
        # An error answer means the daemon did nothing: no resume is owed before forwarding.
        assert h.daemon.count("thaw") == 0, h.daemon.events
        assert health["daemon"] == "reachable" and health["state"] == "awake", health
    finally:
        await h.close()


async def test_grace_saves_the_cycle_for_back_to_back_requests(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, grace=0.3)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.get(h.proxy_url + "/x") as r:
                    assert r.status == 200
        assert h.daemon.count("thaw") == 1
        assert h.daemon.count("freeze") == 1
        await asyncio.sleep(0.1)
        assert not h.daemon.frozen, "paused within the grace"
        await h.wait_for(lambda: h.daemon.frozen)
        assert h.daemon.count("freeze") == 2
    finally:
        await h.close()


async def test_no_pause_until_the_app_accepts_connections(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, start_app=False)
    try:
        await asyncio.sleep(0.4)
        assert h.daemon.events == [], "froze an app that was still starting"
        h.runners.append(await start_site(h.app.app(), h.app_port))
        await h.wait_for(lambda: h.daemon.frozen)
    finally:
        await h.close()


async def test_rotated_token_is_used(harness: Harness) -> None:
    """kubelet rewrites the token file: the next daemon call carries the new token."""
    harness.token_file.write_text("token-2")
    later = time.time_ns() + 10**9
    os.utime(harness.token_file, ns=(later, later))
    probe = TokenFile(str(harness.token_file))
    assert await probe.refresh()
    assert probe.token == "token-2"
    assert not await probe.refresh(), "an unchanged file is not re-read"


async def test_upstream_down_gives_502_naming_the_app(harness: Harness) -> None:
    await harness.runners[1].cleanup()
    harness.runners.pop()
    async with aiohttp.ClientSession() as s, s.get(harness.proxy_url + "/x") as r:
        assert r.status == 502
        assert "did not answer" in (await r.json())["error"]


def test_sigterm_resumes_a_frozen_app_and_exits(tmp_path: Path) -> None:
    """The real ``freeze-proxy`` process: frozen app, SIGTERM → thaw, then a clean exit."""

    async def scenario() -> None:
        h = await start_harness(tmp_path)  # only used for its stubs; its proxy is stopped
        await h.wait_for(lambda: h.daemon.frozen)
        h.stop.set()
        await h.task
        h.daemon.events.clear()
        port, health = free_port(), free_port()
        daemon_port = h.runners[0].addresses[0][1]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "freeze_proxy",
                f"--listen=127.0.0.1:{port}",
                f"--health-listen=127.0.0.1:{health}",
                f"--upstream=http://127.0.0.1:{h.app_port}",
                f"--daemon-url=http://127.0.0.1:{daemon_port}",
                f"--token-file={h.token_file}",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            await h.wait_for(lambda: h.daemon.count("freeze") >= 1, timeout=10)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            while proc.poll() is None and time.monotonic() - started < 10:
                await asyncio.sleep(0.02)
            assert proc.returncode == 0
            assert [e[0] for e in h.daemon.events][-1] == "thaw"
            assert not h.daemon.frozen
        finally:
            if proc.poll() is None:
                proc.kill()
            err = proc.communicate()[1]
            for runner in h.runners:
                await runner.cleanup()
        assert '"msg": "app paused"' in err and '"msg": "stopped"' in err

    asyncio.run(scenario())


async def test_head_keeps_the_apps_content_length(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s, s.head(harness.proxy_url + "/hi") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "5"
        assert await r.read() == b""


async def test_large_body_streams_back_intact(harness: Harness) -> None:
    body = os.urandom(3 << 20)
    async with (
        aiohttp.ClientSession() as s,
        s.post(harness.proxy_url + "/echo", data=body) as r,
    ):
        assert await r.read() == body


async def test_an_app_left_frozen_by_a_crashed_proxy_is_resumed_before_forwarding(
    tmp_path: Path,
) -> None:
    """kubelet restarts a proxy that died after a pause: the marker it left says 'frozen'."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "may-be-frozen").touch()
    h = await start_harness(tmp_path, grace=5, state_file=state / "may-be-frozen")
    h.daemon.frozen = True  # what the dead instance left behind
    try:
        async with aiohttp.ClientSession() as s, s.get(h.proxy_url + "/x") as r:
            assert r.status == 200
        assert [e[0] for e in h.daemon.events] == ["thaw"]
        assert not (state / "may-be-frozen").exists()
    finally:
        await h.close()
    assert h.app.violations == []


async def test_the_marker_exists_exactly_while_the_app_may_be_frozen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    marker = state / "may-be-frozen"
    h = await start_harness(tmp_path, grace=0.3, state_file=marker)
    try:
        async with aiohttp.ClientSession() as s, s.get(h.proxy_url + "/x") as r:
            assert r.status == 200  # a fresh pod: forwarded without a resume
        assert h.daemon.events == []
        await h.wait_for(lambda: h.daemon.frozen)
        assert marker.exists()
        async with aiohttp.ClientSession() as s, s.get(h.proxy_url + "/y") as r:
            assert r.status == 200
        assert not marker.exists(), "resumed, yet a restart would think it frozen"
    finally:
        await h.close()
    assert not marker.exists(), "shutdown resumes the app"


async def test_no_pause_when_the_marker_cannot_be_written(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    (blocked / "may-be-frozen").mkdir(parents=True)  # a directory where the file should go
    h = await start_harness(tmp_path, state_file=blocked / "may-be-frozen")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(h.health_url) as r:
                    if (await r.json())["pause_failures"]:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the pause was not refused")
            async with s.get(h.proxy_url + "/x") as r:
                assert r.status == 200
        assert h.daemon.count("freeze") == 0
    finally:
        await h.close()
