"""containerd backend: find containers through CRI v1, pause/resume them through the Tasks API.

CRI is how kubelet names things (pod UID and container name labels), the Tasks API is the only
containerd API that pauses (CRI has no pause call). Both are served on containerd's one socket;
one grpc.aio channel is used for the whole process. Container ids are cached per pod UID, since
the lookup costs two CRI calls and ids only change when a container restarts, which shows up as
NOT_FOUND on the next Tasks call (and triggers one refresh).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from daemon._proto import cri_pb2, cri_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from . import NEVER_FROZEN, ContainerNotFound, ListedContainer, RuntimeFailure

POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"  # where the CRI plugin keeps kubelet's containers

# What containerd 1.6 (runc shim) answers when the task already is in the wanted state.
_ALREADY_PAUSED = ("cannot pause a paused container", "already paused")
_ALREADY_RUNNING = ("cannot resume a running process", "not paused")

_HINTS: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "is containerd running and is --containerd-socket right?",
    grpc.StatusCode.PERMISSION_DENIED: "the daemon needs root (or write access to the socket)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "containerd did not answer in time: overloaded or hung?",
    grpc.StatusCode.UNIMPLEMENTED: (
        "does this containerd serve CRI v1 and the Tasks API (containerd >= 1.6, cri plugin on)?"
    ),
    grpc.StatusCode.FAILED_PRECONDITION: "is the containerd namespace right (k8s.io for CRI)?",
}

# Quick reconnects: when containerd restarts, calls should work again within a second,
# not after gRPC's default backoff of up to two minutes.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class _Stale(Exception):
    """A cached container id is gone (NOT_FOUND from Tasks): the container was replaced."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name, detail)
        self.name = name
        self.detail = detail


def _failure(what: str, err: grpc.aio.AioRpcError) -> RuntimeFailure:
    """A RuntimeFailure that says what failed, containerd's code and message, and a hint."""
    code = err.code()
    msg = f"containerd {what}: {code.name}: {err.details()}"
    hint = _HINTS.get(code)
    return RuntimeFailure(f"{msg} ({hint})" if hint else msg)


