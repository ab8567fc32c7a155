"""containerd backend: find containers through CRI v1, pause/resume them through the Tasks API.

CRI is how kubelet names things (pod UID and container name labels), the Tasks API is the only
containerd API that pauses (CRI has no pause call). Both are served on containerd's one socket;
one grpc.aio channel is used for the whole process. Container ids are cached per pod UID
(daemon.runtimes.cri); a replaced container shows up as NOT_FOUND on the next Tasks call (and
triggers one refresh).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from daemon._proto import tasks_pb2, tasks_pb2_grpc

from . import ContainerNotFound, ListedContainer, RuntimeFailure, Stale, apply_to_pod
from .cri import (
    CONTAINER_NAME_LABEL,
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    CriLookup,
    cri_hints,
    rpc_failure,
)

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"  # where the CRI plugin keeps kubelet's containers

# What containerd 1.6 (runc shim) answers when the task already is in the wanted state.
_ALREADY_PAUSED = ("cannot pause a paused container", "already paused")
_ALREADY_RUNNING = ("cannot resume a running process", "not paused")

_HINTS: Mapping[grpc.StatusCode, str] = {
    **cri_hints("containerd", "--containerd-socket"),
    grpc.StatusCode.UNIMPLEMENTED: (
        "does this containerd serve CRI v1 and the Tasks API (containerd >= 1.6, cri plugin on)?"
    ),
    grpc.StatusCode.FAILED_PRECONDITION: "is the containerd namespace right (k8s.io for CRI)?",
}


def _failure(what: str, err: grpc.aio.AioRpcError) -> RuntimeFailure:
    """A RuntimeFailure that says what failed, containerd's code and message, and a hint."""
    return rpc_failure("containerd", what, err, _HINTS)


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
        self._cri_lookup = CriLookup(
            socket,
            runtime="containerd",
            socket_flag="--containerd-socket",
            timeout=timeout,
            cache_size=cache_size,
            cache_ttl=cache_ttl,
        )
        self._cri_lookup.hints = dict(_HINTS)
        self.socket = self._cri_lookup.socket
        self.namespace = namespace
        self.timeout = timeout
        self._metadata = (("containerd-namespace", namespace),)
        self._tasks: Any = None
        self._tasks_channel: grpc.aio.Channel | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def _stubs(self) -> tuple[Any, Any]:
        """CRI and Tasks stubs on the one channel, created on first use inside the event loop."""
        channel = self._cri_lookup.channel()
        if self._tasks is None or self._tasks_channel is not channel:
            self._tasks = tasks_pb2_grpc.TasksStub(channel)
            self._tasks_channel = channel
        return self._cri_lookup.stub(), self._tasks

    async def close(self) -> None:
        """Close the channel; a later call opens a new one."""
        await self._cri_lookup.close()

    def forget(self, pod_uid: str) -> None:
        """Drop a pod's cached container ids (e.g. when the pod is deleted)."""
        self._cri_lookup.forget(pod_uid)

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        """Container name -> id for the named containers (all but NEVER_FROZEN when empty);
        see CriLookup.lookup."""
        return await self._cri_lookup.lookup(pod_uid, containers, refresh)

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
                raise Stale(name, details) from None
            raise _failure(f"{verb} of container {name} ({container_id[:12]})", err) from None

    async def _apply(
        self, verb: str, pod_uid: str, containers: Sequence[str], ok_when: Sequence[str]
    ) -> list[str]:
        async def call(name: str, container_id: str) -> None:
            await self._task_call(verb, name, container_id, ok_when)

        async def undo(name: str, container_id: str) -> None:
            await self._task_call("resume", name, container_id, _ALREADY_RUNNING)

        return await apply_to_pod(
            pod_uid, containers, self.lookup, self.forget, call, undo if verb == "pause" else None
        )

    async def pause(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Freeze the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply("pause", pod_uid, containers, _ALREADY_PAUSED)

    async def resume(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Thaw the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply("resume", pod_uid, containers, _ALREADY_RUNNING)

    async def list_containers(self) -> list[ListedContainer]:
        """Every CRI container of this node with its task's state: one CRI ``ListContainers``
        and one Tasks ``List`` (a container without a task is listed as STOPPED)."""
        _, tasks = self._stubs()
        listed = await self._cri_lookup.list_all()
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
            for c in listed
        ]

    async def resume_container(self, container_id: str) -> None:
        """Thaw one container by id (running already: fine; gone: ContainerNotFound)."""
        try:
            await self._task_call("resume", container_id[:12], container_id, _ALREADY_RUNNING)
        except Stale as stale:
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
