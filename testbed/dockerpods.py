"""Pods made the way cri-dockerd makes them, on the test bed's private dockerd.

The daemon's docker backend finds containers by cri-dockerd's labels, so the test bed sets
exactly those: a sandbox container ``k8s_POD_<pod>_<namespace>_<uid>_<attempt>`` labelled
``io.kubernetes.docker.type=podsandbox``, and one container per Kubernetes container
``k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`` labelled ``...type=container`` with the
pod's UID, name, namespace and the container's name, sharing the sandbox's network namespace.
Blocking (the docker CLI): this is test setup; the readers (inspect, log lines) are cheap.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .containerd import CGROUP_ROOT
from .docker import Dockerd
from .oci import BUSYBOX_DEFAULT_CMD, BUSYBOX_IMAGE_NAME, busybox_image
from .pods import SLEEPER_COMMAND, TICKER_COMMAND

POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
DOCKER_TYPE_LABEL = "io.kubernetes.docker.type"
SANDBOX_ID_LABEL = "io.kubernetes.sandbox.id"
SANDBOX = "POD"  # the container name cri-dockerd gives a sandbox


def load_busybox(engine: Dockerd, out_dir: Path, ref: str = BUSYBOX_IMAGE_NAME) -> str:
    """The test bed's busybox image (testbed.oci) in dockerd: its one layer ``docker import``-ed
    (Docker 20.10's ``load`` reads only its own archive format, not an OCI layout)."""
    if engine.has_image(ref):
        return ref
    _, oci_tar = busybox_image(out_dir)
    with tarfile.open(oci_tar) as oci, tempfile.TemporaryDirectory() as tmp:
        index = json.loads(_member(oci, "index.json"))
        manifest = json.loads(_member(oci, _blob(index["manifests"][0]["digest"])))
        (layer,) = manifest["layers"]
        rootfs = Path(tmp) / "rootfs.tar"
        rootfs.write_bytes(_member(oci, _blob(layer["digest"])))
        engine.run(
            "import", "--change", f"CMD {json.dumps(list(BUSYBOX_DEFAULT_CMD))}",
            str(rootfs), ref, timeout=120,
        )  # fmt: skip
    return ref


def _blob(digest: str) -> str:
    return f"blobs/{digest.replace(':', '/')}"


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise FileNotFoundError(f"{name} missing from {tar.name!r}")
    return member.read()


@dataclass(frozen=True)
class DockerContainer:
    """One container of a test pod: its name in the pod, its command, and what else it needs."""

    name: str
    command: Sequence[str] = SLEEPER_COMMAND
    image: str | None = None  # the pods' image when None
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Mapping[str, str] = field(default_factory=dict)  # host path -> path inside (read-only)


def ticker(name: str = "user-container") -> DockerContainer:
    """The app: prints a numbered line every 150 ms, so its log shows whether it runs."""
    return DockerContainer(name, TICKER_COMMAND)


def sleeper(name: str) -> DockerContainer:
    return DockerContainer(name, SLEEPER_COMMAND)


@dataclass
class DockerPod:
    """A pod as cri-dockerd leaves it in Docker: a sandbox and its containers, by name."""

    engine: Dockerd
    uid: str
    name: str
    namespace: str
    sandbox_id: str
    containers: dict[str, str] = field(default_factory=dict)  # name in the pod -> Docker id

    def container_id(self, name: str) -> str:
        return self.sandbox_id if name == SANDBOX else self.containers[name]

    def state(self, name: str) -> str:
        """Docker's own word: ``docker inspect``'s State.Status (running, paused, exited...)."""
        out = self.engine.run(
            "inspect", "--format", "{{.State.Status}} {{.State.Paused}}", self.container_id(name)
        ).stdout.split()
        status, paused = out[0], out[1] == "true"
        assert paused == (status == "paused"), out
        return status

    def freezer_state(self, name: str) -> str:
        """The kernel's word (cgroup v1 freezer): THAWED, FREEZING or FROZEN."""
        path = CGROUP_ROOT / "freezer" / self.engine.cgroup_parent / self.container_id(name)
        return (path / "freezer.state").read_text().strip()

    def log_lines(self, name: str) -> list[str]:
        """The container's output so far, from its json-file log (no CLI call: cheap)."""
        cid = self.container_id(name)
        path = self.engine.data_root / "containers" / cid / f"{cid}-json.log"
        try:
            return path.read_text().splitlines()
        except FileNotFoundError:
            return []


class DockerPods:
    """Creates cri-dockerd-style pods on one engine and removes them all on close()."""

    def __init__(self, engine: Dockerd, image: str = BUSYBOX_IMAGE_NAME) -> None:
        self.engine = engine
        self.image = image
        self.pods: list[DockerPod] = []

    def _labels(self, pod: DockerPod, extra: Mapping[str, str]) -> list[str]:
        labels = {
            POD_UID_LABEL: pod.uid,
            POD_NAME_LABEL: pod.name,
            POD_NAMESPACE_LABEL: pod.namespace,
            **extra,
        }
        return [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]

    def create_pod(
        self,
        containers: Sequence[DockerContainer],
        *,
        name: str | None = None,
        namespace: str = "default",
        attempt: int = 0,
        network: str = "none",
    ) -> DockerPod:
        """The sandbox (``--network none``, or ``host`` for an app reached from the host) and
        the containers in its network namespace, started in order."""
        uid = str(uuid.uuid4())
        name = name or f"pod-{uid[:8]}"
        pod = DockerPod(self.engine, uid, name, namespace, sandbox_id="")
        self.pods.append(pod)
        pod.sandbox_id = self.engine.run(
            "run", "-d", "--network", network,
            "--name", f"k8s_{SANDBOX}_{name}_{namespace}_{uid}_{attempt}",
            *self._labels(pod, {DOCKER_TYPE_LABEL: "podsandbox"}),
            self.image,
        ).stdout.strip()  # fmt: skip
        for c in containers:
            self.add_container(pod, c, attempt)
        return pod

    def add_container(self, pod: DockerPod, c: DockerContainer, attempt: int = 0) -> str:
        labels = {
            DOCKER_TYPE_LABEL: "container",
            CONTAINER_NAME_LABEL: c.name,
            SANDBOX_ID_LABEL: pod.sandbox_id,
        }
        cid = self.engine.run(
            "run", "-d", "--network", f"container:{pod.sandbox_id}", "--log-driver", "json-file",
            "--name", f"k8s_{c.name}_{pod.name}_{pod.namespace}_{pod.uid}_{attempt}",
            *self._labels(pod, labels),
            *(arg for k, v in c.env.items() for arg in ("--env", f"{k}={v}")),
            *(arg for src, dst in c.mounts.items() for arg in ("--volume", f"{src}:{dst}:ro")),
            c.image or self.image, *c.command,
        ).stdout.strip()  # fmt: skip
        pod.containers[c.name] = cid
        return cid

    def pause(self, pod: DockerPod, name: str) -> None:
        """Pause one container behind the daemon's back (as a dead daemon would leave it)."""
        self.engine.run("pause", pod.container_id(name))

    def remove(self, pod: DockerPod) -> None:
        ids = [*pod.containers.values(), *([pod.sandbox_id] if pod.sandbox_id else [])]
        if ids:
            # A paused container is killed by rm -f too (Docker unpauses it first).
            self.engine.run("rm", "-f", "-v", *ids, timeout=60)
        if pod in self.pods:
            self.pods.remove(pod)

    def close(self) -> None:
        for pod in list(self.pods):
            self.remove(pod)
