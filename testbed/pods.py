"""Pods made the way kubelet makes them, through CRI, on a test-bed containerd.

The daemon finds containers by the labels and cgroup layout kubelet uses, so the test bed sets
exactly those (pod UID/name/namespace labels, ``io.kubernetes.container.name``, cgroupfs parent
``/kubepods/besteffort/pod<uid>``, host network, CRI log files). Async (grpc.aio) because tests
and benchmarks are async; the cgroup and log readers are tiny sysfs/file reads.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from daemon._proto import cri_pb2, cri_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from .containerd import BESTEFFORT, CGROUP_ROOT, pod_cgroup_dirs
from .hostside import remove_cgroup_tree
from .oci import BUSYBOX_IMAGE_NAME

if TYPE_CHECKING:
    from .containerd import Containerd

POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CRI_TIMEOUT = 60.0

# A user container that prints a numbered line every 150 ms: its log shows whether it runs.
TICKER_COMMAND = (
    "/bin/sh",
    "-c",
    'i=0; while :; do i=$((i+1)); echo "tick $i"; usleep 150000; done',
)
SLEEPER_COMMAND = ("/bin/sleep", "2147483647")


@dataclass(frozen=True)
class ContainerSpec:
    """What kubelet would put in a ContainerConfig, reduced to what tests need."""

    name: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    image: str = BUSYBOX_IMAGE_NAME
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    cpu_quota: int = 0
    cpu_period: int = 0
    cpu_shares: int = 0
    memory_limit: int = 0  # bytes; 0: none
    # kubelet's default (shareProcessNamespace false): the container's own PID namespace.
    # Off, it joins the sandbox's, where a stop kills every process of the container.
    own_pid_namespace: bool = False

    def validate(self) -> None:
        """containerd accepts some nonsense (an empty image): reject it before it gets there."""
        if not _DNS_LABEL.match(self.name):
            raise ValueError(f"container name {self.name!r} is not a DNS label")
        if not self.image.strip():
            raise ValueError(f"container {self.name!r}: image must not be empty")
        if any(not isinstance(a, str) for a in (*self.command, *self.args)):
            raise ValueError(f"container {self.name!r}: command and args must be strings")
        if min(self.cpu_quota, self.cpu_period, self.cpu_shares, self.memory_limit) < 0:
            raise ValueError(f"container {self.name!r}: cpu settings must not be negative")


def ticker(name: str = "user-container", image: str = BUSYBOX_IMAGE_NAME) -> ContainerSpec:
    """The standard user container: one log line every 150 ms."""
    return ContainerSpec(name, command=TICKER_COMMAND, image=image)


def sleeper(name: str = "queue-proxy") -> ContainerSpec:
    """A container that only sleeps (stands in for queue-proxy)."""
    return ContainerSpec(name, command=SLEEPER_COMMAND)


def _ignore_not_found(err: grpc.aio.AioRpcError) -> None:
    if err.code() != grpc.StatusCode.NOT_FOUND:
        raise err


@dataclass
class Pod:
    """A running test pod: ids, specs and readers for its cgroups and logs."""

    client: PodClient
    uid: str
    name: str
    namespace: str
    sandbox_id: str
    sandbox_config: cri_pb2.PodSandboxConfig
    log_dir: Path
    containers: dict[str, str] = field(default_factory=dict)  # name -> container id
    specs: dict[str, ContainerSpec] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    removed: bool = False

    @property
    def cgroup_parent(self) -> str:
        return f"/{BESTEFFORT}/pod{self.uid}"

    def container_id(self, container_name: str) -> str:
        try:
            return self.containers[container_name]
        except KeyError:
            raise KeyError(f"pod {self.name} has no container {container_name!r}") from None

    def cgroup_dir(self, container_name: str, controller: str = "freezer") -> Path:
        """The container's v1 cgroup dir for one controller (cgroupfs driver layout)."""
        rel = f"{self.cgroup_parent}/{self.container_id(container_name)}".lstrip("/")
        return CGROUP_ROOT / controller / rel

    def freezer_state(self, container_name: str) -> str:
        """FROZEN, FREEZING or THAWED, as the kernel says."""
        return (self.cgroup_dir(container_name) / "freezer.state").read_text().strip()

    async def wait_frozen(
        self, container_name: str, timeout: float = 20.0, poll: float = 0.02, hint: str = ""
    ) -> None:
        """Return once the kernel says FROZEN; RuntimeError (ending with ``hint``) after
        ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.freezer_state(container_name) != "FROZEN":
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{container_name} was not frozen within {timeout:.0f} s{hint}")
            await asyncio.sleep(poll)

    def cpu_usage_seconds(self, container_name: str) -> float:
        """CPU time the container has used (cpuacct.usage)."""
        usage = self.cgroup_dir(container_name, "cpuacct") / "cpuacct.usage"
        return int(usage.read_text()) / 1e9

    def log_path(self, container_name: str) -> Path:
        return self.log_dir / container_name / f"{self.attempts[container_name]}.log"

    def log_lines(self, container_name: str) -> list[str]:
        """Messages of the container's current CRI log (timestamp/stream/tag stripped)."""
        try:
            text = self.log_path(container_name).read_text(errors="replace")
        except FileNotFoundError:
            return []
        out: list[str] = []
        for line in text.splitlines():
            parts = line.split(" ", 3)  # <RFC3339Nano> <stdout|stderr> <F|P> <message>
            out.append(parts[3] if len(parts) == 4 else "")
        return out

    async def task_status(self, container_name: str) -> str:
        """RUNNING, PAUSED, ... from the Tasks API (CRI says RUNNING even when paused)."""
        return await self.client.task_status(self.container_id(container_name))

    async def pause(self, container_name: str) -> None:
        """Pause one container through the Tasks API, as something other than our daemon
        would (the pod's removal thaws it first)."""
        await self.client.tasks.Pause(
            tasks_pb2.PauseTaskRequest(container_id=self.container_id(container_name)),
            metadata=self.client.metadata,
            timeout=_CRI_TIMEOUT,
        )

    async def add_container(self, spec: ContainerSpec) -> str:
        """Start one more container in this pod (e.g. after a runtime cached the pod)."""
        return await self.client.add_container(self, spec)

    async def replace_container(self, container_name: str) -> str:
        """Do what kubelet does when a container restarts: a new container, new id."""
        return await self.client.replace_container(self, container_name)

    async def wait_exited(self, container_name: str, timeout: float = 20.0) -> None:
        """Return once CRI reports the container exited (its processes died): kubelet restarts
        a container only after it saw that (PLEG), and before containerd has handled the exit
        event its StopContainer/RemoveContainer of the dead container may fail."""
        deadline = asyncio.get_running_loop().time() + timeout
        while await self.client.container_state(self.container_id(container_name)) != "EXITED":
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{container_name} not reported exited within {timeout:.0f} s")
            await asyncio.sleep(0.02)

    async def remove(self) -> None:
        """Stop and remove every container and the sandbox, then the pod cgroups. Idempotent."""
        if not self.removed:
            await self.client.remove_pod(self)
            self.removed = True


