"""Pure Pod -> JSONPatch mutation that inserts freeze-proxy between queue-proxy and the app.

Everything here is a function of the Pod dict and ``MutationSettings``: no I/O, no clock, so it is
unit-tested on realistic Knative pods and property-tested for idempotence and schema validity.

How the pod is read (never from hard-coded names):

* queue-proxy is the container named ``queue-proxy`` or, failing that, the one whose env has both
  ``USER_PORT`` and ``QUEUE_SERVING_PORT`` (the env Knative's revision reconciler gives it).
* The app's port is queue-proxy's ``USER_PORT``.
* The user container is the one declaring that port, else the one named by the annotation
  ``freeze-proxy.knative.dev/container``, else the one whose ``PORT`` env (set by Knative) equals
  it, else the single other container. Undecidable -> no mutation, a warning.

Resources, grace and timeouts of the sidecar: ``webhook/sidecar.py`` (cluster defaults from the
ConfigMap, per-pod annotations, Guaranteed QoS kept). Ports, paths, env names and flags the proxy
reads: ``freeze_proxy/contract.py``.

Probes: every probe of the user container freeze-proxy can answer — queue-proxy's
``SERVING_READINESS_PROBE`` (Knative moves the user's httpGet/tcpSocket/grpc readiness probe
there, its default a TCP probe of the app's port) and kubelet's liveness/startup (and any
readiness) probes of the user container, ``tcpSocket`` or ``httpGet`` with scheme HTTP, at any
port — becomes an ``httpGet`` of freeze-proxy's health port at the path
``contract.probe_path`` builds (``/ready/...`` for queue-proxy's, which also needs the proxy to
serve; ``/probe/...`` for kubelet's), the original's httpHeaders and timing fields kept and its
``timeoutSeconds`` sent in ``contract.PROBE_TIMEOUT_HEADER``. The proxy checks the app for
real while it is awake and answers from the last result while it is frozen
(freeze_proxy/probes.py), so no probe wakes a frozen app or waits in its accept queue. A
probe it cannot answer fails on a frozen app — ``exec`` (kubelet runs it inside the frozen
container), ``grpc`` (an HTTP/2 health call the stdlib proxy does not make), ``httpGet`` with
scheme HTTPS (the proxy loads no TLS) —: readiness would turn the pod NotReady with nothing
left to wake it, liveness/startup would restart a healthy app, so such a pod is not mutated,
with a warning naming the probe. A kubelet probe with its own ``host`` does not aim at this
pod and is left as it is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from freeze_proxy import contract
from webhook.containers import BadContainerList, freeze_list
from webhook.sidecar import (
    ANNOTATION_PREFIX,
    SidecarConfig,
    apply_overrides,
    is_guaranteed,
    overrides_from_annotations,
    resources,
)
from webhook.sidecar import DEFAULTS as DEFAULT_SIDECAR

LABEL_ADDED = "freeze-pod-added"
LABEL_VERSION = "freeze-pod-version"
# 9: the sidecar's health port is declared, named freeze-health (/metrics for a PodMonitor)
# (8: --mode / --throttle-cpu from the mode and throttle-cpu annotations (throttle, dry-run);
# 7: the sidecar gets one --container per container to freeze (the serving container and the
# user's sidecars, webhook/containers.py) instead of env USER_CONTAINER; 6: every tcpSocket/
# httpGet probe of the user container becomes an httpGet of freeze-proxy's probe paths, answered
# without waking a frozen app; grpc/HTTPS probes skip the pod; 5: queue-proxy's tcpSocket
# readiness probe becomes /ready; 4: the sidecar's CPU limit).
MUTATION_VERSION = "9"
ANNOTATION_ENABLED = ANNOTATION_PREFIX + "enabled"
ANNOTATION_GRACE = ANNOTATION_PREFIX + "grace"
ANNOTATION_CONTAINER = ANNOTATION_PREFIX + "container"
QUEUE_PROXY_NAME = contract.QUEUE_PROXY_NAME
PROXY_CONTAINER_NAME = contract.SIDECAR_NAME
FLAG_CONTAINER = contract.FLAG_CONTAINER
VOLUME_NAME = "freeze-projected"
STATE_VOLUME_NAME = "freeze-proxy-state"
TOKEN_EXPIRATION_SECONDS = 600
READINESS_PROBE_ENV = "SERVING_READINESS_PROBE"
# Knative Serving's encoding of an h2c revision (pkg/reconciler/revision/resources/queue.go):
# queue-proxy's serving port, named queue-port either way, is 8013 instead of 8012.
KNATIVE_QUEUE_PORT_NAME = "queue-port"
KNATIVE_H2C_SERVING_PORT = 8013
PROXY_UID = 65532

JsonObj = dict[str, Any]
Patch = list[JsonObj]


@dataclass(frozen=True)
class MutationSettings:
    """What the injected sidecar looks like; defaults match freeze-proxy's own flag defaults."""

    proxy_image: str
    proxy_port: int = contract.PROXY_PORT
    health_port: int = contract.HEALTH_PORT
    image_pull_policy: str = "IfNotPresent"
    # The cluster's defaults (ConfigMap config-freeze-proxy); annotations override them per pod.
    defaults: SidecarConfig = DEFAULT_SIDECAR


