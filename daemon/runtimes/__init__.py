"""Container runtime backends: the daemon's only way to pause and resume containers."""

from __future__ import annotations

from collections.abc import Sequence
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
