"""The one place tests get Knative revision pods from (mutation, admission, real API server).

Shaped as Knative Serving v0.50.0's revision reconciler makes them, from a pod captured on a real
node (/work/shared/notes/node.md, "Real pod shape (captured)") and Knative's
pkg/reconciler/revision/resources (queue.go, deploy.go), after the API server's defaulting:

* the serving container's only port is named ``user-port`` (the Service's port name, even
  ``h2c``, does not survive); its env is ``PORT`` then ``K_REVISION``, ``K_CONFIGURATION``,
  ``K_SERVICE``; every user container gets the preStop ``httpGet /wait-for-drain`` on 8022;
* queue-proxy declares ``http-autometric`` 9090, ``http-usermetric`` 9091, ``queue-port`` 8012 —
  **8013 for an h2c revision, with ``QUEUE_SERVING_PORT=8013``**: that is the only trace h2c
  leaves in the pod — and ``https-port`` 8112; its readiness probe is ``httpGet /`` on the
  serving port with ``K-Network-Probe: queue`` (period 10 s, timeout 1 s);
* ``SERVING_READINESS_PROBE`` is Knative's default TCP probe of the app's port;
* ``terminationGracePeriodSeconds`` is the revision timeout, 300 s;
* multi-container: ``user-container-0`` has the port, ``user-container-1`` none, both the hook.

A later issue takes these fixtures from a real revision running on a real node (the pod JSON as
``kubectl get pod -o json`` prints it) instead of rebuilding them by hand here.
"""

from __future__ import annotations

import json
from typing import Any

KNATIVE_HTTP1_PORT = 8012
KNATIVE_H2C_PORT = 8013
TCP_PROBE = json.dumps(
    {"tcpSocket": {"port": 8080, "host": "127.0.0.1"}, "successThreshold": 1},
    separators=(",", ":"),
)
DRAIN_HOOK = {"httpGet": {"path": "/wait-for-drain", "port": 8022, "scheme": "HTTP"}}


def tcp_probe(port: int) -> str:
    return TCP_PROBE.replace("8080", str(port))