@dataclass(frozen=True)
class MutationResult:
    """The patch plus what the admission layer must tell the user and the log."""

    patch: Patch
    action: str  # "mutated" or "skipped"
    reason: str
    warnings: list[str] = field(default_factory=list)
    user_container: str | None = None
    user_port: int | None = None
    frozen: list[str] = field(default_factory=list)  # the containers the sidecar freezes


class UndecidablePod(Exception):
    """The pod looks like a Knative revision pod but its shape is not one we can safely change."""


def escape_pointer(token: str) -> str:
    """Escape one JSON Pointer reference token (RFC 6901): '~' -> '~0', '/' -> '~1'."""
    return token.replace("~", "~0").replace("/", "~1")


def _env_value(container: Mapping[str, Any], name: str) -> str | None:
    for entry in container.get("env") or []:
        if entry.get("name") == name and isinstance(entry.get("value"), str):
            return str(entry["value"])
    return None


def _env_index(container: Mapping[str, Any], name: str) -> int | None:
    for index, entry in enumerate(container.get("env") or []):
        if entry.get("name") == name:
            return index
    return None


def _find_queue_proxy(containers: list[JsonObj]) -> int | None:
    for index, container in enumerate(containers):
        if container.get("name") == QUEUE_PROXY_NAME:
            return index
    for index, container in enumerate(containers):
        if _env_value(container, "USER_PORT") and _env_value(container, "QUEUE_SERVING_PORT"):
            return index
    return None


def _declares_port(container: Mapping[str, Any], port: int) -> bool:
    return any(p.get("containerPort") == port for p in container.get("ports") or [])


def find_user_container(pod: Mapping[str, Any], queue_index: int, user_port: int) -> int:
    """Index of the app container; raise UndecidablePod when no rule picks exactly one."""
    containers: list[JsonObj] = pod["spec"]["containers"]
    others = [
        i
        for i, c in enumerate(containers)
        if i != queue_index and c.get("name") != PROXY_CONTAINER_NAME
    ]
    by_port = [i for i in others if _declares_port(containers[i], user_port)]
    if len(by_port) == 1:
        return by_port[0]
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    named = annotations.get(ANNOTATION_CONTAINER)
    if named:
        matches = [i for i in others if containers[i].get("name") == named]
        if len(matches) == 1:
            return matches[0]
        raise UndecidablePod(f"annotation {ANNOTATION_CONTAINER}={named!r} names no container")
    by_env = [i for i in others if _env_value(containers[i], "PORT") == str(user_port)]
    if len(by_env) == 1:
        return by_env[0]
    if len(others) == 1:
        return others[0]
    raise UndecidablePod(
        f"cannot tell which of {len(others)} containers serves port {user_port}: "
        f"declare the port or set the annotation {ANNOTATION_CONTAINER}"
    )


class UnanswerableProbe(Exception):
    """A probe of the frozen container freeze-proxy cannot answer: the message names it."""


HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


def reaim_probe(
    probe: Any,
    health_port: int,
    *,
    whole_path: bool,
    resolve: Callable[[Any], Any] | None = None,
    own_ports: tuple[int, ...] = (contract.PROXY_PORT, contract.HEALTH_PORT),
) -> JsonObj | None:
    """One probe of the user container as an ``httpGet`` of freeze-proxy's health port (None:
    leave it as it is). ``whole_path``: queue-proxy's (it probes 127.0.0.1), else kubelet's (a
    probe with its own host aims elsewhere: left alone). ``resolve``: a named port -> number.
    Raises UnanswerableProbe for grpc and HTTPS probes."""
    if not isinstance(probe, dict):
        return None
    if isinstance(probe.get("grpc"), dict):
        raise UnanswerableProbe("grpc")
    tcp, http = probe.get("tcpSocket"), probe.get("httpGet")
    action = tcp if isinstance(tcp, dict) else http if isinstance(http, dict) else None
    if action is None:
        return None
    if not whole_path and action.get("host"):
        return None
    port = action.get("port")
    if resolve is not None:
        port = resolve(port)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None  # unresolvable: it fails with or without us
    if port in own_ports:
        return None
    headers: list[JsonObj] = []
    if action is http:
        if str(http.get("scheme") or "HTTP").upper() != "HTTP":
            raise UnanswerableProbe("httpGet with scheme HTTPS")
        path = contract.probe_path(
            contract.PROBE_HTTP, port, str(http.get("path") or "/"), whole_path=whole_path
        )
        headers = copy.deepcopy(list(http.get("httpHeaders") or []))
    else:
        path = contract.probe_path(contract.PROBE_TCP, port, whole_path=whole_path)
    timeout = probe.get("timeoutSeconds")
    timeout = timeout if isinstance(timeout, int) and timeout > 0 else 1  # kubelet's default
    headers = [h for h in headers if str(h.get("name", "")).lower() != _TIMEOUT_HEADER]
    headers.append({"name": contract.PROBE_TIMEOUT_HEADER, "value": str(timeout)})
    get: JsonObj = {"path": path, "port": health_port}
    if whole_path:
        get["host"] = "127.0.0.1"  # as the revision reconciler writes queue-proxy's probes
    get["scheme"] = "HTTP"
    get["httpHeaders"] = headers
    rest = {k: copy.deepcopy(v) for k, v in probe.items() if k not in HANDLERS}
    return {"httpGet": get, **rest}


_TIMEOUT_HEADER = contract.PROBE_TIMEOUT_HEADER.lower()


def rewrite_readiness_env(
    raw: str, health_port: int, own_ports: tuple[int, ...] = (contract.PROXY_PORT,)
) -> str | None:
    """SERVING_READINESS_PROBE with the user container's probe re-aimed (None: unchanged).

    queue-proxy reads a ``corev1.Probe``, or with multi-container probing a list whose first
    entry is the user container's (null when it has none) and the rest the other containers'
    (not frozen: left alone). Raises UnanswerableProbe (see ``reaim_probe``).
    """
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    probes = parsed if isinstance(parsed, list) else [parsed]
    if not probes:
        return None
    new = reaim_probe(probes[0], health_port, whole_path=True, own_ports=(*own_ports, health_port))
    if new is None:
        return None
    result = [new, *probes[1:]] if isinstance(parsed, list) else new
    return json.dumps(result, separators=(",", ":"))


def _port_matches(value: Any, port: int) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value == port
    return isinstance(value, str) and value.isdigit() and int(value) == port


def _named_port(container: Mapping[str, Any], value: Any) -> Any:
    """Resolve a named probe port against the container's ports (kubelet does the same)."""
    if isinstance(value, str) and not value.isdigit():
        for port in container.get("ports") or []:
            if port.get("name") == value:
                return port.get("containerPort")
    return value


def _choose_volume_name(pod: Mapping[str, Any], base: str) -> str:
    """``base``, or ``base-2``, ``base-3``… if the pod already has a volume of that name."""
    taken = {v.get("name") for v in pod["spec"].get("volumes") or []}
    name = base
    suffix = 2
    while name in taken:
        name = f"{base}-{suffix}"
        suffix += 1
    return name


