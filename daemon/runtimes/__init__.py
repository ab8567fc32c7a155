"""Container runtime backends: the daemon's only way to pause and resume containers."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from freeze_proxy.contract import MESH_PROXIES, QUEUE_PROXY_NAME, SIDECAR_NAME

# Containers of a Knative pod that must never be frozen: they are its request path (queue-proxy,
# the sidecar, a mesh proxy), and freezing one would cut the pod off for good.
NEVER_FROZEN = frozenset({QUEUE_PROXY_NAME, SIDECAR_NAME, *MESH_PROXIES})


class RuntimeBackendError(Exception):
    """Base class for runtime failures the HTTP layer maps to status codes."""


class ContainerNotFound(RuntimeBackendError):
    """No running container of that pod (and name) on this node: answered 404."""


class RuntimeFailure(RuntimeBackendError):
    """The runtime refused or failed the call: answered 502 with this message."""


class ContainersFailed(RuntimeFailure):
    """Some containers of the pod's list failed (``failed``: name -> why, in list order) while
    others succeeded: a freeze was undone (``thawed_back``; ``not_thawed_back`` when even that
    failed), a thaw went on with the rest. Answered 502 naming the first failed container."""

    def __init__(
        self,
        action: str,
        pod_uid: str,
        failed: dict[str, str],
        thawed_back: list[str],
        not_thawed_back: dict[str, str],
    ) -> None:
        first, why = next(iter(failed.items()))
        others = [n for n in failed if n != first]
        message = f"{action} of container {first!r} of pod {pod_uid} failed: {why}"
        if others:
            message += f"; also failed: {', '.join(map(repr, others))}"
        if action == "freeze":
            message += (
                f"; thawed back {', '.join(map(repr, thawed_back))}" if thawed_back else ""
            ) + (
                f"; could NOT thaw back {', '.join(map(repr, not_thawed_back))}: "
                f"{'; '.join(not_thawed_back.values())}"
                if not_thawed_back
                else ""
            )
        super().__init__(message)
        self.container = first
        self.failed = failed
        self.thawed_back = thawed_back
        self.not_thawed_back = not_thawed_back


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


Call = Callable[[str, str], Awaitable[None]]


async def _on_each(targets: Mapping[str, str], call: Call) -> dict[str, Exception]:
    """``call(name, id)`` on every container at once, all let finish; name -> what it raised."""
    results = await asyncio.gather(
        *(call(n, cid) for n, cid in targets.items()), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r  # cancellation and the like
    return {n: r for n, r in zip(targets, results, strict=True) if isinstance(r, Exception)}


async def _resolve(
    pod_uid: str,
    containers: Sequence[str],
    lookup: Callable[[str, Sequence[str], bool], Awaitable[dict[str, str]]],
    *,
    best_effort: bool,
) -> tuple[dict[str, str], dict[str, Exception]]:
    """Name -> id of the containers, and name -> ContainerNotFound for those not running.

    Not best effort (a freeze), any named container missing fails the whole lookup: nothing
    is frozen. Best effort (a thaw), the others are still found: a sidecar that crashed while
    the pod was frozen must not keep the app frozen.
    """
    try:
        return await lookup(pod_uid, containers, False), {}
    except ContainerNotFound:
        if not best_effort or len(containers) < 2:
            raise
    found: dict[str, str] = {}
    gone: dict[str, Exception] = {}
    for name in dict.fromkeys(containers):
        try:
            found[name] = (await lookup(pod_uid, [name], False))[name]
        except ContainerNotFound as e:
            gone[name] = e
    if not found:
        raise next(iter(gone.values()))
    return found, gone


def _why(error: Exception) -> str:
    if isinstance(error, RuntimeBackendError):
        return str(error)
    return f"{type(error).__name__}: {error}"


async def apply_to_pod(
    pod_uid: str,
    containers: Sequence[str],
    lookup: Callable[[str, Sequence[str], bool], Awaitable[dict[str, str]]],
    forget: Callable[[str], None],
    call: Call,
    undo: Call | None = None,
) -> list[str]:
    """Look the pod's containers up and ``call`` each (all at once); returns the names.

    A container replaced since the lookup (Stale) is looked up again once and called again;
    gone for good, it fails like any other. ``undo`` given (a freeze: the thaw), the list is
    all-or-none: when any container fails, the ones that succeeded are undone and
    ContainersFailed names the failures. Without it (a thaw: best effort), every container is
    still called and ContainersFailed names the ones that failed — except containers merely
    gone, which cannot be frozen either: the thaw succeeds with the rest. Nothing done at all
    (every container gone) is ContainerNotFound, as when the first lookup finds none.
    """
    targets, failed = await _resolve(pod_uid, containers, lookup, best_effort=undo is None)
    failed.update(await _on_each(targets, call))
    stale = [n for n, e in failed.items() if isinstance(e, Stale)]
    if stale:
        retry: dict[str, str] = {}
        for i, name in enumerate(stale):
            try:
                retry[name] = (await lookup(pod_uid, [name], i == 0))[name]
            except ContainerNotFound as gone:
                failed[name] = gone
        for name in retry:
            del failed[name]
        targets = {**targets, **retry}  # the undo must reach the new ids
        failed.update(await _on_each(retry, call))
        for name, error in failed.items():
            if isinstance(error, Stale):
                failed[name] = ContainerNotFound(
                    f"container {error.name} of pod {pod_uid} is gone: {error.detail}"
                )
        if any(isinstance(e, ContainerNotFound) for e in failed.values()):
            forget(pod_uid)
    done = [n for n in targets if n not in failed]
    if not failed:
        return done
    if not done and all(isinstance(e, ContainerNotFound) for e in failed.values()):
        raise next(iter(failed.values()))
    ordered = {n: _why(failed[n]) for n in targets if n in failed}
    if undo is None:
        real = {n: w for n, w in ordered.items() if not isinstance(failed[n], ContainerNotFound)}
        if not real:
            return done
        raise ContainersFailed("thaw", pod_uid, real, [], {})
    not_undone = await _on_each({n: targets[n] for n in done}, undo)
    raise ContainersFailed(
        "freeze",
        pod_uid,
        ordered,
        [n for n in done if n not in not_undone],
        {n: _why(e) for n, e in not_undone.items()},
    )
