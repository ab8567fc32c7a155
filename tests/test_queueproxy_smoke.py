"""Smoke test: Knative's real queue-proxy binary in front of a tiny local HTTP app.

Proves the launcher's environment is what queue-proxy needs to start, that requests reach the
app through it, and that its kubelet-style readiness probe (``K-Network-Probe: queue``) follows
the user container's readiness.
"""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.queueproxy import ADMIN_PORT, METRICS_PORT, QueueProxy, http_probe

pytestmark = pytest.mark.queueproxy


@dataclass
class App:
    port: int
    ready: threading.Event = field(default_factory=threading.Event)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def app() -> Iterator[App]:
    state = App(port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200 if state.ready.is_set() else 503, b"health")
                return
            state.seen.append(("GET", self.path, dict(self.headers.items())))
            self._reply(200, b"hello from app " + self.path.encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.seen.append(("POST", self.path, dict(self.headers.items())))
            self._reply(200, b"echo:" + body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_request_and_probe_through_queue_proxy(queue_proxy_binary: Path, app: App) -> None:
    for port in (ADMIN_PORT, METRICS_PORT):
        if not _port_free(port):
            pytest.skip(f"queue-proxy's fixed port {port} is in use on this host")

    qp = QueueProxy(
        app.port,
        binary=queue_proxy_binary,
        readiness_probe=http_probe(app.port, "/healthz", period_seconds=1),
    )
    with qp:
        # The app is not ready yet: queue-proxy's own readiness follows the user probe.
        status, _ = qp.probe()
        assert status == 503, qp.output()[-2000:]

        app.ready.set()
        assert qp.probe() == (200, "queue"), qp.output()[-2000:]
        qp.wait_ready()

        # Probes are answered by queue-proxy, never forwarded to the app's handlers.
        assert app.seen == []

        with urllib.request.urlopen(qp.url + "/hello?x=1", timeout=10) as r:
            assert r.status == 200
            assert r.read() == b"hello from app /hello?x=1"
        req = urllib.request.Request(qp.url + "/post", data=b"payload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.read() == b"echo:payload"

        assert [(m, p) for m, p, _ in app.seen] == [("GET", "/hello?x=1"), ("POST", "/post")]
        headers = {k.lower(): v for k, v in app.seen[0][2].items()}
        assert "127.0.0.1" in headers.get("x-forwarded-for", ""), headers

        # Not ready again -> queue-proxy reports 503 to the kubelet.
        app.ready.clear()
        assert qp.probe()[0] == 503
        pid = qp.pid
        assert pid is not None

    # Stopped: the process is gone and the serving port is closed.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", qp.serving_port), timeout=1).close()
