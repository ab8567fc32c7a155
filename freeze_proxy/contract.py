"""What freeze-webhook writes into a pod and freeze-proxy reads there, and what freeze-proxy sends
freeze-daemon: the one place for it.

Ports, paths, environment variable names, headers, flags and defaults the sides must agree on.
The webhook builds the sidecar's container from these (webhook/mutation.py), the proxy takes its
flag defaults from them (freeze_proxy/__main__.py, ``app.Settings``), the daemon reads the
proxy's headers by these names (daemon/ordering.py) and knows our pods by the sidecar's name.
Stdlib only, no imports at all: the proxy image carries freeze_proxy and nothing else.
"""

from __future__ import annotations

# The sidecar's container name: the webhook injects it, the daemon never freezes it and, at its
# start, thaws what a previous instance left paused in pods that carry it (and only those).
SIDECAR_NAME = "freeze-proxy"
# Containers in a pod's request path, never frozen (a frozen one would leave the pod unwakeable):
# Knative's queue-proxy and the service-mesh proxies that intercept the pod's traffic. The
# webhook leaves them out of the sidecar's --container list (webhook/containers.py), the daemon
# refuses to freeze them (daemon.runtimes.NEVER_FROZEN).
QUEUE_PROXY_NAME = "queue-proxy"
MESH_PROXIES = ("istio-proxy", "linkerd-proxy")

# Listeners: queue-proxy's USER_PORT is pointed at PROXY_PORT; kubelet probes HEALTH_PATH on
# HEALTH_PORT (the proxy itself). Every probe of the user container (queue-proxy's
# SERVING_READINESS_PROBE, kubelet's liveness/startup probes) is re-aimed at HEALTH_PORT too, at
# a path ``probe_path`` builds and ``parse_probe_path`` reads (freeze_proxy/probes.py answers it).
PROXY_PORT = 9999
HEALTH_PORT = 9998
# The sidecar declares HEALTH_PORT under this name (a PodMonitor selects it for /metrics).
HEALTH_PORT_NAME = "freeze-health"
HEALTH_PATH = "/healthz"
# Prometheus scrapes METRICS_PATH on HEALTH_PORT (text format: freeze_proxy/metrics.py).
METRICS_PATH = "/metrics"
# queue-proxy's probes: the whole request path (freeze-proxy serves) and the app's own check.
READY_PATH = "/ready"
# kubelet's probes of the user container: the app's own check only (a liveness probe must not
# restart the app because of its proxy).
PROBE_PATH = "/probe"
PROBE_TCP = "tcp"  # connect to the port, close at once (a tcpSocket probe)
PROBE_HTTP = "http"  # GET the path on the port, 200-399 pass (an httpGet probe, scheme HTTP)
# The probe's timeoutSeconds, sent by the prober with the probe (an httpHeaders entry): the
# proxy's own check of the app must end before the prober gives up on the proxy.
PROBE_TIMEOUT_HEADER = "Freeze-Probe-Timeout"
PROBE_TIMEOUT_MAX = 300  # seconds; a larger header value is cut to this


def probe_path(kind: str, port: int, app_path: str = "", *, whole_path: bool) -> str:
    """The health-port path that checks the app's ``port`` as a ``kind`` probe would:
    ``/ready/tcp/8080``, ``/probe/http/8080/healthz?x=1`` (``app_path``: the httpGet path,
    query included; a missing leading slash is added, as the probers do)."""
    if kind not in (PROBE_TCP, PROBE_HTTP):
        raise ValueError(f"probe kind must be {PROBE_TCP} or {PROBE_HTTP}, not {kind!r}")
    base = f"{READY_PATH if whole_path else PROBE_PATH}/{kind}/{port}"
    if kind == PROBE_TCP:
        return base
    return base + "/" + app_path.lstrip("/")


def parse_probe_path(target: str) -> tuple[bool, str, int, str] | None:
    """(whole_path, kind, port, app_target) from a request target ``probe_path`` made; None when
    it is not one. Port 0: the app's own port (a bare ``/ready``, what freeze-pod-version 5 pods
    ask). Raises ValueError for a malformed one (the answer is 400)."""
    if target == READY_PATH or target.startswith(READY_PATH + "?"):
        return True, PROBE_TCP, 0, ""
    if target.startswith(READY_PATH + "/"):
        whole, rest = True, target[len(READY_PATH) + 1 :]
    elif target.startswith(PROBE_PATH + "/"):
        whole, rest = False, target[len(PROBE_PATH) + 1 :]
    else:
        return None
    kind, _, rest = rest.partition("/")
    port_text, _, app_path = rest.partition("/")
    if kind == PROBE_TCP:
        port_text = port_text.partition("?")[0]
    if kind not in (PROBE_TCP, PROBE_HTTP):
        raise ValueError(f"unknown probe kind {kind!r}: {PROBE_TCP} or {PROBE_HTTP}")
    if not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"probe port {port_text!r} is not a port number")
    if kind == PROBE_TCP:
        return whole, kind, int(port_text), ""
    return whole, kind, int(port_text), "/" + app_path


# The node's freeze-daemon, at the node's IP (env HOST_IP) on its hostPort.
DAEMON_PORT = 9696
DEFAULT_UPSTREAM = "http://127.0.0.1:8080"

# The projected service-account token the daemon reviews (audience, mount, file name).
TOKEN_AUDIENCE = "freeze"
TOKEN_DIR = "/var/run/projected"
TOKEN_NAME = "token"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_NAME}"
# A directory that survives restarts of the proxy container (an emptyDir) for its state file.
STATE_DIR = "/var/run/freeze-proxy"
STATE_FILE = f"{STATE_DIR}/may-be-frozen"

# Each call to the daemon carries the time it was sent (CLOCK_MONOTONIC in ns, shared by every
# container of a node, so it keeps increasing across proxy restarts): the daemon refuses (409) a
# call older than one it has already carried out for this pod (daemon/ordering.py).
SEQUENCE_HEADER = "Freeze-Sequence"

# Environment the webhook sets.
ENV_HOST_IP = "HOST_IP"
ENV_USER_CONTAINER = "USER_CONTAINER"
ENV_GRACE = "FREEZE_GRACE"

# Flags the webhook passes.
FLAG_LISTEN = "--listen"
FLAG_HEALTH_LISTEN = "--health-listen"
FLAG_UPSTREAM = "--upstream"
FLAG_RESUME_TIMEOUT = "--resume-timeout"
FLAG_DRAIN_TIMEOUT = "--drain-timeout"
# One per container to freeze (webhook/containers.py decides the list); the proxy sends each as
# the daemon's ?container= (repeatable), and the daemon freezes the list all-or-none.
FLAG_CONTAINER = "--container"

# Defaults, in Go's duration format. The grace was chosen from measurement on real containerd
# (README, "Idle grace"): long enough that a client calling in a loop or at >= 10 req/s never
# pays a pause+resume cycle, short next to any real idle period.
DEFAULT_GRACE = "250ms"
DEFAULT_RESUME_TIMEOUT = "5s"
DEFAULT_DRAIN_TIMEOUT = "20s"

# What the proxy does to an idle app (flag FLAG_MODE, annotation freeze-proxy.knative.dev/mode):
# freeze it (the cgroup freezer), throttle it (its CPU quota lowered to FLAG_THROTTLE_CPU
# through CRI UpdateContainerResources, for runtimes that dislike a full stop), or dry-run
# (the gate runs and /metrics counts what it would do, the daemon is never called).
MODE_FREEZE = "freeze"
MODE_THROTTLE = "throttle"
MODE_DRY_RUN = "dry-run"
MODES = (MODE_FREEZE, MODE_THROTTLE, MODE_DRY_RUN)
FLAG_MODE = "--mode"
FLAG_THROTTLE_CPU = "--throttle-cpu"
DEFAULT_THROTTLE_CPU = "10m"
# The daemon's query parameters: POST /freeze?mode=throttle&cpu=10m (and /thaw?mode=throttle):
# absent, the mode is freeze. Dry-run never reaches the daemon.
QUERY_MODE = "mode"
QUERY_CPU = "cpu"
DAEMON_MODES = (MODE_FREEZE, MODE_THROTTLE)
# The floor is a CFS quota: the kernel refuses a quota below 1 ms per period, so 1m (0.1 ms per
# 100 ms period) would be refused; a floor of a whole CPU or more is no throttle at all.
MIN_THROTTLE_MILLICORES = 10
MAX_THROTTLE_MILLICORES = 999


def parse_millicores(text: str) -> int:
    """A CPU floor as a Kubernetes quantity in millicores ("10m", "50m", "0.1") -> 10, 50, 100.

    Raises ValueError naming the allowed range (10m..999m, whole millicores)."""
    raw = text.strip() if isinstance(text, str) else ""
    whole, dot, fraction = (raw[:-1] if raw.endswith("m") else raw).partition(".")
    digits = "0123456789"
    if not (
        whole + fraction
        and all(c in digits for c in whole + fraction)
        and (not dot or fraction)
        and not (dot and raw.endswith("m") and fraction.strip("0"))
    ):
        raise ValueError(
            f"throttle CPU {text!r} is not a CPU quantity in whole millicores (e.g. 10m, 50m, 0.1)"
        )
    if raw.endswith("m"):
        millis = int(whole or "0")
    else:  # cores: at most three decimals make whole millicores
        if len(fraction.rstrip("0")) > 3:
            raise ValueError(f"throttle CPU {text!r} is a fraction of a millicore: use e.g. 10m")
        millis = int(whole or "0") * 1000 + int((fraction + "000")[:3])
    if not MIN_THROTTLE_MILLICORES <= millis <= MAX_THROTTLE_MILLICORES:
        raise ValueError(
            f"throttle CPU {text!r} is out of range: {MIN_THROTTLE_MILLICORES}m to "
            f"{MAX_THROTTLE_MILLICORES}m (below, the kernel refuses the quota; from 1 CPU up it "
            "throttles nothing)"
        )
    return int(millis)
