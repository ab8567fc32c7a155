"""A pod on a node without a (reachable) freeze-daemon: the real proxy serves it unfrozen.

The webhook injects the sidecar into every Knative pod, but the DaemonSet runs only on labelled
nodes. A pause that never reached a daemon (connection refused) or that a daemon refused (an
error answer) cannot have frozen the app: requests go straight through, /healthz says the daemon
is unreachable, and the log says so once, not at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from testbed.processes import stop, wait_listening
from tests.proxy_harness import free_port, start_site

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RealProxy:
    url: str
    health_url: str
    proc: subprocess.Popen[str]
    log_file: Path

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.health_url) as r:
            body: dict[str, Any] = await r.json()
            return body

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.asynccontextmanager
async def real_proxy(
    tmp_path: Path,
    app_port: int,
    daemon_url: str | None,
    *extra: str,
    host: str = "127.0.0.1",
    connect: str | None = None,
    token: str = "token-1",
    env: dict[str, str] | None = None,
    open_files: tuple[int, int] | None = None,
) -> AsyncIterator[RealProxy]:
    """``python -m freeze_proxy`` in front of ``app_port``, listening on ``host`` (empty: the
    wildcard) and reached at ``connect`` (default ``host``); ``daemon_url`` None leaves the
    default (from ``HOST_IP`` in ``env``); ``open_files`` (soft, hard) starts it with that
    RLIMIT_NOFILE, as a container runtime would. SIGTERM (then KILL) at exit."""
    port, health = free_port(), free_port()
    connect = connect or host
    token_file = tmp_path / "token"
    token_file.write_text(token)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    log_file = tmp_path / f"proxy-{port}.log"
    daemon_flag = [] if daemon_url is None else [f"--daemon-url={daemon_url}"]
    with open(log_file, "w") as log:
        limited = []
        if open_files is not None:
            soft, hard = (
                str(n) if n != resource.RLIM_INFINITY else "unlimited" for n in open_files
            )
            limited = ["prlimit", f"--nofile={soft}:{hard}"]
        proc = subprocess.Popen(
            [
                *limited,
                sys.executable,
                "-m",
                "freeze_proxy",
                f"--listen={bracketed(host)}:{port}",
                f"--health-listen={bracketed(host)}:{health}",
                f"--upstream=http://127.0.0.1:{app_port}",
                *daemon_flag,
                f"--token-file={token_file}",
                f"--state-file={state / 'may-be-frozen'}",
                *extra,
            ],
            stderr=log,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    shown = bracketed(connect)
    proxy = RealProxy(f"http://{shown}:{port}", f"http://{shown}:{health}/healthz", proc, log_file)
    try:
        await asyncio.to_thread(wait_listening, proc, connect, health, "freeze-proxy", log_file)
        yield proxy
    finally:
        stop(proc)


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


@contextlib.asynccontextmanager
async def app_site() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    port = free_port()
    runner = await start_site(app, port)
    try:
        yield port
    finally:
        await runner.cleanup()


def refused_url() -> str:
    """A daemon URL whose port nothing listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"


async def test_without_a_daemon_the_app_serves_normally_and_health_says_why(
    tmp_path: Path,
) -> None:
    async with (
        app_site() as app_port,
        real_proxy(tmp_path, app_port, refused_url(), "--grace=0", "--resume-timeout=2s") as proxy,
    ):
        health: dict[str, Any] = {}

        async def failures() -> int:
            nonlocal health
            health = await proxy.health()
            return int(health["pause_failures"])

        deadline = time.monotonic() + 10
        while await failures() < 1:
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as s:
            for i in range(5):
                started = time.monotonic()
                async with s.get(f"{proxy.url}/r{i}") as r:
                    assert r.status == 200, await r.text()
                    assert await r.text() == "hello"
                assert time.monotonic() - started < 0.5, "the request waited for a resume"
        # The retries keep their backoff (1 s, 2 s, ...), requests or not.
        deadline = time.monotonic() + 10
        while await failures() < 2:
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.05)
        assert health["state"] == "awake", health
        assert health["daemon"] == "unreachable", health
        assert health["resumes"] == 0 and health["resume_failures"] == 0, health
        assert 2 <= health["pause_failures"] <= 4, health
        assert not (tmp_path / "state" / "may-be-frozen").exists(), "a restart would resume"
    said = [line for line in proxy.log_lines() if "unreachable" in line["msg"]]
    assert len(said) == 1, said
    assert said[0]["level"] == "warning" and "knative.dev/container-runtime" in said[0]["msg"]


async def test_the_health_port_drops_a_client_that_never_finishes_its_request(
    tmp_path: Path,
) -> None:
    """A connection holding the health port open must not keep a task in the proxy forever."""
    async with app_site() as app_port, real_proxy(tmp_path, app_port, refused_url()) as proxy:
        port = urlsplit(proxy.health_url).port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        held[0][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        started = time.monotonic()
        for reader, writer in held:
            answer = await asyncio.wait_for(reader.read(), 8)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
            writer.close()
        assert time.monotonic() - started < 5
        assert (await proxy.health())["status"] == "ok"  # and it still serves probes
