"""Finding kubelet's containers through CRI v1: the part every CRI runtime backend shares.

kubelet names things by pod UID and container name labels; CRI (served by containerd and CRI-O
alike) maps them to container ids. Ids are cached per pod UID: the lookup costs two CRI calls
and ids only change when a container restarts, which the caller notices (NOT_FOUND, a vanished
cgroup) and answers with one ``refresh``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from daemon._proto import cri_pb2, cri_pb2_grpc

from . import ContainerNotFound, PodCache, RuntimeFailure

POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"

# Quick reconnects: when the runtime restarts, calls should work again within a second,
# not after gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def rpc_failure(
    runtime: str, what: str, err: grpc.aio.AioRpcError, hints: Mapping[grpc.StatusCode, str]
) -> RuntimeFailure:
    """A RuntimeFailure that says what failed, the runtime's code and message, and a hint."""
    code = err.code()
    msg = f"{runtime} {what}: {code.name}: {err.details()}"
    hint = hints.get(code)
    return RuntimeFailure(f"{msg} ({hint})" if hint else msg)


def cri_hints(runtime: str, socket_flag: str) -> dict[grpc.StatusCode, str]:
    return {
        grpc.StatusCode.UNAVAILABLE: f"is {runtime} running and is {socket_flag} right?",
        grpc.StatusCode.PERMISSION_DENIED: "the daemon needs root (or write access to the socket)",
        grpc.StatusCode.DEADLINE_EXCEEDED: f"{runtime} did not answer in time: overloaded or hung?",
        grpc.StatusCode.UNIMPLEMENTED: f"does this {runtime} serve CRI v1 (runtime.v1)?",
    }


def cgroups_path_of(info: Mapping[str, str]) -> str:
    """``linux.cgroupsPath`` of the OCI spec in a verbose ContainerStatus ``info`` map.

    containerd and CRI-O both put their JSON under ``info["info"]``, the spec at ``runtimeSpec``.
    Raises ValueError naming what is missing.
    """
    raw = info.get("info")
    if not raw:
        raise ValueError(f"no 'info' in the verbose status (keys: {', '.join(info) or 'none'})")
    try:
        spec = json.loads(raw)["runtimeSpec"]
        path = spec["linux"]["cgroupsPath"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no runtimeSpec.linux.cgroupsPath in the verbose status: {e!r}") from e
    if not isinstance(path, str) or not path:
        raise ValueError(f"runtimeSpec.linux.cgroupsPath is empty or not a string: {path!r}")
    return path


class CriLookup:
    """Pod UID + container names → running container ids over one grpc.aio channel."""

    def __init__(
        self,
        socket: str | os.PathLike[str],
        *,
        runtime: str,
        socket_flag: str,
        timeout: float = 10.0,
        cache_size: int = 4096,
        cache_ttl: float = 60.0,
    ) -> None:
        self.socket = os.path.abspath(os.fspath(socket))
        self.runtime = runtime
        self.timeout = timeout
        self.hints = cri_hints(runtime, socket_flag)
        self._cache = PodCache(cache_size, cache_ttl)
        self._channel: grpc.aio.Channel | None = None
        self._cri: Any = None

    def channel(self) -> grpc.aio.Channel:
        """The channel, created on first use inside the event loop that will use it."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket}", options=CHANNEL_OPTIONS
            )
            self._cri = cri_pb2_grpc.RuntimeServiceStub(self._channel)
        return self._channel

    def stub(self) -> Any:
        self.channel()
        return self._cri

    async def close(self) -> None:
        """Close the channel; a later call opens a new one."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)

    def forget(self, pod_uid: str) -> None:
        """Drop a pod's cached container ids (e.g. when the pod is deleted)."""
        self._cache.forget(pod_uid)

    def failure(self, what: str, err: grpc.aio.AioRpcError) -> RuntimeFailure:
        return rpc_failure(self.runtime, what, err, self.hints)

    async def _list_running(self, pod_uid: str) -> dict[str, str]:
        """Container name -> id of the running containers of the pod's ready sandbox(es)."""
        cri = self.stub()
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
            raise self.failure(f"CRI lookup of pod {pod_uid}", err) from None
        return {name: cid for name, (_, cid) in found.items()}

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        """Container name -> id for the named containers (all but NEVER_FROZEN when empty).

        Served from the cache unless ``refresh``, the entry is older than ``cache_ttl`` or a
        requested name is missing from it.
        Raises ContainerNotFound when the pod or a named container is not running here.
        """
        return await self._cache.lookup(pod_uid, containers, refresh, self._list_running)

    async def list_all(self) -> list[Any]:
        """Every CRI container of this node (any state): one ``ListContainers``."""
        try:
            listed = await self.stub().ListContainers(
                cri_pb2.ListContainersRequest(filter=cri_pb2.ContainerFilter()),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise self.failure("CRI listing of the node's containers", err) from None
        return list(listed.containers)

    async def cgroups_path(self, container_id: str) -> str:
        """The container's ``linux.cgroupsPath`` from a verbose CRI ``ContainerStatus``.

        ContainerNotFound when the runtime has no such container; RuntimeFailure otherwise.
        """
        try:
            got = await self.stub().ContainerStatus(
                cri_pb2.ContainerStatusRequest(container_id=container_id, verbose=True),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise ContainerNotFound(f"no container {container_id}: {err.details()}") from None
            raise self.failure(f"CRI status of container {container_id[:12]}", err) from None
        try:
            return cgroups_path_of(got.info)
        except ValueError as e:
            raise RuntimeFailure(
                f"{self.runtime} ContainerStatus(verbose) of {container_id[:12]}: {e} (the cgroup "
                "backend needs a CRI runtime that reports the OCI spec: containerd, CRI-O)"
            ) from None
