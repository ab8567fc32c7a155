"""A cold start through Knative's real queue-proxy: ready only when the whole path serves.

On a real node (Knative v0.50.0) the first request of a scale-from-zero got ``502 dial tcp
127.0.0.1:9999: connect: connection refused`` from queue-proxy: Knative's default readiness
probe (``SERVING_READINESS_PROBE``, a tcpSocket probe of the app's port) said ready as soon as
the app listened, while freeze-proxy — the new ``USER_PORT``, starting in parallel — did not
listen yet, and the activator forwarded. Here queue-proxy (the Go binary) gets exactly the env
the webhook's mutation leaves it, the app listens, and the real freeze-proxy starts late.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.processes import free_port
from testbed.queueproxy import ADMIN_PORT, METRICS_PORT, QueueProxy
from testbed.stack import program, wait_http
from tests.knative_pods import knative_pod, queue_proxy, tcp_probe, user_container
from tests.test_mutation import apply_patch, container, env
from webhook.mutation import MutationSettings, mutate

pytestmark = pytest.mark.queueproxy


@pytest.fixture
def app_port() -> Iterator[int]:
    """An app that answers every GET with 200 "hello"."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def mutated_queue_proxy_env(app_port: int, proxy_port: int, health_port: int) -> dict[str, str]:
    """queue-proxy's env after the webhook's mutation of a default Knative pod."""
    pod = knative_pod(
        [user_container(port=app_port), queue_proxy(app_port, probe=tcp_probe(app_port))]
    )
    settings = MutationSettings("img", proxy_port=proxy_port, health_port=health_port)
    out = apply_patch(pod, mutate(pod, settings).patch)
    return {k: v for k, v in env(container(out, "queue-proxy")).items() if isinstance(v, str)}


async def test_cold_start_is_ready_only_once_freeze_proxy_serves(
    queue_proxy_binary: Path, app_port: int, tmp_path: Path
) -> None:
    for port in (ADMIN_PORT, METRICS_PORT):
        if not _port_free(port):
            pytest.skip(f"queue-proxy's fixed port {port} is in use on this host")
    proxy_port, health_port, no_daemon = free_port(), free_port(), free_port()
    qenv = mutated_queue_proxy_env(app_port, proxy_port, health_port)
    assert qenv["USER_PORT"] == str(proxy_port)
    probe = json.loads(qenv["SERVING_READINESS_PROBE"])

    with QueueProxy(proxy_port, binary=queue_proxy_binary, readiness_probe=probe) as qp:
        # The app listens, freeze-proxy does not yet. kubelet (and the activator) probe
        # queue-proxy; Knative's default probe period 0 makes it retry for up to 10 s.
        status, _ = await asyncio.to_thread(qp.probe, 15)
        if status == 200:  # the activator would now forward the first request
            code, body = await asyncio.to_thread(_get, qp.url + "/first")
            assert code == 200, f"queue-proxy said ready, the request got {code}: {body!r}"
        assert status == 503, qp.output()[-2000:]

        token = tmp_path / "token"
        token.write_text("token")
        args = [
            "freeze_proxy",
            f"--listen=127.0.0.1:{proxy_port}",
            f"--health-listen=127.0.0.1:{health_port}",
            f"--upstream=http://127.0.0.1:{app_port}",
            f"--daemon-url=http://127.0.0.1:{no_daemon}",  # none: the app stays awake
            f"--token-file={token}",
            f"--state-file={tmp_path / 'state' / 'may-be-frozen'}",
        ]
        log = tmp_path / "proxy.log"
        async with program(args, log, sys.executable):
            await wait_http(f"http://127.0.0.1:{health_port}/healthz")
            await asyncio.to_thread(qp.wait_ready, 20)
            assert await asyncio.to_thread(_get, qp.url + "/first") == (200, b"hello"), (
                log.read_text()[-2000:]
            )
