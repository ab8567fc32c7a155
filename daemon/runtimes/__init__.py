"""Container runtime backends: the daemon's only way to pause and resume containers."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from freeze_proxy.contract import SIDECAR_NAME

# Containers of a Knative pod that must never be frozen: freezing them would cut the pod off.
NEVER_FROZEN = frozenset({"queue-proxy", SIDECAR_NAME})


class RuntimeBackendError(Exception):
    """Base class for runtime failures the HTTP layer maps to status codes."""


class ContainerNotFound(RuntimeBackendError):
    """No running container of that pod (and name) on this node: answered 404."""


class RuntimeFailure(RuntimeBackendError):
    """The runtime refused or failed the call: answered 502 with this message."""


@dataclass(frozen=True, slots=True)
class ListedContainer:
    """One container of this node as the runtime lists it, with its task's state."""

    pod_uid: str  # kubelet's label; empty for a container kubelet did not make
    pod_name: str
    namespace: str
    name: str  # the container's name in its pod
    container_id: str
    status: str  # the Tasks API's: RUNNING, PAUSED, PAUSING, STOPPED, CREATED, UNKNOWN


class Runtime(Protocol):
    """Pause/resume the containers of one pod, found by pod UID and container name."""

    async def pause(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Freeze the named containers (all but NEVER_FROZEN when empty); return their names.

        Freezing an already frozen container succeeds.
        """
        ...

    async def resume(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Thaw the named containers (all but NEVER_FROZEN when empty); return their names.

        Thawing a running container succeeds.
        """
        ...

    async def list_containers(self) -> list[ListedContainer]:
        """Every container of this node (all pods), with its task's state."""
        ...

    async def resume_container(self, container_id: str) -> None:
        """Thaw one container by id; thawing a running one succeeds."""
        ...

    async def close(self) -> None: ...


class Stale(Exception):
    """A container id found by a lookup is gone (the container was replaced or removed): the
    backend's call raises it, and :func:`apply_to_pod` looks the pod up again once."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name, detail)
        self.name = name
        self.detail = detail


def choose(pod_uid: str, running: Mapping[str, str], containers: Sequence[str]) -> dict[str, str]:
    """Name -> id of the named containers (all but NEVER_FROZEN when none are named).

    Raises ContainerNotFound naming what is missing and what runs.
    """
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


class PodCache:
    """Pod UID -> (when looked up, container name -> id), LRU-bounded. The TTL bounds how long a
    default set can miss a container started after the lookup (a cold lookup is ~1 ms)."""

    def __init__(self, size: int = 4096, ttl: float = 60.0) -> None:
        self._entries: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
        self._size = size
        self._ttl = ttl

    def forget(self, pod_uid: str) -> None:
        """Drop a pod's cached container ids (e.g. when the pod is deleted)."""
        self._entries.pop(pod_uid, None)

    async def lookup(
        self,
        pod_uid: str,
        containers: Sequence[str],
        refresh: bool,
        list_running: Callable[[str], Awaitable[dict[str, str]]],
    ) -> dict[str, str]:
        """Container name -> id for the named containers (all but NEVER_FROZEN when empty).

        Served from the cache unless ``refresh``, the entry is older than the TTL or a
        requested name is missing from it; else ``list_running(pod_uid)`` asks the runtime.
        Raises ContainerNotFound when the pod or a named container is not running here.
        """
        if not pod_uid:
            raise ContainerNotFound("empty pod UID")
        now = asyncio.get_running_loop().time()
        entry = None if refresh else self._entries.get(pod_uid)
        if (
            entry is not None
            and now - entry[0] < self._ttl
            and all(n in entry[1] for n in containers)
        ):
            self._entries.move_to_end(pod_uid)
            running = entry[1]
        else:
            running = await list_running(pod_uid)
            if not running:
                self.forget(pod_uid)
                raise ContainerNotFound(f"no running pod with UID {pod_uid} on this node")
            self._entries[pod_uid] = (now, running)
            self._entries.move_to_end(pod_uid)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return choose(pod_uid, running, containers)


async def _on_each(targets: Mapping[str, str], call: Callable[[str, str], Awaitable[None]]) -> None:
    """``call(name, id)`` on every container at once; let all finish before raising (a runtime
    failure before a Stale one)."""
    results = await asyncio.gather(
        *(call(n, cid) for n, cid in targets.items()), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    for e in errors:
        if not isinstance(e, Exception):
            raise e  # cancellation and the like
    stale = [e for e in errors if isinstance(e, Stale)]
    others = [e for e in errors if not isinstance(e, Stale)]
    if others:
        raise others[0]
    if stale:
        raise stale[0]


async def apply_to_pod(
    pod_uid: str,
    containers: Sequence[str],
    lookup: Callable[[str, Sequence[str], bool], Awaitable[dict[str, str]]],
    forget: Callable[[str], None],
    call: Callable[[str, str], Awaitable[None]],
) -> list[str]:
    """Look the pod's containers up and ``call`` each; when one was replaced since the lookup
    (Stale), look again once, then give up with ContainerNotFound. Returns the names."""
    targets = await lookup(pod_uid, containers, False)
    try:
        await _on_each(targets, call)
    except Stale:
        targets = await lookup(pod_uid, containers, True)
        try:
            await _on_each(targets, call)
        except Stale as stale:
            forget(pod_uid)
            raise ContainerNotFound(
                f"container {stale.name} of pod {pod_uid} is gone: {stale.detail}"
            ) from None
    return list(targets)