def _is_h2c(queue: Mapping[str, Any]) -> bool:
    """Knative marks an h2c revision in one place only: queue-proxy serves on 8013
    (``networking.BackendHTTP2Port``: ``QUEUE_SERVING_PORT`` and its ``queue-port``) instead of
    8012. The app's port is named ``user-port`` either way (the Service's port name, ``h2c``
    included, does not reach the pod)."""
    serving = _env_value(queue, "QUEUE_SERVING_PORT")
    if serving is not None:
        return serving.strip() == str(KNATIVE_H2C_SERVING_PORT)
    return any(
        p.get("name") == KNATIVE_QUEUE_PORT_NAME
        and p.get("containerPort") == KNATIVE_H2C_SERVING_PORT
        for p in queue.get("ports") or []
    )


def proxy_container(
    settings: MutationSettings,
    user_container: str,
    user_port: int,
    volume_name: str,
    config: SidecarConfig = DEFAULT_SIDECAR,
    pre_stop: JsonObj | None = None,
    state_volume: str = STATE_VOLUME_NAME,
    *,
    guaranteed: bool = False,
    frozen: list[str] | None = None,
) -> JsonObj:
    """The freeze-proxy container spec (least privilege, small requests, health probe).

    ``pre_stop`` is the user container's own preStop hook (Knative's wait-for-drain on
    queue-proxy): with it kubelet holds our SIGTERM, like the app's, until queue-proxy has
    drained, so requests still arriving during the drain find the proxy listening.
    ``guaranteed``: every other container is Guaranteed, so requests equal the limits.
    ``frozen``: the containers to freeze (webhook/containers.py), one ``--container`` each;
    ``[user_container]`` when not given.
    """
    env: list[JsonObj] = [
        {
            "name": contract.ENV_HOST_IP,
            "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
        },
    ]
    if config.grace is not None:
        env.append({"name": contract.ENV_GRACE, "value": config.grace})
    timeouts = [
        arg
        for flag, value in (
            (contract.FLAG_RESUME_TIMEOUT, config.resume_timeout),
            (contract.FLAG_DRAIN_TIMEOUT, config.drain_timeout),
            (contract.FLAG_MODE, config.mode),
            (contract.FLAG_THROTTLE_CPU, config.throttle_cpu),
        )
        if value is not None
        for arg in (flag, value)
    ]
    return {
        "name": PROXY_CONTAINER_NAME,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            contract.FLAG_LISTEN,
            f"0.0.0.0:{settings.proxy_port}",
            contract.FLAG_HEALTH_LISTEN,
            f"0.0.0.0:{settings.health_port}",
            contract.FLAG_UPSTREAM,
            f"http://127.0.0.1:{user_port}",
            *timeouts,
            *(arg for name in frozen or [user_container] for arg in (FLAG_CONTAINER, name)),
        ],
        "env": env,
        # Named, so a prometheus-operator PodMonitor can select it (port: freeze-health).
        "ports": [
            {
                "name": contract.HEALTH_PORT_NAME,
                "containerPort": settings.health_port,
                "protocol": "TCP",
            }
        ],
        "resources": resources(config, guaranteed),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": volume_name, "mountPath": contract.TOKEN_DIR, "readOnly": True},
            # Survives a restart of the container: a proxy killed after a pause tells its
            # successor that the app may be frozen (see freeze_proxy/marker.py).
            {"name": state_volume, "mountPath": contract.STATE_DIR},
        ],
        "readinessProbe": {
            "httpGet": {"path": contract.HEALTH_PATH, "port": settings.health_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **({"lifecycle": {"preStop": pre_stop}} if pre_stop is not None else {}),
    }


def drain_hook(user: Mapping[str, Any], user_port: int) -> JsonObj | None:
    """The user container's httpGet preStop hook if it waits on another container (drain)."""
    lifecycle = user.get("lifecycle")
    hook = lifecycle.get("preStop") if isinstance(lifecycle, dict) else None
    http = hook.get("httpGet") if isinstance(hook, dict) else None
    if not isinstance(http, dict) or _port_matches(_named_port(user, http.get("port")), user_port):
        return None  # none, an exec hook (runs in the app's image), or one aimed at the app
    return copy.deepcopy(hook)


def projected_volume(name: str) -> JsonObj:
    """The projected token the daemon reviews to learn which pod is asking."""
    return {
        "name": name,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": contract.TOKEN_AUDIENCE,
                        "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                        "path": contract.TOKEN_NAME,
                    }
                }
            ]
        },
    }


