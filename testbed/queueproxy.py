"""Run Knative's real queue-proxy (``knative.dev/serving/cmd/queue``) as a local process.

In a Knative pod the revision reconciler gives the ``queue-proxy`` container its settings as
environment variables (``pkg/reconciler/revision/resources/queue.go`` builds them; the
binary parses them with envconfig in ``pkg/queue/sharedmain/main.go``). For serving v0.50:

Required (the binary exits at start when one is missing):

====================================  ==============================================================
``SERVING_NAMESPACE``                 the revision's namespace
``SERVING_CONFIGURATION``             the Configuration's name
``SERVING_REVISION``                  the Revision's name
``SERVING_POD``                       the pod's name (downward API ``metadata.name``)
``SERVING_POD_IP``                    the pod's IP (downward API ``status.podIP``)
``QUEUE_SERVING_PORT``                port of the proxy in front of the app (Knative: 8012,
                                      h2c: 8013)
``QUEUE_SERVING_TLS_PORT``            its TLS port (Knative: 8112); only listened on when a cert
                                      and key exist under ``/var/lib/knative/certs``
``USER_PORT``                         the user container's port on 127.0.0.1 (the upstream)
``CONTAINER_CONCURRENCY``             0 = unlimited; N > 0 adds a breaker (queue depth 10*N)
``REVISION_TIMEOUT_SECONDS``          whole-request timeout
``SERVING_LOGGING_CONFIG``            zap logger config, JSON (``""`` = zap production default)
``SERVING_LOGGING_LEVEL``             e.g. ``info``
====================================  ==============================================================

Optional (set by Knative too): ``SERVING_SERVICE`` (the Service's name; empty without one),
``REVISION_RESPONSE_START_TIMEOUT_SECONDS``, ``REVISION_IDLE_TIMEOUT_SECONDS`` (0 = off),
``SERVING_READINESS_PROBE`` (the user container's readiness probe as ``corev1.Probe`` JSON,
rewritten to 127.0.0.1:USER_PORT; Knative's default is a TCP probe of the user port),
``ENABLE_HTTP2_AUTO_DETECTION``, ``ENABLE_HTTP_FULL_DUPLEX``, ``ENABLE_MULTI_CONTAINER_PROBES``
(then the probe JSON is a list), ``SYSTEM_NAMESPACE`` (``knative-serving``), ``HOST_IP``,
``ROOT_CA``, ``QUEUE_PROXY_TLS_MIN_VERSION``/``_MAX_VERSION``/``_CIPHER_SUITES``/
``_CURVE_PREFERENCES``, ``OBSERVABILITY_CONFIG`` (JSON; metrics and tracing default to off),
``POD_NAME``/``HOSTNAME`` (only telemetry attributes).

Fixed ports the binary always binds on all interfaces (not configurable): the admin server on
8022 (``/drain``, ``/wait-for-drain``) and the autoscaler metrics server on 9090. So only one
queue-proxy can run on a host (or network namespace) at a time.

Probes: a kubelet-style GET to ``QUEUE_SERVING_PORT`` with ``K-Network-Probe: queue`` (and a
``kube-probe/…`` User-Agent) is answered by queue-proxy itself: 200 with body ``queue`` when
the user container passes ``SERVING_READINESS_PROBE``, 503 when not (or while draining). On
SIGTERM it keeps serving for a 30 s quiet period before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from testbed import gobins
from testbed.apiserver import die_with_parent_argv

from .processes import free_port

ADMIN_PORT: Final = 8022
METRICS_PORT: Final = 9090
PROBE_HEADER: Final = "K-Network-Probe"
PROBE_VALUE: Final = "queue"
KUBE_PROBE_USER_AGENT: Final = "kube-probe/1.37"

# Knative's default `zap-logger-config` (config-logging), JSON lines on stdout.
DEFAULT_LOGGING_CONFIG: Final = json.dumps(
    {
        "level": "info",
        "development": False,
        "outputPaths": ["stdout"],
        "errorOutputPaths": ["stderr"],
        "encoding": "json",
        "encoderConfig": {
            "timeKey": "timestamp",
            "levelKey": "severity",
            "nameKey": "logger",
            "callerKey": "caller",
            "messageKey": "message",
            "stacktraceKey": "stacktrace",
            "lineEnding": "",
            "levelEncoder": "",
            "timeEncoder": "iso8601",
            "durationEncoder": "",
            "callerEncoder": "",
        },
    }
)


class QueueProxyError(RuntimeError):
    """queue-proxy did not start; the message carries the tail of its output."""


def tcp_probe(port: int) -> dict[str, Any]:
    """Knative's default readiness probe for a user container: TCP connect to its port."""
    return {"tcpSocket": {"port": port, "host": "127.0.0.1"}, "successThreshold": 1}


def http_probe(port: int, path: str = "/", period_seconds: int = 0) -> dict[str, Any]:
    """An HTTP GET readiness probe as the reconciler rewrites it (host 127.0.0.1).

    With ``period_seconds == 0`` (Knative's default) queue-proxy probes "aggressively": on
    each probe of its own it retries the user container every 50 ms for up to 10 s until it
    passes. With ``period_seconds > 0`` it probes once (timeout ``timeoutSeconds``), so a
    failing app makes queue-proxy's own probe answer 503 at once.
    """
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": port, "host": "127.0.0.1", "scheme": "HTTP"},
        "successThreshold": 1,
    }
    if period_seconds > 0:
        probe.update(periodSeconds=period_seconds, timeoutSeconds=1, failureThreshold=1)
    return probe