class ContainerdRuntime:
    """The Runtime protocol over containerd's CRI v1 and Tasks gRPC APIs."""

    def __init__(
        self,
        socket: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = 10.0,
        cache_size: int = 4096,
        cache_ttl: float = 60.0,
    ) -> None:
        self.socket = os.path.abspath(os.fspath(socket))
        self.namespace = namespace
        self.timeout = timeout
        self._metadata = (("containerd-namespace", namespace),)
        # pod UID -> (when looked up, container name -> id); LRU-bounded. The TTL bounds how long
        # a default set can miss a container started after the lookup (a cold lookup is ~1 ms).
        self._cache: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl
        self._channel: grpc.aio.Channel | None = None
        self._cri: Any = None
        self._tasks: Any = None

    # -- plumbing ----------------------------------------------------------------------------

    def _stubs(self) -> tuple[Any, Any]:
        """Create the channel on first use, inside the event loop that will use it."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket}", options=_CHANNEL_OPTIONS
            )
            self._cri = cri_pb2_grpc.RuntimeServiceStub(self._channel)
            self._tasks = tasks_pb2_grpc.TasksStub(self._channel)
        return self._cri, self._tasks

    async def close(self) -> None:
        """Close the channel; a later call opens a new one."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)

    def forget(self, pod_uid: str) -> None:
        """Drop a pod's cached container ids (e.g. when the pod is deleted)."""
        self._cache.pop(pod_uid, None)

    # -- CRI lookup --------------------------------------------------------------------------

    async def _list_running(self, pod_uid: str) -> dict[str, str]:
        """Container name -> id of the running containers of the pod's ready sandbox(es)."""
        cri, _ = self._stubs()
        try:
            sandboxes = await cri.ListPodSandbox(
                cri_pb2.ListPodSandboxRequest(
                    filter=cri_pb2.PodSandboxFilter(
                        state=cri_pb2.PodSandboxStateValue(state=cri_pb2.SANDBOX_READY),
                        label_selector={POD_UID_LABEL: pod_uid},
                    )
                ),
                timeout=self.timeout,
            )
            found: dict[str, tuple[int, str]] = {}
            for sandbox in sandboxes.items:
                listed = await cri.ListContainers(
                    cri_pb2.ListContainersRequest(
                        filter=cri_pb2.ContainerFilter(
                            pod_sandbox_id=sandbox.id,
                            state=cri_pb2.ContainerStateValue(state=cri_pb2.CONTAINER_RUNNING),
                        )
                    ),
                    timeout=self.timeout,
                )
                for c in listed.containers:
                    name = c.labels.get(CONTAINER_NAME_LABEL) or c.metadata.name
                    # Two running containers of one name (a restart in flight): newest wins.
                    if name not in found or c.created_at > found[name][0]:
                        found[name] = (c.created_at, c.id)
        except grpc.aio.AioRpcError as err:
            raise _failure(f"CRI lookup of pod {pod_uid}", err) from None
        return {name: cid for name, (_, cid) in found.items()}

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        """Container name -> id for the named containers (all but NEVER_FROZEN when empty).

        Served from the cache unless ``refresh``, the entry is older than ``cache_ttl`` or a
        requested name is missing from it.
        Raises ContainerNotFound when the pod or a named container is not running here.
        """
        if not pod_uid:
            raise ContainerNotFound("empty pod UID")
        now = asyncio.get_running_loop().time()
        entry = None if refresh else self._cache.get(pod_uid)
        if (
            entry is not None
            and now - entry[0] < self._cache_ttl
            and all(n in entry[1] for n in containers)
        ):
            self._cache.move_to_end(pod_uid)
            running = entry[1]
        else:
            running = await self._list_running(pod_uid)
            if not running:
                self.forget(pod_uid)
                raise ContainerNotFound(f"no running pod with UID {pod_uid} on this node")
            self._cache[pod_uid] = (now, running)
            self._cache.move_to_end(pod_uid)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if containers:
            missing = [n for n in dict.fromkeys(containers) if n not in running]
            if missing:
                raise ContainerNotFound(
                    f"pod {pod_uid} has no running container named "
                    f"{', '.join(repr(n) for n in missing)} "
                    f"(running: {', '.join(sorted(running)) or 'none'})"
                )
            return {n: running[n] for n in dict.fromkeys(containers)}
        chosen = {n: cid for n, cid in sorted(running.items()) if n not in NEVER_FROZEN}
        if not chosen:
            raise ContainerNotFound(
                f"pod {pod_uid} has no container to freeze "
                f"(running: {', '.join(sorted(running))}; never frozen: "
                f"{', '.join(sorted(NEVER_FROZEN))})"
            )
        return chosen

    # -- Tasks -------------------------------------------------------------------------------

    async def _task_call(
        self, verb: str, name: str, container_id: str, ok_when: Sequence[str]
    ) -> None:
        _, tasks = self._stubs()
        if verb == "pause":
            call: Callable[..., Awaitable[Any]] = tasks.Pause
            request: Any = tasks_pb2.PauseTaskRequest(container_id=container_id)
        else:
            call = tasks.Resume
            request = tasks_pb2.ResumeTaskRequest(container_id=container_id)
        try:
            await call(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            details = err.details() or ""
            if any(s in details for s in ok_when):
                return  # already in the wanted state
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise _Stale(name, details) from None
            raise _failure(f"{verb} of container {name} ({container_id[:12]})", err) from None

    async def _each(self, verb: str, targets: Mapping[str, str], ok_when: Sequence[str]) -> None:
        """Run the call on every container at once; let all finish before raising."""
        results = await asyncio.gather(
            *(self._task_call(verb, n, cid, ok_when) for n, cid in targets.items()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors:
            if not isinstance(e, Exception):
                raise e  # cancellation and the like
        stale = [e for e in errors if isinstance(e, _Stale)]
        others = [e for e in errors if not isinstance(e, _Stale)]
        if others:
            raise others[0]
        if stale:
            raise stale[0]

    async def _apply(
        self, verb: str, pod_uid: str, containers: Sequence[str], ok_when: Sequence[str]
    ) -> list[str]:
        targets = await self.lookup(pod_uid, containers)
        try:
            await self._each(verb, targets, ok_when)
        except _Stale:
            # A container was replaced since the lookup: look again once, then give up.
            targets = await self.lookup(pod_uid, containers, refresh=True)
            try:
                await self._each(verb, targets, ok_when)
            except _Stale as stale:
                self.forget(pod_uid)
                raise ContainerNotFound(
                    f"container {stale.name} of pod {pod_uid} is gone: {stale.detail}"
                ) from None
        return list(targets)

    async def pause(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Freeze the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply("pause", pod_uid, containers, _ALREADY_PAUSED)

    async def resume(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Thaw the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply("resume", pod_uid, containers, _ALREADY_RUNNING)

    async def list_containers(self) -> list[ListedContainer]:
        """Every CRI container of this node with its task's state: one CRI ``ListContainers``
        and one Tasks ``List`` (a container without a task is listed as STOPPED)."""
        cri, tasks = self._stubs()
        try:
            listed = await cri.ListContainers(
                cri_pb2.ListContainersRequest(filter=cri_pb2.ContainerFilter()),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _failure("CRI listing of the node's containers", err) from None
        try:
            got = await tasks.List(
                tasks_pb2.ListTasksRequest(), metadata=self._metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            raise _failure("listing of the node's tasks", err) from None
        # containerd fills only ``id`` in a listing: a container's init process has its id.
        status = {t.container_id or t.id: str(tasks_pb2.Status.Name(t.status)) for t in got.tasks}
        return [
            ListedContainer(
                pod_uid=c.labels.get(POD_UID_LABEL, ""),
                pod_name=c.labels.get(POD_NAME_LABEL, ""),
                namespace=c.labels.get(POD_NAMESPACE_LABEL, ""),
                name=c.labels.get(CONTAINER_NAME_LABEL) or c.metadata.name,
                container_id=c.id,
                status=status.get(c.id, "STOPPED"),
            )
            for c in listed.containers
        ]

    async def resume_container(self, container_id: str) -> None:
        """Thaw one container by id (running already: fine; gone: ContainerNotFound)."""
        try:
            await self._task_call("resume", container_id[:12], container_id, _ALREADY_RUNNING)
        except _Stale as stale:
            raise ContainerNotFound(f"no task {container_id}: {stale.detail}") from None

    async def task_status(self, container_id: str) -> str:
        """The task's state per containerd: RUNNING, PAUSED, PAUSING, STOPPED, CREATED..."""
        _, tasks = self._stubs()
        try:
            got = await tasks.Get(
                tasks_pb2.GetRequest(container_id=container_id),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise ContainerNotFound(f"no task {container_id}: {err.details()}") from None
            raise _failure(f"status of task {container_id[:12]}", err) from None
        return str(tasks_pb2.Status.Name(got.process.status))