def queue_proxy(
    user_port: int = 8080,
    probe: str | None = TCP_PROBE,
    *,
    h2c: bool = False,
    revision: str = "hello-00001",
) -> dict[str, Any]:
    """queue-proxy as Knative v0.50.0 builds it (every env var, in its order)."""
    serving = KNATIVE_H2C_PORT if h2c else KNATIVE_HTTP1_PORT
    env: list[dict[str, Any]] = [
        {"name": "SERVING_NAMESPACE", "value": "default"},
        {"name": "SERVING_SERVICE", "value": "hello"},
        {"name": "SERVING_CONFIGURATION", "value": "hello"},
        {"name": "SERVING_REVISION", "value": revision},
        {"name": "QUEUE_SERVING_PORT", "value": str(serving)},
        {"name": "QUEUE_SERVING_TLS_PORT", "value": "8112"},
        {"name": "CONTAINER_CONCURRENCY", "value": "0"},
        {"name": "REVISION_TIMEOUT_SECONDS", "value": "300"},
        {"name": "REVISION_RESPONSE_START_TIMEOUT_SECONDS", "value": "0"},
        {"name": "REVISION_IDLE_TIMEOUT_SECONDS", "value": "0"},
        {"name": "SERVING_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SERVING_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SERVING_LOGGING_CONFIG"},
        {"name": "SERVING_LOGGING_LEVEL"},
        {"name": "USER_PORT", "value": str(user_port)},
        {"name": "SYSTEM_NAMESPACE", "value": "knative-serving"},
        {"name": "SERVING_READINESS_PROBE", **({"value": probe} if probe is not None else {})},
        {
            "name": "HOST_IP",
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}},
        },
        {"name": "ENABLE_HTTP2_AUTO_DETECTION", "value": "false"},
        {"name": "ENABLE_HTTP_FULL_DUPLEX", "value": "false"},
        {"name": "ROOT_CA"},
        {"name": "QUEUE_PROXY_TLS_MIN_VERSION"},
        {"name": "QUEUE_PROXY_TLS_MAX_VERSION"},
        {"name": "QUEUE_PROXY_TLS_CIPHER_SUITES"},
        {"name": "QUEUE_PROXY_TLS_CURVE_PREFERENCES"},
        {"name": "ENABLE_MULTI_CONTAINER_PROBES", "value": "false"},
        {"name": "OBSERVABILITY_CONFIG", "value": "{}"},
    ]
    return {
        "name": "queue-proxy",
        "image": "registry.invalid/knative.dev/serving/cmd/queue@sha256:" + "a" * 64,
        "env": env,
        "ports": [
            {"name": "http-autometric", "containerPort": 9090, "protocol": "TCP"},
            {"name": "http-usermetric", "containerPort": 9091, "protocol": "TCP"},
            {"name": "queue-port", "containerPort": serving, "protocol": "TCP"},
            {"name": "https-port", "containerPort": 8112, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {
                "path": "/",
                "port": serving,
                "scheme": "HTTP",
                "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}],
            },
            "periodSeconds": 10,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "25m"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "imagePullPolicy": "IfNotPresent",
    }


def user_container(
    name: str = "user-container", port: int | None = 8080, *, revision: str = "hello-00001"
) -> dict[str, Any]:
    """A user container; ``port=None`` for the non-serving containers of a multi-container
    revision (no port, no ``PORT`` env, the drain hook all the same)."""
    container: dict[str, Any] = {
        "name": name,
        "image": "registry.invalid/sleeptalker@sha256:" + "b" * 64,
        "env": [
            {"name": "K_REVISION", "value": revision},
            {"name": "K_CONFIGURATION", "value": "hello"},
            {"name": "K_SERVICE", "value": "hello"},
        ],
        "lifecycle": {"preStop": json.loads(json.dumps(DRAIN_HOOK))},
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "imagePullPolicy": "IfNotPresent",
    }
    if port is not None:
        container["ports"] = [{"name": "user-port", "containerPort": port, "protocol": "TCP"}]
        container["env"].insert(0, {"name": "PORT", "value": str(port)})
    return container


def multi_container() -> list[dict[str, Any]]:
    """A multi-container revision's containers, as Knative names them."""
    return [user_container("user-container-0"), user_container("user-container-1", None)]


def knative_pod(
    containers: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A revision pod as the ReplicaSet controller submits it (no name yet, generateName)."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "hello-00001-deployment-6d9f8c7b5-",
            "namespace": "default",
            "labels": {
                "app": "hello-00001",
                "pod-template-hash": "6d9f8c7b5",
                "serving.knative.dev/configuration": "hello",
                "serving.knative.dev/configurationGeneration": "1",
                "serving.knative.dev/configurationUID": "2f0c7d5e-4b8a-4f1e-9a53-6f4f0b6b1c11",
                "serving.knative.dev/revision": "hello-00001",
                "serving.knative.dev/revisionUID": "7d1c2b3a-5e6f-4a8b-9c0d-1e2f3a4b5c6d",
                "serving.knative.dev/service": "hello",
                "serving.knative.dev/serviceUID": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
                **(labels or {}),
            },
            "annotations": {"serving.knative.dev/creator": "admin", **(annotations or {})},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "hello-00001-deployment-6d9f8c7b5",
                    "uid": "0b8e0d55-8d8c-4c69-9d43-3e0f8f6c1b2a",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": containers
            if containers is not None
            else [user_container(), queue_proxy()],
            "enableServiceLinks": False,
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 300,
        },
    }
    if volumes is not None:
        pod["spec"]["volumes"] = volumes
    return pod


ISTIO_PROXY_IMAGE = "registry.invalid/istio/proxyv2@sha256:" + "c" * 64


def istio_injected(pod: dict[str, Any], *, native: bool = False) -> dict[str, Any]:
    """``pod`` as Istio's sidecar injector leaves it, built by hand (no Istio here) from the
    shape of Istio's injection template (manifests/charts/istio-control/istio-discovery/files/
    injection-template.yaml): an ``istio-init`` init container that writes the iptables rules
    redirecting the pod's traffic through the proxy (``istio-iptables``, NET_ADMIN/NET_RAW), and
    ``istio-proxy`` (envoy, user 1337, Prometheus port 15090, readiness ``/healthz/ready`` on
    15021) appended to the containers; the ``sidecar.istio.io/status`` annotation naming them.
    ``native``: with native sidecars on (ENABLE_NATIVE_SIDECARS), ``istio-proxy`` is an init
    container with ``restartPolicy: Always`` instead, after ``istio-init``.

    Every request to this pod (queue-proxy's included) passes through ``istio-proxy`` first:
    freeze it and nothing reaches queue-proxy or freeze-proxy again.
    """
    pod = json.loads(json.dumps(pod))
    init = {
        "name": "istio-init",
        "image": ISTIO_PROXY_IMAGE,
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                 "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"],
        "securityContext": {
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
        },
    }  # fmt: skip
    proxy: dict[str, Any] = {
        "name": "istio-proxy",
        "image": ISTIO_PROXY_IMAGE,
        "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
        "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True},
    }
    spec = pod["spec"]
    if native:
        proxy["restartPolicy"] = "Always"
        spec["initContainers"] = [*spec.get("initContainers", []), init, proxy]
    else:
        spec["initContainers"] = [*spec.get("initContainers", []), init]
        spec["containers"] = [*spec["containers"], proxy]
    status = {
        "initContainers": ["istio-init", *(["istio-proxy"] if native else [])],
        "containers": [] if native else ["istio-proxy"],
        "volumes": ["istio-envoy", "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"],
    }
    pod["metadata"]["annotations"]["sidecar.istio.io/status"] = json.dumps(status)
    pod["metadata"]["labels"]["security.istio.io/tlsMode"] = "istio"
    return pod
