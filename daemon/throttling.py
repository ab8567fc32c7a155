"""CPU-throttle mode, the pure part: what a container's CPU limits are, what its floor is, and
what to restore it to (no I/O; daemon/runtimes/throttle.py makes the CRI calls).

A throttled container keeps running, at a CFS quota of ``millicores * period / 1000`` per period,
for runtimes that dislike a full stop (timers that watch the clock, heartbeats). On wake it gets
back exactly the limits it had: read from its OCI spec (verbose CRI ``ContainerStatus``, which
containerd 1.6 and 2.x update on every ``UpdateContainerResources``) just before throttling,
quota ``-1`` for unlimited. CRI's update replaces the container's whole
``LinuxContainerResources``, so every field we know (memory limit, cpusets, shares) is sent back
unchanged with it.

Restart safety: the exact original lives in the daemon's memory; a daemon that died without its
stop lost it. What survives is kept by the runtime itself: the verbose status's ``config`` is
kubelet's CreateContainer request, which ``UpdateContainerResources`` does not change (seen on
containerd 1.6.20 and 2.4.2). A container whose current quota is our floor and whose creation
config says otherwise was throttled by us, and gets its creation limits back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from freeze_proxy import contract

# The kernel's CFS default period, and its smallest accepted quota (1 ms).
DEFAULT_PERIOD = 100_000
MIN_QUOTA = 1_000
UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class CpuLimits:
    """A container's resources as CRI's ``LinuxContainerResources`` carries them; ``quota``
    -1 is unlimited; 0 in the other fields means "not set" (containerd leaves those alone)."""

    period: int
    quota: int
    shares: int = 0
    memory_limit: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""

    @property
    def unlimited(self) -> bool:
        return self.quota <= 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _info(info: Mapping[str, str]) -> dict[str, Any]:
    raw = info.get("info")
    if not raw:
        raise ValueError(f"no 'info' in the verbose status (keys: {', '.join(info) or 'none'})")
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"the verbose status's info is not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError("the verbose status's info is not a JSON object")
    return parsed


def current_limits(info: Mapping[str, str]) -> CpuLimits:
    """The limits in force: ``runtimeSpec.linux.resources`` of a verbose ``ContainerStatus``.
    An unset quota is unlimited (-1), an unset period the kernel's default."""
    try:
        resources = _info(info)["runtimeSpec"]["linux"].get("resources") or {}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"no runtimeSpec.linux in the verbose status: {e!r}") from e
    cpu = resources.get("cpu") or {}
    memory = resources.get("memory") or {}
    return _limits(
        period=cpu.get("period"), quota=cpu.get("quota"), shares=cpu.get("shares"),
        memory=memory.get("limit"), cpus=cpu.get("cpus"), mems=cpu.get("mems"),
    )  # fmt: skip


def created_limits(info: Mapping[str, str]) -> CpuLimits | None:
    """kubelet's limits at creation (``config.linux.resources``, CRI's JSON names), which no
    update changes; None when the runtime does not report the config (CRI-O's verbose status
    has no ``config``)."""
    config = _info(info).get("config")
    if not isinstance(config, dict):
        return None
    linux = config.get("linux")
    resources = (linux.get("resources") if isinstance(linux, dict) else None) or {}
    if not isinstance(resources, dict):
        return None
    return _limits(
        period=resources.get("cpu_period"), quota=resources.get("cpu_quota"),
        shares=resources.get("cpu_shares"), memory=resources.get("memory_limit_in_bytes"),
        cpus=resources.get("cpuset_cpus"), mems=resources.get("cpuset_mems"),
    )  # fmt: skip


def _limits(
    *, period: object, quota: object, shares: object, memory: object, cpus: object, mems: object
) -> CpuLimits:
    """CpuLimits from either spelling's values: an unset period is the kernel's default, an
    unset or negative quota unlimited, an unset memory limit 0."""
    q = _int(quota)
    return CpuLimits(
        period=_int(period) or DEFAULT_PERIOD,
        quota=q if q > 0 else UNLIMITED,
        shares=_int(shares),
        memory_limit=max(0, _int(memory)),
        cpuset_cpus=str(cpus or ""),
        cpuset_mems=str(mems or ""),
    )


def floor_quota(millicores: int, period: int) -> int:
    """The CFS quota that gives ``millicores`` per ``period`` (never below the kernel's 1 ms)."""
    return max(MIN_QUOTA, millicores * period // 1000)


def throttled(original: CpuLimits, millicores: int) -> CpuLimits:
    """``original`` at the floor: only the quota changes (a lower own limit is kept: a floor
    must never raise a container's CPU)."""
    quota = floor_quota(millicores, original.period)
    if not original.unlimited:
        quota = min(quota, original.quota)
    return CpuLimits(
        original.period,
        quota,
        original.shares,
        original.memory_limit,
        original.cpuset_cpus,
        original.cpuset_mems,
    )


def is_floor(current: CpuLimits, millicores: int) -> bool:
    """Whether ``current`` is what :func:`throttled` makes of some limits at ``millicores``."""
    return not current.unlimited and current.quota == floor_quota(millicores, current.period)


def restore_target(
    current: CpuLimits, created: CpuLimits | None, millicores: int
) -> CpuLimits | None:
    """What to restore a container to when this daemon has no record of throttling it (it
    restarted): its creation limits if it sits at our floor and those differ; else None
    (nothing of ours to undo). The memory limit and cpusets in force are kept."""
    if created is None or not is_floor(current, millicores):
        return None
    if (created.period, created.quota) == (current.period, current.quota):
        return None  # created at the floor: its own limit, nothing to undo
    return CpuLimits(
        created.period,
        created.quota,
        created.shares or current.shares,
        current.memory_limit,
        current.cpuset_cpus,
        current.cpuset_mems,
    )


def sidecar_floor(args: Sequence[str]) -> int | None:
    """The floor in millicores when the sidecar's command line says ``--mode throttle``
    (``--throttle-cpu``, else its default); None for any other mode or a junk value."""
    values: dict[str, str] = {}
    items = list(args)
    for i, arg in enumerate(items):
        for flag in (contract.FLAG_MODE, contract.FLAG_THROTTLE_CPU):
            if arg == flag and i + 1 < len(items):
                values[flag] = items[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg[len(flag) + 1 :]
    if values.get(contract.FLAG_MODE) != contract.MODE_THROTTLE:
        return None
    try:
        return contract.parse_millicores(
            values.get(contract.FLAG_THROTTLE_CPU, contract.DEFAULT_THROTTLE_CPU)
        )
    except ValueError:
        return None


def sidecar_args(info: Mapping[str, str]) -> list[str]:
    """The sidecar's command and args from its verbose status's creation ``config``."""
    config = _info(info).get("config")
    if not isinstance(config, dict):
        return []
    return [
        str(a) for key in ("command", "args") for a in (config.get(key) or []) if isinstance(a, str)
    ]