PROBE_FIELDS = ("readinessProbe", "livenessProbe", "startupProbe")


def exec_probes(container: Mapping[str, Any]) -> list[str]:
    """The probe fields of ``container`` that kubelet runs by exec-ing into it."""
    return [
        f
        for f in PROBE_FIELDS
        if isinstance(container.get(f), dict) and container[f].get("exec") is not None
    ]


def _skip(reason: str, warning: str | None = None) -> MutationResult:
    return MutationResult([], "skipped", reason, [warning] if warning else [])


def _probe_patch(
    pod: Mapping[str, Any], queue_index: int, user_index: int, settings: MutationSettings
) -> Patch:
    """The operations that re-aim the user container's probes (module doc); raises
    UnanswerableProbe."""
    containers: list[JsonObj] = pod["spec"]["containers"]
    queue, user = containers[queue_index], containers[user_index]
    health_port, own = settings.health_port, (settings.proxy_port, settings.health_port)
    patch: Patch = []
    probe_index = _env_index(queue, READINESS_PROBE_ENV)
    probe_raw = _env_value(queue, READINESS_PROBE_ENV)
    if probe_index is not None and probe_raw is not None:
        new_probe = rewrite_readiness_env(probe_raw, health_port, own)
        if new_probe is not None:
            path = f"/spec/containers/{queue_index}/env/{probe_index}/value"
            patch.append({"op": "replace", "path": path, "value": new_probe})
    for probe_field in PROBE_FIELDS:
        new = reaim_probe(
            user.get(probe_field),
            health_port,
            whole_path=False,
            resolve=lambda port: _named_port(user, port),
            own_ports=own,
        )
        if new is not None:
            path = f"/spec/containers/{user_index}/{probe_field}"
            patch.append({"op": "replace", "path": path, "value": new})
    return patch