class MakePod(Protocol):
    """What the ``make_pod`` test fixture is: a user-container pod, optionally more."""

    async def __call__(
        self,
        *,
        queue_proxy: bool = False,
        extra: Sequence[ContainerSpec] = (),
        name: str | None = None,
    ) -> Pod: ...


class PodClient:
    """Creates and removes pods on one test-bed containerd over CRI (grpc.aio).

    Make it inside the event loop that will use it (grpc.aio channels bind to their loop).
    """

    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self.namespace = containerd.namespace
        self._channel = grpc.aio.insecure_channel(containerd.address)
        self.cri = cri_pb2_grpc.RuntimeServiceStub(self._channel)
        self.tasks = tasks_pb2_grpc.TasksStub(self._channel)
        self.pods: list[Pod] = []

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("containerd-namespace", self.namespace),)

    async def create_pod(
        self,
        containers: Sequence[ContainerSpec],
        *,
        name: str | None = None,
        namespace: str = "default",
        uid: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Pod:
        """RunPodSandbox, then CreateContainer + StartContainer for each spec, in order."""
        if not containers:
            raise ValueError("a pod needs at least one container")
        for spec in containers:
            spec.validate()
        names = [c.name for c in containers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate container names: {names}")
        uid = uid or str(uuid.uuid4())
        name = name or f"testpod-{uid[:8]}"
        for what, value in (("pod name", name), ("namespace", namespace)):
            if not _DNS_LABEL.match(value):
                raise ValueError(f"{what} {value!r} is not a DNS label")
        self.containerd.pod_uids.add(uid)  # stop() cleans its cgroups even if we fail here
        log_dir = self.containerd.log_root / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        config = cri_pb2.PodSandboxConfig(
            metadata=cri_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
            hostname="",  # must stay empty with host network (no private UTS namespace)
            log_directory=str(log_dir),
            labels={
                **(labels or {}),
                POD_UID_LABEL: uid,
                POD_NAME_LABEL: name,
                POD_NAMESPACE_LABEL: namespace,
            },
            annotations=dict(annotations or {}),
            linux=cri_pb2.LinuxPodSandboxConfig(
                cgroup_parent=f"/{BESTEFFORT}/pod{uid}",
                security_context=cri_pb2.LinuxSandboxSecurityContext(
                    namespace_options=cri_pb2.NamespaceOption(network=cri_pb2.NODE)
                ),
            ),
        )
        resp = await self.cri.RunPodSandbox(
            cri_pb2.RunPodSandboxRequest(config=config), timeout=_CRI_TIMEOUT
        )
        pod = Pod(self, uid, name, namespace, resp.pod_sandbox_id, config, log_dir)
        self.pods.append(pod)
        try:
            for spec in containers:
                await self._start_container(pod, spec, attempt=0)
        except BaseException:
            await pod.remove()
            raise
        return pod

    async def _start_container(self, pod: Pod, spec: ContainerSpec, attempt: int) -> str:
        (pod.log_dir / spec.name).mkdir(parents=True, exist_ok=True)
        config = cri_pb2.ContainerConfig(
            metadata=cri_pb2.ContainerMetadata(name=spec.name, attempt=attempt),
            image=cri_pb2.ImageSpec(image=spec.image),
            command=list(spec.command),
            args=list(spec.args),
            working_dir=spec.working_dir,
            envs=[cri_pb2.KeyValue(key=k, value=v) for k, v in spec.env.items()],
            labels={
                CONTAINER_NAME_LABEL: spec.name,
                POD_UID_LABEL: pod.uid,
                POD_NAME_LABEL: pod.name,
                POD_NAMESPACE_LABEL: pod.namespace,
            },
            log_path=f"{spec.name}/{attempt}.log",
            linux=cri_pb2.LinuxContainerConfig(
                resources=cri_pb2.LinuxContainerResources(
                    cpu_quota=spec.cpu_quota,
                    cpu_period=spec.cpu_period,
                    cpu_shares=spec.cpu_shares,
                    memory_limit_in_bytes=spec.memory_limit,
                ),
                security_context=cri_pb2.LinuxContainerSecurityContext(
                    namespace_options=cri_pb2.NamespaceOption(
                        network=cri_pb2.NODE,
                        pid=cri_pb2.CONTAINER if spec.own_pid_namespace else cri_pb2.POD,
                    )
                ),
            ),
        )
        created = await self.cri.CreateContainer(
            cri_pb2.CreateContainerRequest(
                pod_sandbox_id=pod.sandbox_id, config=config, sandbox_config=pod.sandbox_config
            ),
            timeout=_CRI_TIMEOUT,
        )
        cid: str = created.container_id
        pod.containers[spec.name] = cid
        pod.specs[spec.name] = spec
        pod.attempts[spec.name] = attempt
        await self.cri.StartContainer(
            cri_pb2.StartContainerRequest(container_id=cid), timeout=_CRI_TIMEOUT
        )
        return cid

    async def add_container(self, pod: Pod, spec: ContainerSpec) -> str:
        """Create and start one more container in a running pod; return its id."""
        spec.validate()
        if spec.name in pod.containers:
            raise ValueError(f"pod {pod.name} already has a container {spec.name!r}")
        return await self._start_container(pod, spec, attempt=0)

    async def replace_container(self, pod: Pod, container_name: str) -> str:
        """Stop and remove one container, then start a new attempt of it; return the new id."""
        old = pod.container_id(container_name)
        await self._remove_container(old)
        return await self._start_container(
            pod, pod.specs[container_name], attempt=pod.attempts[container_name] + 1
        )

    async def container_state(self, container_id: str) -> str:
        """CREATED, RUNNING, EXITED or UNKNOWN, as CRI reports it (without CONTAINER_)."""
        got = await self.cri.ContainerStatus(
            cri_pb2.ContainerStatusRequest(container_id=container_id), timeout=_CRI_TIMEOUT
        )
        return str(cri_pb2.ContainerState.Name(got.status.state)).removeprefix("CONTAINER_")

    async def task_status(self, container_id: str) -> str:
        got = await self.tasks.Get(
            tasks_pb2.GetRequest(container_id=container_id),
            metadata=self.metadata,
            timeout=_CRI_TIMEOUT,
        )
        return str(tasks_pb2.Status.Name(got.process.status))

    async def _thaw(self, container_id: str) -> None:
        """A frozen container ignores SIGTERM until thawed: resume it before stopping."""
        try:
            if await self.task_status(container_id) in ("PAUSED", "PAUSING"):
                await self.tasks.Resume(
                    tasks_pb2.ResumeTaskRequest(container_id=container_id),
                    metadata=self.metadata,
                    timeout=_CRI_TIMEOUT,
                )
        except grpc.aio.AioRpcError as err:
            _ignore_not_found(err)

    async def _remove_container(self, container_id: str, stop_timeout: int = 0) -> None:
        await self._thaw(container_id)
        try:
            await self.cri.StopContainer(
                cri_pb2.StopContainerRequest(container_id=container_id, timeout=stop_timeout),
                timeout=_CRI_TIMEOUT + stop_timeout,
            )
            await self.cri.RemoveContainer(
                cri_pb2.RemoveContainerRequest(container_id=container_id), timeout=_CRI_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            _ignore_not_found(err)

    async def remove_pod(self, pod: Pod, stop_timeout: int = 0) -> None:
        """kubelet's order: containers, then the sandbox; then the pod cgroups kubelet owns."""
        await asyncio.gather(
            *(self._remove_container(cid, stop_timeout) for cid in pod.containers.values())
        )
        for call, request in (
            (self.cri.StopPodSandbox, cri_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id)),
            (
                self.cri.RemovePodSandbox,
                cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
            ),
        ):
            try:
                await call(request, timeout=_CRI_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                _ignore_not_found(err)
        for d in pod_cgroup_dirs(pod.uid):
            await asyncio.to_thread(remove_cgroup_tree, d)
        if pod in self.pods:
            self.pods.remove(pod)

    async def close(self, remove_pods: bool = True) -> None:
        """Remove the pods this client made (unless told not to) and close the channel."""
        try:
            if remove_pods:
                for pod in list(self.pods):
                    await pod.remove()
        finally:
            await self._channel.close(None)
