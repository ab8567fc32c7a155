"""Docker backend: nodes whose kubelet runs Docker Engine through cri-dockerd.

cri-dockerd makes every pod a sandbox container (``io.kubernetes.docker.type=podsandbox``) plus
one Docker container per Kubernetes container (``io.kubernetes.docker.type=container``), labelled
with the pod UID and the container's name. Docker Engine's own API pauses and unpauses them (the
cgroup freezer, like containerd's Tasks API underneath), so the daemon talks to that API on its
unix socket: one aiohttp session over a UnixConnector for the whole process, a timeout on every
call. Container ids are cached per pod UID like the containerd backend does: the lookup is one
listing call, and ids only change when a container restarts, which shows up as 404 (or "is not
running") on the next call and triggers one refresh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from . import (
    ContainerNotFound,
    ListedContainer,
    PodCache,
    RuntimeFailure,
    Stale,
    apply_to_pod,
)

POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
DOCKER_TYPE_LABEL = "io.kubernetes.docker.type"  # "container" or "podsandbox" (cri-dockerd)
DEFAULT_SOCKET = "/var/run/docker.sock"

# Docker's states (``State`` of GET /containers/json) as the Tasks API's, which ListedContainer
# and the start-up thaw (daemon/leftovers.py) speak.
_STATUS = {
    "created": "CREATED",
    "running": "RUNNING",
    "paused": "PAUSED",
    "restarting": "UNKNOWN",
    "removing": "STOPPED",
    "exited": "STOPPED",
    "dead": "STOPPED",
}
# A container in these states can be paused or unpaused: "running" includes a paused one, as in
# CRI (which has no pause state).
_LIVE = frozenset({"running", "paused"})

# What Docker Engine answers (409; 20.10: 500 for the second) when the container already is
# in the wanted state.
_ALREADY_PAUSED = ("is already paused",)
_ALREADY_RUNNING = ("is not paused",)
# Answers meaning the cached id no longer names a live container: look it up again.
_GONE = ("is not running", "is restarting")


def docker_status(state: str) -> str:
    """Docker's container state as the Tasks API's status string (UNKNOWN for anything new)."""
    return _STATUS.get(state, "UNKNOWN")


def pod_filter(pod_uid: str) -> str:
    """The ``filters`` query of a listing of one pod's app containers (sandbox left out)."""
    return json.dumps({"label": [f"{POD_UID_LABEL}={pod_uid}", f"{DOCKER_TYPE_LABEL}=container"]})


def _name(c: Mapping[str, Any]) -> str:
    """The container's name in its pod: kubelet's label, else Docker's name without its '/'."""
    labels = c.get("Labels") or {}
    name = labels.get(CONTAINER_NAME_LABEL)
    if name:
        return str(name)
    names = c.get("Names") or [""]
    return str(names[0]).lstrip("/")


def running_by_name(listing: Iterable[Mapping[str, Any]], pod_uid: str) -> dict[str, str]:
    """Container name -> id of the pod's live (running or paused) app containers in a
    GET /containers/json answer; the sandbox and other pods' containers are left out, and of two
    live containers of one name (a restart in flight) the newest wins."""
    found: dict[str, tuple[int, str]] = {}
    for c in listing:
        labels = c.get("Labels") or {}
        if labels.get(POD_UID_LABEL) != pod_uid or labels.get(DOCKER_TYPE_LABEL) != "container":
            continue
        if c.get("State") not in _LIVE:
            continue
        name, created = _name(c), int(c.get("Created") or 0)
        if name not in found or created > found[name][0]:
            found[name] = (created, str(c["Id"]))
    return {name: cid for name, (_, cid) in found.items()}


def listed(c: Mapping[str, Any]) -> ListedContainer | None:
    """One entry of GET /containers/json?all=1 as a ListedContainer; None for a sandbox (CRI
    lists sandboxes apart from containers, and the daemon never pauses one)."""
    labels = c.get("Labels") or {}
    if labels.get(DOCKER_TYPE_LABEL) == "podsandbox":
        return None
    return ListedContainer(
        pod_uid=str(labels.get(POD_UID_LABEL, "")),
        pod_name=str(labels.get(POD_NAME_LABEL, "")),
        namespace=str(labels.get(POD_NAMESPACE_LABEL, "")),
        name=_name(c),
        container_id=str(c.get("Id", "")),
        status=docker_status(str(c.get("State", ""))),
    )


