"""CPU-throttle mode through CRI: lower a pod's containers to a CPU floor, give them back
exactly their own limits (decisions in daemon/throttling.py; this module makes the calls).

Any CRI runtime (containerd, CRI-O) serves ``ContainerStatus(verbose)`` and
``UpdateContainerResources``, so this works beside the containerd and cgroup backends alike,
on the same socket. All or none: when one container of the pod cannot be throttled, those
already throttled get their limits back before the error is answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from daemon._proto import cri_pb2
from daemon.throttling import (
    CpuLimits,
    created_limits,
    current_limits,
    restore_target,
    sidecar_args,
    sidecar_floor,
    throttled,
)
from freeze_proxy.contract import SIDECAR_NAME

from . import ContainerNotFound, RuntimeFailure, Stale, apply_to_pod
from .cri import POD_UID_LABEL, CriLookup

log = logging.getLogger("daemon.throttle")


@dataclass(frozen=True, slots=True)
class Throttled:
    """A container this daemon throttled, and the limits it had before."""

    pod_uid: str
    name: str
    original: CpuLimits


class Throttler:
    """Throttle and restore the containers of one pod, found through CRI like the backends'."""

    def __init__(self, cri: CriLookup) -> None:
        self._cri = cri
        self._held: dict[str, Throttled] = {}  # container id -> what it had

    def held_pods(self) -> list[str]:
        """Pods with a container this daemon throttled and has not restored yet."""
        return list(dict.fromkeys(t.pod_uid for t in self._held.values()))

    def original(self, container_id: str) -> CpuLimits | None:
        held = self._held.get(container_id)
        return None if held is None else held.original

    async def close(self) -> None:
        await self._cri.close()

    # -- CRI --------------------------------------------------------------------------------

    async def _status(self, name: str, container_id: str) -> Mapping[str, str]:
        try:
            got = await self._cri.stub().ContainerStatus(
                cri_pb2.ContainerStatusRequest(container_id=container_id, verbose=True),
                timeout=self._cri.timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise Stale(name, err.details() or "") from None
            raise self._cri.failure(f"CRI status of container {name}", err) from None
        return dict(got.info)

    async def _update(self, name: str, container_id: str, limits: CpuLimits) -> None:
        request = cri_pb2.UpdateContainerResourcesRequest(
            container_id=container_id,
            linux=cri_pb2.LinuxContainerResources(
                cpu_period=limits.period,
                cpu_quota=limits.quota,
                cpu_shares=limits.shares,
                memory_limit_in_bytes=limits.memory_limit,
                cpuset_cpus=limits.cpuset_cpus,
                cpuset_mems=limits.cpuset_mems,
            ),
        )
        try:
            await self._cri.stub().UpdateContainerResources(request, timeout=self._cri.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise Stale(name, err.details() or "") from None
            raise self._cri.failure(
                f"UpdateContainerResources of container {name} ({container_id[:12]})", err
            ) from None

    def _limits(self, name: str, info: Mapping[str, str]) -> tuple[CpuLimits, CpuLimits | None]:
        try:
            return current_limits(info), created_limits(info)
        except ValueError as e:
            raise RuntimeFailure(
                f"{self._cri.runtime} ContainerStatus(verbose) of {name}: {e} (throttle mode "
                "needs a CRI runtime that reports the OCI spec: containerd, CRI-O)"
            ) from None

    # -- the two calls ----------------------------------------------------------------------

    async def throttle(self, pod_uid: str, containers: Sequence[str], millicores: int) -> list[str]:
        """Lower the named containers (all but NEVER_FROZEN when empty) to ``millicores``,
        remembering each one's limits first; throttling a throttled one succeeds."""

        async def one(name: str, container_id: str) -> None:
            held = self._held.get(container_id)
            if held is None:
                current, created = self._limits(name, await self._status(name, container_id))
                # At our floor already with no record: a predecessor throttled it.
                original = restore_target(current, created, millicores) or current
                held = self._held[container_id] = Throttled(pod_uid, name, original)
            await self._update(name, container_id, throttled(held.original, millicores))

        async def undo(name: str, container_id: str) -> None:
            held = self._held.get(container_id)
            if held is not None:
                await self._update(name, container_id, held.original)
                self._held.pop(container_id, None)

        # All or none, as a freeze: what a failed throttle changed is restored.
        return await apply_to_pod(
            pod_uid, containers, self._cri.lookup, self._cri.forget, one, undo=undo
        )

    async def restore(self, pod_uid: str, containers: Sequence[str], millicores: int) -> list[str]:
        """Give the named containers back the limits they had before :meth:`throttle`; one
        this daemon has no record of (it restarted) gets its creation limits back if it sits
        at the ``millicores`` floor. Restoring a container never throttled succeeds."""

        async def one(name: str, container_id: str) -> None:
            held = self._held.get(container_id)
            if held is not None:
                target: CpuLimits | None = held.original
            else:
                current, created = self._limits(name, await self._status(name, container_id))
                target = restore_target(current, created, millicores)
            if target is not None:
                await self._update(name, container_id, target)
            self._held.pop(container_id, None)

        names = await apply_to_pod(pod_uid, containers, self._cri.lookup, self._cri.forget, one)
        for cid in [c for c, t in self._held.items() if t.pod_uid == pod_uid]:
            if self._held[cid].name in names:
                del self._held[cid]  # a replaced container: its limits went with it
        return names

    async def restore_pod(self, pod_uid: str) -> list[str]:
        """Every container of the pod this daemon throttled back to its own limits (the
        daemon's stop); containers gone meanwhile are forgotten."""
        done: list[str] = []
        for cid, held in [(c, t) for c, t in self._held.items() if t.pod_uid == pod_uid]:
            try:
                await self._update(held.name, cid, held.original)
            except Stale:
                pass  # gone: nothing left to restore
            self._held.pop(cid, None)
            done.append(held.name)
        if not done:
            raise ContainerNotFound(f"no container of pod {pod_uid} is held throttled")
        return done

    # -- a daemon's start -------------------------------------------------------------------

    async def restore_left(self) -> dict[str, str]:
        """At start-up: containers of our pods whose sidecar runs ``--mode throttle`` and that
        sit at its floor (a predecessor died holding them throttled) get their creation limits
        back. Container id -> ``start_restored`` or ``start_restore_failed``."""
        outcomes: dict[str, str] = {}
        listed = await self._cri.list_all()
        running = [
            c
            for c in listed
            if c.state == cri_pb2.CONTAINER_RUNNING and c.labels.get(POD_UID_LABEL)
        ]
        pods: dict[str, list[Any]] = {}
        for c in running:
            pods.setdefault(c.labels[POD_UID_LABEL], []).append(c)
        for pod_uid, containers in pods.items():
            sidecars = [c for c in containers if _name(c) == SIDECAR_NAME]
            if not sidecars:
                continue
            try:
                floor = sidecar_floor(
                    sidecar_args(await self._status(SIDECAR_NAME, sidecars[0].id))
                )
            except (Stale, RuntimeFailure, ValueError):
                continue
            if floor is None:
                continue
            for c in containers:
                if c is sidecars[0]:
                    continue
                who = {"pod_uid": pod_uid, "container": _name(c), "container_id": c.id}
                try:
                    current, created = self._limits(_name(c), await self._status(_name(c), c.id))
                    target = restore_target(current, created, floor)
                    if target is None:
                        continue
                    await self._update(_name(c), c.id, target)
                except (Stale, RuntimeFailure) as e:
                    outcomes[c.id] = "start_restore_failed"
                    log.error(
                        "start: cannot restore the CPU limits of a container a previous daemon "
                        "left throttled",
                        extra={**who, "outcome": "start_restore_failed", "error": str(e)},
                    )
                    continue
                outcomes[c.id] = "start_restored"
                log.warning(
                    "start: restored the CPU limits of a container a previous daemon left "
                    "throttled (it died without its graceful stop)",
                    extra={**who, "outcome": "start_restored", "quota": target.quota},
                )
        return outcomes


def _name(c: Any) -> str:
    return str(c.labels.get("io.kubernetes.container.name") or c.metadata.name)


async def restore_left_throttled(throttler: Throttler, budget: float = 10.0) -> dict[str, str]:
    """:meth:`Throttler.restore_left` bounded by ``budget``; a failure is logged, and the
    daemon serves anyway (each pod's next resume restores it)."""
    try:
        async with asyncio.timeout(budget):
            return await throttler.restore_left()
    except Exception as e:
        log.error(
            "start: cannot look for containers a previous daemon left throttled; serving anyway "
            "(each pod's next resume restores it)",
            extra={"outcome": "start_restore_failed", "error": f"{type(e).__name__}: {e}"},
        )
        return {}
