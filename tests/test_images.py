"""Our four images, built for real (the session fixture in tests/image_fixtures.py builds them with
`scripts/build_images.sh`, what `make images` runs), then each image is run: its entrypoint, its
size, what it must not load, and the proxy's image as a pod on containerd.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from testbed.containerd import Containerd
from testbed.docker import DockerError
from testbed.oci import import_image
from testbed.pods import ContainerSpec, MakePod
from testbed.processes import free_port
from tests.image_fixtures import IMAGES, MIB, PROGRAMS, Built


def run(built: Built, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return built.engine.run("run", "--rm", "--network", "none", *args, timeout=timeout, check=False)


@pytest.mark.parametrize("name", list(IMAGES))
def test_each_image_builds(built: Built, name: str, record_property: pytest.RecordProperty) -> None:
    size = built.engine.image_size(built.refs[name])
    record_property("size_bytes", size)
    print(f"image {built.refs[name]}: {size / MIB:.1f} MiB (build step {built.seconds:.1f} s)")
    user = built.engine.run(
        "image", "inspect", "--format", "{{.Config.User}}", built.refs[name]
    ).stdout.strip()
    assert user == ("" if name == "daemon" else "65532:65532")


def test_the_proxy_image_is_the_smallest_of_the_three(built: Built) -> None:
    sizes = {name: built.engine.image_size(built.refs[name]) for name in PROGRAMS}
    assert sizes["proxy"] < min(sizes["daemon"], sizes["webhook"]), sizes


@pytest.mark.parametrize("name", PROGRAMS)
def test_entrypoint_runs(built: Built, name: str) -> None:
    proc = run(built, built.refs[name], "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: {IMAGES[name]}" in proc.stdout


def test_proxy_image_has_no_aiohttp_and_never_loads_openssl(built: Built) -> None:
    """README ("Performance"): the sidecar is stdlib-only and keeps OpenSSL out of every pod."""
    proc = run(built, "--entrypoint", "python", built.refs["proxy"], "-c", "import aiohttp")
    assert proc.returncode != 0 and "No module named 'aiohttp'" in proc.stderr, proc.stderr
    check = (
        "import sys, freeze_proxy.__main__, freeze_proxy.app\n"
        "assert sys.modules.get('ssl') is None and '_ssl' not in sys.modules, 'ssl loaded'\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libssl' not in maps and 'libcrypto' not in maps, 'OpenSSL mapped'\n"
        "print('ok')\n"
    )
    proc = run(built, "--entrypoint", "python", built.refs["proxy"], "-c", check)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_sleeptalker_answers_on_its_port(built: Built) -> None:
    port = free_port()
    name = f"sleeptalker-{port}"
    built.engine.run(
        "run", "-d", "--name", name, "--network", "host",
        "-e", "HOST=127.0.0.1", "-e", f"PORT={port}", built.refs["sleeptalker"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = _get(port, b"/?sleep=0")
                break
            except OSError:
                if time.monotonic() > deadline:
                    logs = built.engine.run("logs", name, check=False)
                    raise AssertionError(
                        f"sleeptalker did not answer on {port}: {logs.stdout}{logs.stderr}"
                    ) from None
                time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"world." in reply
    finally:
        try:
            built.engine.run("rm", "-f", name, timeout=30)
        except DockerError as err:
            pytest.fail(f"could not remove {name}: {err}")


@pytest.mark.containerd
async def test_the_proxy_image_runs_as_a_pod_on_containerd(
    built: Built, make_pod: MakePod, containerd: Containerd, tmp_path: Path
) -> None:
    """What a node does with the image: `docker save` → `ctr images import` into the test bed's
    containerd, then a pod through CRI (host network) that relays a request to an app."""
    tar = tmp_path / "freeze-proxy.tar"
    built.engine.run("save", "-o", str(tar), built.refs["proxy"], timeout=300)
    import_image(containerd.socket, tar, containerd.namespace)
    app = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=app.serve_forever, daemon=True)
    thread.start()
    listen, health = free_port(), free_port()
    try:
        spec = ContainerSpec(
            "freeze-proxy",
            image=built.refs["proxy"],
            args=[
                "--listen", f"127.0.0.1:{listen}", "--health-listen", f"127.0.0.1:{health}",
                "--upstream", f"http://127.0.0.1:{app.server_address[1]}", "--no-freeze",
            ],
        )  # fmt: skip
        pod = await make_pod(extra=[spec])
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = await asyncio.to_thread(_get, listen)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the proxy pod did not answer: {pod.log_path('freeze-proxy')}"
                    ) from None
                await asyncio.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert reply.endswith(b"hello from the app"), reply[-200:]
    finally:
        app.shutdown()
        app.server_close()


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the app"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _get(port: int, path: bytes = b"/") -> bytes:
    """The whole answer to one ``GET path`` on 127.0.0.1:``port`` (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
        conn.settimeout(10)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply
