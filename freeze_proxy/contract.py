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
# HEALTH_PORT (the proxy itself), queue-proxy's SERVING_READINESS_PROBE READY_PATH there (the
# proxy serves and the app accepts connections: freeze_proxy/readiness.py).
PROXY_PORT = 9999
HEALTH_PORT = 9998
HEALTH_PATH = "/healthz"
READY_PATH = "/ready"
# Prometheus scrapes METRICS_PATH on HEALTH_PORT (text format: freeze_proxy/metrics.py).
METRICS_PATH = "/metrics"
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