def mutate(pod: Mapping[str, Any], settings: MutationSettings) -> MutationResult:
    """Compute the JSONPatch for one Pod; an empty patch when it must (or need) not change.

    Malformed pods (wrong types where Kubernetes guarantees them) raise: the admission layer
    turns any exception into "allowed, unchanged, with a warning".
    """
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    containers: list[JsonObj] = pod["spec"]["containers"]

    if LABEL_ADDED in labels:
        return _skip(f"already mutated (label {LABEL_ADDED})")
    if str(annotations.get(ANNOTATION_ENABLED, "")).strip().lower() == "false":
        return _skip(f"opted out ({ANNOTATION_ENABLED}: false)")
    queue_index = _find_queue_proxy(containers)
    if queue_index is None:
        return _skip("not a Knative revision pod (no queue-proxy)")
    queue = containers[queue_index]
    if any(c.get("name") == PROXY_CONTAINER_NAME for c in containers):
        return _skip(
            f"a container named {PROXY_CONTAINER_NAME} exists",
            f"pod already has a container named {PROXY_CONTAINER_NAME}; not injecting another",
        )
    raw_port = _env_value(queue, "USER_PORT")
    if raw_port is None or not raw_port.isdigit():
        return _skip(
            "queue-proxy has no numeric USER_PORT",
            "freeze-proxy not injected: queue-proxy's USER_PORT is missing or not a number",
        )
    user_port = int(raw_port)
    if user_port in (settings.proxy_port, settings.health_port):
        return _skip(
            f"app port {user_port} collides with freeze-proxy",
            f"freeze-proxy not injected: the app uses port {user_port}, which freeze-proxy needs",
        )
    try:
        user_index = find_user_container(pod, queue_index, user_port)
    except UndecidablePod as err:
        return _skip(str(err), f"freeze-proxy not injected: {err}")
    user = containers[user_index]
    user_name = str(user.get("name"))
    if _is_h2c(queue):
        return _skip(
            "h2c revision (queue-proxy serves on 8013)",
            "freeze-proxy not injected: this revision speaks HTTP/2 cleartext (h2c, e.g. gRPC), "
            "which is not relayed yet; the app runs unfrozen. Set the annotation "
            f'{ANNOTATION_ENABLED}: "false" on the revision template to silence this warning',
        )

    execs = exec_probes(user)
    if execs:
        probes = ", ".join(f"exec {f}" for f in execs)
        return _skip(
            f"container {user_name} has {probes}",
            f"freeze-proxy not injected: container {user_name} has {probes}; kubelet would "
            "exec into the frozen container and fail it (NotReady for good, or restarted). "
            "Use an httpGet or tcpSocket probe (freeze-proxy answers those while the app is "
            f'frozen) to have it frozen, or set {ANNOTATION_ENABLED}: "false" to silence this '
            "warning",
        )
    try:
        probe_patch = _probe_patch(pod, queue_index, user_index, settings)
    except UnanswerableProbe as err:
        what = str(err)
        return _skip(
            f"container {user_name} has a {what} probe",
            f"freeze-proxy not injected: container {user_name} has a {what} probe, which "
            "freeze-proxy cannot answer while the app is frozen (it would fail: NotReady for "
            "good, or restarted). Use an httpGet (scheme HTTP) or tcpSocket probe to have it "
            f'frozen, or set {ANNOTATION_ENABLED}: "false" to silence this warning',
        )

    try:
        to_freeze = freeze_list(pod, user_name, str(queue.get("name")), exec_probes)
    except BadContainerList as err:
        return _skip(str(err), f"freeze-proxy not injected: {err}")

    config, warnings = apply_overrides(
        settings.defaults,
        overrides_from_annotations(annotations),
        ANNOTATION_PREFIX + "{key}",
        "the cluster default is used instead",
    )
    warnings = [*to_freeze.warnings, *warnings]
    others = [c for c in containers if c is not None] + list(
        pod["spec"].get("initContainers") or []
    )

    patch: Patch = []
    new_labels = {LABEL_ADDED: "true", LABEL_VERSION: MUTATION_VERSION}
    if not isinstance(pod.get("metadata"), dict):  # a patch cannot add under a missing parent
        patch.append({"op": "add", "path": "/metadata", "value": {"labels": new_labels}})
    elif "labels" not in metadata or metadata.get("labels") is None:
        patch.append({"op": "add", "path": "/metadata/labels", "value": new_labels})
    else:
        for key, value in new_labels.items():
            patch.append(
                {"op": "add", "path": f"/metadata/labels/{escape_pointer(key)}", "value": value}
            )

    volume_name = _choose_volume_name(pod, VOLUME_NAME)
    state_volume = _choose_volume_name(pod, STATE_VOLUME_NAME)
    volumes = [
        projected_volume(volume_name),
        {"name": state_volume, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if pod["spec"].get("volumes") is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        patch.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)

    queue_path = f"/spec/containers/{queue_index}"
    user_port_index = _env_index(queue, "USER_PORT")
    patch.append(
        {
            "op": "replace",
            "path": f"{queue_path}/env/{user_port_index}/value",
            "value": str(settings.proxy_port),
        }
    )
    patch.extend(probe_patch)

    patch.append(
        {
            "op": "add",
            "path": "/spec/containers/-",
            "value": proxy_container(
                settings,
                user_name,
                user_port,
                volume_name,
                config,
                drain_hook(user, user_port),
                state_volume,
                guaranteed=is_guaranteed(others),
                frozen=to_freeze.containers,
            ),
        }
    )
    return MutationResult(
        patch,
        "mutated",
        f"freeze-proxy injected for container {user_name} on port {user_port}",
        warnings,
        user_container=user_name,
        user_port=user_port,
        frozen=to_freeze.containers,
    )
