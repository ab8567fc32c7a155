"""freeze-proxy on a cluster the way an operator installs and uses it (tests and the demo).

``overlay()`` writes a kustomization over ``config/`` that only renames our images to locally
built ones and points the DaemonSet at the node's containerd socket: what a user of a private
registry, or of a distribution with its own socket path (k3s:
``/run/k3s/containerd/containerd.sock``), writes. ``install()`` labels the node and runs
``kubectl apply -k``; ``example()`` is ``config/example/sleeptalker.yaml`` with a local image.
The pod helpers read what a user would look at: pod status, ``kubectl logs``, the freezer cgroup.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from .cluster import CGROUP_ROOT, NODE_NAME, Cluster
from .images import IMAGES, UPSTREAM_REGISTRY

ROOT: Final = Path(__file__).resolve().parent.parent
FREEZER: Final = Path("/sys/fs/cgroup/freezer") / CGROUP_ROOT
NAMESPACE: Final = "knative-serving"
DAEMONSET: Final = "freeze-daemon-containerd"
WEBHOOK: Final = "freezer-webhook"
WEBHOOK_CONFIGURATION: Final = "webhook.freeze.extensions.knative.dev"
_T = TypeVar("_T")


def until(what: str, check: Callable[[], _T | None], timeout: float, every: float = 0.5) -> _T:
    """``check()``'s first truthy value, polled every ``every`` s; AssertionError after
    ``timeout`` s (the state lives in another process: there is nothing to await)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def overlay(directory: Path, refs: Mapping[str, str], containerd_socket: Path) -> Path:
    """A kustomization in ``directory`` over config/ (named by a relative path: kustomize loads
    resources relative to the kustomization, and refuses absolute ones)."""
    images = []
    for name in ("proxy", "daemon", "webhook"):
        repo, tag = refs[name].rsplit(":", 1)
        images.append(
            {"name": f"{UPSTREAM_REGISTRY}/{IMAGES[name]}", "newName": repo, "newTag": tag}
        )
    patch = [
        {
            "op": "replace",
            "path": "/spec/template/spec/volumes/0/hostPath/path",
            "value": str(containerd_socket),
        }
    ]
    directory.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "config", directory.resolve())],
        "images": images,
        "patches": [
            {"target": {"kind": "DaemonSet", "name": DAEMONSET}, "patch": json.dumps(patch)}
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def install(cluster: Cluster, kustomization: Path) -> None:
    """The README's install: label the node, ``kubectl apply -k``, wait for the rollouts."""
    cluster.kubectl(
        "label", "node", NODE_NAME, "knative.dev/container-runtime=containerd", "--overwrite"
    )
    cluster.kubectl("apply", "-k", str(kustomization))
    cluster.kubectl(
        "-n", NAMESPACE, "rollout", "status", f"daemonset/{DAEMONSET}", "--timeout=120s",
        timeout=150,
    )  # fmt: skip
    cluster.wait_available(NAMESPACE, WEBHOOK, timeout=120)


def example(image: str) -> dict[str, Any]:
    """config/example/sleeptalker.yaml as shipped, with ``image``."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "config/example/sleeptalker.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = image
    return doc


def service(name: str, image: str, annotations: Mapping[str, str]) -> dict[str, Any]:
    """A Knative Service of sleeptalker, as a user writes it."""
    container = {"image": image, "env": [{"name": "TICK_INTERVAL", "value": "0.5"}]}
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {
                "metadata": {"annotations": dict(annotations)},
                "spec": {"containers": [container]},
            }
        },
    }


def deploy(cluster: Cluster, ksvc: Mapping[str, Any], timeout: float = 180) -> dict[str, Any]:
    """Apply a Knative Service, wait until its revision is Ready; its Ready pod.

    Not the Service's own Ready: without a networking layer (Kourier, Istio, Contour: all need
    Envoy) its Route stays ``IngressNotConfigured``; ``ConfigurationsReady`` is its revision's.
    """
    cluster.apply([ksvc])
    name = ksvc["metadata"]["name"]
    cluster.kubectl(
        "wait", "--for=condition=ConfigurationsReady", f"ksvc/{name}",
        f"--timeout={int(timeout)}s", timeout=timeout + 20,
    )  # fmt: skip
    return ready_pod(cluster, name)


def pods(cluster: Cluster, service_name: str) -> list[dict[str, Any]]:
    got = cluster.get_json(
        "pods", "-n", "default", "-l", f"serving.knative.dev/service={service_name}"
    )
    return list(got["items"])


def is_ready(pod: Mapping[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return bool(statuses) and all(s.get("ready") for s in statuses)


def ready_pod(cluster: Cluster, service_name: str, timeout: float = 120) -> dict[str, Any]:
    def one() -> dict[str, Any] | None:
        live = [
            p
            for p in pods(cluster, service_name)
            if is_ready(p) and "deletionTimestamp" not in p["metadata"]
        ]
        return live[0] if live else None

    return until(f"a Ready pod of {service_name}", one, timeout)


def refresh(cluster: Cluster, pod: Mapping[str, Any]) -> dict[str, Any]:
    got: dict[str, Any] = cluster.get_json(
        "pod", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"]
    )
    return got


def container_id(pod: Mapping[str, Any], name: str) -> str:
    for s in pod["status"]["containerStatuses"]:
        if s["name"] == name:
            return str(s["containerID"]).split("://", 1)[1]
    raise AssertionError(f"no container {name} in pod {pod['metadata']['name']}")


def freezer_dir(pod: Mapping[str, Any], container: str = "user-container") -> Path:
    """The container's v1 freezer cgroup under the kubelet's cgroup root."""
    cid = container_id(pod, container)
    found = [p.parent for p in FREEZER.glob(f"kubepods/**/{cid}/freezer.state")]
    if len(found) != 1:
        raise AssertionError(f"freezer cgroup of {container} ({cid}) not found: {found}")
    return found[0]


def freezer_state(pod: Mapping[str, Any], container: str = "user-container") -> str:
    """The kernel's word on it: FROZEN, FREEZING or THAWED."""
    return (freezer_dir(pod, container) / "freezer.state").read_text().strip()


def cpu_seconds(pod: Mapping[str, Any], container: str = "user-container") -> float:
    cpuacct = Path(str(freezer_dir(pod, container)).replace("/freezer/", "/cpuacct/", 1))
    return int((cpuacct / "cpuacct.usage").read_text()) / 1e9


def ticks(cluster: Cluster, pod: Mapping[str, Any], container: str = "user-container") -> int:
    """The app's ``tick`` lines so far, from ``kubectl logs``."""
    logs = cluster.kubectl(
        "logs", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", container
    )
    return sum(1 for line in logs.stdout.splitlines() if line.startswith("tick "))


def get(url: str, host: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One GET from the node (host network); (status, body) without raising on HTTP errors."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def queue_proxy_url(pod: Mapping[str, Any], query: str = "?sleep=0") -> str:
    """queue-proxy's serving port on the pod IP: what the activator or an ingress calls."""
    return f"http://{pod['status']['podIP']}:8012/{query}"


def revision_route(cluster: Cluster, pod: Mapping[str, Any]) -> tuple[str, str]:
    """(URL, Host header) of the pod's revision Service: the activator routes on the Host."""
    rev = pod["metadata"]["labels"]["serving.knative.dev/revision"]
    ip = cluster.get_json("service", "-n", pod["metadata"]["namespace"], rev)["spec"]["clusterIP"]
    return f"http://{ip}/", f"{rev}.{pod['metadata']['namespace']}.svc.cluster.local"