def queue_proxy_env(
    *,
    user_port: int,
    serving_port: int,
    tls_port: int,
    namespace: str = "default",
    service: str = "hello",
    configuration: str = "hello",
    revision: str = "hello-00001",
    pod: str = "hello-00001-deployment-5d8f7b9c4-abcde",
    pod_ip: str = "127.0.0.1",
    container_concurrency: int = 0,
    revision_timeout_seconds: int = 300,
    response_start_timeout_seconds: int = 0,
    idle_timeout_seconds: int = 0,
    readiness_probe: Mapping[str, Any] | None = None,
    logging_level: str = "info",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment Knative's revision reconciler gives queue-proxy (see module doc)."""
    probe = dict(readiness_probe) if readiness_probe is not None else tcp_probe(user_port)
    env = {
        "SERVING_NAMESPACE": namespace,
        "SERVING_SERVICE": service,
        "SERVING_CONFIGURATION": configuration,
        "SERVING_REVISION": revision,
        "QUEUE_SERVING_PORT": str(serving_port),
        "QUEUE_SERVING_TLS_PORT": str(tls_port),
        "CONTAINER_CONCURRENCY": str(container_concurrency),
        "REVISION_TIMEOUT_SECONDS": str(revision_timeout_seconds),
        "REVISION_RESPONSE_START_TIMEOUT_SECONDS": str(response_start_timeout_seconds),
        "REVISION_IDLE_TIMEOUT_SECONDS": str(idle_timeout_seconds),
        "SERVING_POD": pod,
        "SERVING_POD_IP": pod_ip,
        "SERVING_LOGGING_CONFIG": DEFAULT_LOGGING_CONFIG,
        "SERVING_LOGGING_LEVEL": logging_level,
        "USER_PORT": str(user_port),
        "SYSTEM_NAMESPACE": "knative-serving",
        "SERVING_READINESS_PROBE": json.dumps(probe, separators=(",", ":")),
        "HOST_IP": "127.0.0.1",
        "ENABLE_HTTP2_AUTO_DETECTION": "false",
        "ENABLE_HTTP_FULL_DUPLEX": "false",
        "ENABLE_MULTI_CONTAINER_PROBES": "false",
        "ROOT_CA": "",
        "QUEUE_PROXY_TLS_MIN_VERSION": "",
        "QUEUE_PROXY_TLS_MAX_VERSION": "",
        "QUEUE_PROXY_TLS_CIPHER_SUITES": "",
        "QUEUE_PROXY_TLS_CURVE_PREFERENCES": "",
        "OBSERVABILITY_CONFIG": "{}",
        "POD_NAME": pod,
    }
    if extra:
        env.update(extra)
    return env


class QueueProxy:
    """queue-proxy in front of an app listening on ``127.0.0.1:user_port``; a context manager.

    ``start()`` returns once the serving port accepts connections (not once the app is ready:
    use :meth:`wait_ready` or :meth:`probe` for that). ``stop()`` sends SIGTERM and, since
    queue-proxy's own drain waits 30 s, SIGKILLs it after ``stop_grace`` seconds.
    """

    def __init__(
        self,
        user_port: int,
        *,
        binary: Path | None = None,
        serving_port: int | None = None,
        tls_port: int | None = None,
        start_timeout: float = 20.0,
        stop_grace: float = 2.0,
        **env_kwargs: Any,
    ) -> None:
        self.user_port = user_port
        self.serving_port = serving_port or free_port()
        self.tls_port = tls_port or free_port()
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_grace = stop_grace
        self.env = queue_proxy_env(
            user_port=user_port,
            serving_port=self.serving_port,
            tls_port=self.tls_port,
            **env_kwargs,
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serving_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{ADMIN_PORT}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def output(self) -> str:
        """Everything queue-proxy printed so far (its JSON log lines)."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> QueueProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> QueueProxy:
        if self._proc is not None:
            raise RuntimeError("queue-proxy already started")
        binary = self._binary or gobins.binary("queue-proxy")
        fd, name = tempfile.mkstemp(prefix="freeze-queue-proxy-", suffix=".log")
        self._log_path = Path(name)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env}
        argv, preexec = die_with_parent_argv([str(binary)])
        try:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            os.close(fd)
        deadline = time.monotonic() + self._start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                out = self.output()
                self.stop()
                raise QueueProxyError(f"queue-proxy exited with {rc}:\n{out[-4000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.serving_port), timeout=0.5).close()
                return self
            if time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise QueueProxyError(f"queue-proxy did not listen in time:\n{out[-4000:]}")
            time.sleep(0.05)

    def probe(self, timeout: float = 5.0) -> tuple[int, str]:
        """A kubelet-style readiness probe of queue-proxy: (status, body)."""
        req = urllib.request.Request(
            self.url + "/",
            headers={PROBE_HEADER: PROBE_VALUE, "User-Agent": KUBE_PROBE_USER_AGENT},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: tuple[int, str] | str = ""
        while time.monotonic() < deadline:
            try:
                last = self.probe()
                if last[0] == 200:
                    return
            except OSError as err:
                last = str(err)
            time.sleep(0.1)
        raise QueueProxyError(f"queue-proxy not ready in {timeout}s (last: {last!r})")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
