"""Real HTTP clients through the real ``python -m freeze_proxy`` process: ab, curl, websockets.

The raw-socket tests (test_relay.py) pin the wire bytes; these check that clients people use
get along with the proxy (a relay can be byte-correct by our reading and still hang ``ab -k``).
The app is the harness's aiohttp app; the proxy runs with ``--no-freeze`` (the relay alone).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from websockets.asyncio.client import connect

from tests.proxy_harness import AppStub, DaemonStub, free_port, start_site


@dataclass
class Proxied:
    url: str  # the proxy, in front of the app
    direct: str  # the app itself
    app: AppStub


async def _listening(port: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.02)


@pytest.fixture
async def proxied() -> AsyncIterator[Proxied]:
    app = AppStub(DaemonStub())
    app_port, proxy_port = free_port(), free_port()
    runner: web.AppRunner = await start_site(app.app(), app_port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "freeze_proxy",
        f"--listen=127.0.0.1:{proxy_port}",
        f"--health-listen=127.0.0.1:{free_port()}",
        f"--upstream=http://127.0.0.1:{app_port}",
        "--no-freeze",
        "--log-level=warning",
    )
    try:
        await _listening(proxy_port)
        yield Proxied(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{app_port}", app)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        await runner.cleanup()


async def run(*cmd: str, within: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def needs(tool: str) -> pytest.MarkDecorator:
    """Skip without ``tool`` — unless FREEZE_REQUIRE_REAL=1 (CI), where the test must run."""
    return pytest.mark.skipif(
        shutil.which(tool) is None and os.environ.get("FREEZE_REQUIRE_REAL") != "1",
        reason=f"{tool} is not installed (see APT_PACKAGES)",
    )


def ab_field(output: str, name: str) -> int:
    found = re.search(rf"^{name}:\s+(\d+)", output, re.M)
    assert found, f"ab printed no {name!r}:\n{output}"
    return int(found.group(1))


@needs("ab")
@pytest.mark.parametrize("keep_alive", [True, False], ids=["ab -k", "ab"])
async def test_ab_gets_every_answer_through_the_proxy(proxied: Proxied, keep_alive: bool) -> None:
    """ab speaks HTTP/1.0; with -k it asks for keep-alive and waits for the announced end."""
    flags = ["-k"] if keep_alive else []
    code, out, err = await run(
        "ab", *flags, "-q", "-s", "5", "-n", "400", "-c", "4", proxied.url + "/hi"
    )
    assert code == 0, err + out
    assert ab_field(out, "Complete requests") == 400
    assert ab_field(out, "Failed requests") == 0
    assert "Non-2xx responses" not in out
    if keep_alive:
        assert ab_field(out, "Keep-Alive requests") == 400


@needs("curl")
@pytest.mark.parametrize("version", ["--http1.0", "--http1.1"])
async def test_curl_reuses_its_connection_through_the_proxy(proxied: Proxied, version: str) -> None:
    headers = ["-H", "Connection: keep-alive"] if version == "--http1.0" else []
    code, out, err = await run(
        "curl", "-sv", "--max-time", "5", version, *headers, proxied.url + "/a", proxied.url + "/b"
    )
    assert code == 0, err
    assert out == "hellohello"
    assert "Re-using existing connection" in err or "Reusing existing connection" in err, err
    assert [path for path, _ in proxied.app.seen] == ["/a", "/b"]


@needs("curl")
async def test_curl_uploads_and_downloads_a_large_body_intact(
    proxied: Proxied, tmp_path: Path
) -> None:
    upload = tmp_path / "upload"
    upload.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: streamed back by the app
    code, out, err = await run(
        "curl", "-sS", "--max-time", "10", "--data-binary", f"@{upload}",
        "-o", str(tmp_path / "download"), "-w", "%{http_code}", proxied.url + "/echo",
    )  # fmt: skip
    assert (code, out) == (0, "200"), err
    assert (tmp_path / "download").read_bytes() == upload.read_bytes()


@needs("curl")
async def test_curl_sees_our_protocol_version_and_the_apps_status(proxied: Proxied) -> None:
    code, out, err = await run(
        "curl", "-s", "-i", "--max-time", "5", "--http1.0", proxied.url + "/hi"
    )
    assert code == 0, err
    assert out.startswith("HTTP/1.1 200 OK\r\n")


async def test_a_websocket_client_talks_through_the_proxy(proxied: Proxied) -> None:
    ws_url = proxied.url.replace("http://", "ws://") + "/ws"
    async with asyncio.timeout(10), connect(ws_url) as ws:
        for word in ("one", "two", "three"):
            await ws.send(word)
            assert await ws.recv() == "echo:" + word


async def test_connection_naming_content_length_smuggles_nothing_to_a_real_app(
    proxied: Proxied,
) -> None:
    """The smuggling attempt of issue #11 against aiohttp behind the real proxy process."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await asyncio.open_connection(*proxied.url[7:].split(":"))
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.readexactly(len(smuggled)), 5) == smuggled  # echoed
    writer.close()
    code, out, err = await run("curl", "-s", "--max-time", "5", proxied.url + "/after")
    assert (code, out) == (0, "hello"), err
    assert [path for path, _ in proxied.app.seen] == ["/echo", "/after"]