class _Answer(Exception):
    """Docker answered with an error status; ``message`` is Docker's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _message(status: int, body: bytes) -> str:
    try:
        got = json.loads(body)
    except ValueError:
        got = None
    if isinstance(got, dict) and isinstance(got.get("message"), str):
        return str(got["message"])
    return body.decode(errors="replace").strip()[:500] or f"HTTP {status}"


class DockerRuntime:
    """The Runtime protocol over Docker Engine's HTTP API on its unix socket."""

    def __init__(
        self,
        socket: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        timeout: float = 10.0,
        cache_size: int = 4096,
        cache_ttl: float = 60.0,
    ) -> None:
        self.socket = os.path.abspath(os.fspath(socket))
        self.timeout = timeout
        self._cache = PodCache(cache_size, cache_ttl)
        self._session: aiohttp.ClientSession | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        """Create the session on first use, inside the event loop that will use it."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def close(self) -> None:
        """Close the session; a later call opens a new one."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def forget(self, pod_uid: str) -> None:
        """Drop a pod's cached container ids (e.g. when the pod is deleted)."""
        self._cache.forget(pod_uid)

    async def _call(
        self, what: str, method: str, path: str, params: Mapping[str, str] | None = None
    ) -> Any:
        """One API call: its JSON (None when empty); _Answer on an error status, RuntimeFailure
        (naming the cause and the fix) when Docker cannot be reached or does not answer."""
        try:
            # The host part is ignored on a unix socket; "docker" keeps Docker's logs readable.
            async with self._http().request(method, f"http://docker{path}", params=params) as r:
                body = await r.read()
                if r.status >= 400:
                    raise _Answer(r.status, _message(r.status, body))
                return json.loads(body) if body else None
        except TimeoutError:
            raise RuntimeFailure(
                f"docker {what}: no answer within {self.timeout:g} s (dockerd overloaded or hung?)"
            ) from None
        except aiohttp.ClientConnectorError as err:
            hint = (
                "the daemon needs root (or write access to the socket)"
                if isinstance(err.os_error, PermissionError)
                else "is dockerd running and is --docker-socket right?"
            )
            raise RuntimeFailure(
                f"docker {what}: cannot connect to {self.socket}: {err} ({hint})"
            ) from None
        except (aiohttp.ClientError, ValueError) as err:
            raise RuntimeFailure(f"docker {what}: {type(err).__name__}: {err}") from None

    # -- lookup ------------------------------------------------------------------------------

    async def _list_running(self, pod_uid: str) -> dict[str, str]:
        """Container name -> id of the pod's live app containers (one listing call)."""
        try:
            got = await self._call(
                f"lookup of pod {pod_uid}",
                "GET",
                "/containers/json",
                {"all": "1", "filters": pod_filter(pod_uid)},
            )
        except _Answer as err:
            raise RuntimeFailure(
                f"docker lookup of pod {pod_uid}: HTTP {err.status}: {err.message}"
            ) from None
        return running_by_name(got or [], pod_uid)

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        """Container name -> id for the named containers (all but NEVER_FROZEN when empty).

        Served from the cache unless ``refresh``, the entry is older than ``cache_ttl`` or a
        requested name is missing from it.
        Raises ContainerNotFound when the pod or a named container is not running here.
        """
        return await self._cache.lookup(pod_uid, containers, refresh, self._list_running)

    # -- pause / unpause ---------------------------------------------------------------------

    async def _container_call(
        self, verb: str, name: str, container_id: str, ok_when: Sequence[str]
    ) -> None:
        action = "pause" if verb == "pause" else "unpause"
        try:
            await self._call(
                f"{verb} of container {name} ({container_id[:12]})",
                "POST",
                f"/containers/{container_id}/{action}",
            )
        except _Answer as err:
            # By message, not status: Docker 20.10 answers "is not paused" with a 500.
            if any(s in err.message for s in ok_when):
                return  # already in the wanted state
            if err.status == 404 or any(s in err.message for s in _GONE):
                raise Stale(name, err.message) from None
            raise RuntimeFailure(
                f"docker {verb} of container {name} ({container_id[:12]}): "
                f"HTTP {err.status}: {err.message}"
            ) from None

    async def _apply(
        self, verb: str, pod_uid: str, containers: Sequence[str], ok_when: Sequence[str]
    ) -> list[str]:
        async def call(name: str, container_id: str) -> None:
            await self._container_call(verb, name, container_id, ok_when)

        async def undo(name: str, container_id: str) -> None:
            await self._container_call("resume", name, container_id, _ALREADY_RUNNING)

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
        """Every container of this node but the sandboxes, with its state (one listing call);
        a container kubelet did not make has an empty pod UID."""
        try:
            got = await self._call(
                "listing of the node's containers", "GET", "/containers/json", {"all": "1"}
            )
        except _Answer as err:
            raise RuntimeFailure(
                f"docker listing of the node's containers: HTTP {err.status}: {err.message}"
            ) from None
        return [c for c in (listed(entry) for entry in got or []) if c is not None]

    async def resume_container(self, container_id: str) -> None:
        """Thaw one container by id (running already: fine; gone: ContainerNotFound)."""
        try:
            await self._container_call("resume", container_id[:12], container_id, _ALREADY_RUNNING)
        except Stale as stale:
            raise ContainerNotFound(f"no container {container_id}: {stale.detail}") from None

    async def status(self, container_id: str) -> str:
        """The container's state as a Tasks API status string (RUNNING, PAUSED, STOPPED...)."""
        try:
            got = await self._call(
                f"inspect of container {container_id[:12]}",
                "GET",
                f"/containers/{container_id}/json",
            )
        except _Answer as err:
            if err.status == 404:
                raise ContainerNotFound(f"no container {container_id}: {err.message}") from None
            raise RuntimeFailure(
                f"docker inspect of container {container_id[:12]}: HTTP {err.status}: {err.message}"
            ) from None
        return docker_status(str((got or {}).get("State", {}).get("Status", "")))
