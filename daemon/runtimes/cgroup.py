"""cgroup backend: find containers through CRI (any CRI runtime), freeze their cgroups directly.

Why: containerd's Tasks API costs 8-10 ms per pause or resume on these machines, writing the
container's freezer takes ~0.45 ms — most of a wake. CRI has no pause call, but a verbose CRI
``ContainerStatus`` hands out the container's OCI spec, whose ``linux.cgroupsPath`` says where
its cgroup is; containerd and CRI-O both report it, so this backend works on either.

The runtime does not know: containerd's Tasks API keeps saying RUNNING for a container frozen
this way, and its Resume answers "cannot resume a running process" without thawing it. So this
backend must own a container's freeze state alone: never pause one container through both.
The kubelet is not surprised either: a stop of a frozen container waits out its grace period
(SIGTERM is not delivered while frozen) and then kills it, exactly as with a Tasks pause.

Writes are tiny sysfs writes done on the event loop itself (no thread): a freeze write returns
at once (the kernel freezes asynchronously; the state is polled until FROZEN, bounded), a thaw
is synchronous in the kernel. Measured with the daemon: see README, "The cgroup backend".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

from daemon._proto import cri_pb2

from . import ContainerNotFound, ListedContainer, RuntimeFailure, Stale, apply_to_pod
from .cri import (
    CONTAINER_NAME_LABEL,
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    CriLookup,
)

DEFAULT_CRI_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
FREEZE_TIMEOUT = 2.0  # a freeze not done by then (a task stuck in the kernel) is undone: 502

Version = Literal[1, 2]

# CRI container state -> the Tasks-API-like status ListedContainer carries.
_CRI_STATUS = {
    cri_pb2.CONTAINER_CREATED: "CREATED",
    cri_pb2.CONTAINER_EXITED: "STOPPED",
    cri_pb2.CONTAINER_UNKNOWN: "UNKNOWN",
}
_V1_STATUS = {"FROZEN": "PAUSED", "FREEZING": "PAUSING", "THAWED": "RUNNING"}


# -- pure: where a container's cgroup is ------------------------------------------------------


def expand_slice(slice_name: str) -> str:
    """systemd's slice nesting as a path: ``a-b-c.slice`` → ``/a.slice/a-b.slice/a-b-c.slice``
    (``-.slice`` is the root). ValueError for a name systemd would refuse."""
    suffix = ".slice"
    if not slice_name.endswith(suffix) or len(slice_name) <= len(suffix) or "/" in slice_name:
        raise ValueError(f"not a systemd slice name: {slice_name!r}")
    stem = slice_name.removesuffix(suffix)
    if stem == "-":
        return "/"
    parts = stem.split("-")
    if any(not p for p in parts):
        raise ValueError(f"systemd slice {slice_name!r} has an empty component")
    return "".join("/" + "-".join(parts[: i + 1]) + suffix for i in range(len(parts)))


def cgroup_relpath(cgroups_path: str) -> str:
    """An OCI ``linux.cgroupsPath`` as a path under a cgroup hierarchy's root.

    cgroupfs driver: already a path (``/kubepods/besteffort/pod<uid>/<id>``). systemd driver
    (``slice:prefix:name``, as runc reads it): ``kubepods-besteffort-pod<uid>.slice:
    cri-containerd:<id>`` → ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-
    pod<uid>.slice/cri-containerd-<id>.scope``. ValueError when it is neither.
    """
    if not cgroups_path or "\0" in cgroups_path:
        raise ValueError(f"bad cgroupsPath {cgroups_path!r}")
    if ":" in cgroups_path:
        parts = cgroups_path.split(":")
        if len(parts) != 3 or "/" in cgroups_path:
            raise ValueError(
                f"cgroupsPath {cgroups_path!r} is neither a path nor systemd's slice:prefix:name"
            )
        slice_name, prefix, name = parts
        if not name:
            raise ValueError(f"systemd cgroupsPath {cgroups_path!r} has no unit name")
        base = expand_slice(slice_name or "system.slice")  # runc's default slice
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else name
        if not unit.endswith((".scope", ".slice")):
            unit += ".scope"
        rel = f"{base.rstrip('/')}/{unit}"
    else:
        rel = "/" + cgroups_path.strip("/")
    if any(p in ("", ".", "..") for p in rel.split("/")[1:]):
        raise ValueError(f"cgroupsPath {cgroups_path!r} leaves its hierarchy or has empty parts")
    return rel


def container_cgroup(root: Path, version: Version, cgroups_path: str) -> Path:
    """The directory whose freezer file freezes the container: v1 under ``<root>/freezer``."""
    rel = cgroup_relpath(cgroups_path).lstrip("/")
    return root / "freezer" / rel if version == 1 else root / rel


def detect_version(root: Path) -> Version:
    """1 when the v1 freezer is mounted under ``root`` (also on hybrid hosts), 2 when ``root`` is
    the unified hierarchy. ValueError, saying what was looked for, otherwise."""
    if (root / "freezer").is_dir():
        return 1
    if (root / "cgroup.controllers").is_file():
        return 2
    raise ValueError(
        f"no cgroup freezer under {root}: neither {root}/freezer (v1) nor "
        f"{root}/cgroup.controllers (v2); is --cgroup-root the host's /sys/fs/cgroup?"
    )


# -- the freezer files ------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # as `echo X > file`; kernfs ignores it
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def freezer_status(version: Version, cgroup: Path) -> str:
    """PAUSED, PAUSING or RUNNING, as the kernel says (FileNotFoundError when gone)."""
    if version == 1:
        return _V1_STATUS.get(_read(cgroup / "freezer.state").strip(), "UNKNOWN")
    frozen = "frozen 1" in _read(cgroup / "cgroup.events").splitlines()
    wanted = _read(cgroup / "cgroup.freeze").strip() == "1"
    return "PAUSED" if frozen else "PAUSING" if wanted else "RUNNING"


class CgroupRuntime:
    """The Runtime protocol: CRI v1 to find containers, their cgroup freezer to pause them."""

    def __init__(
        self,
        socket: str | os.PathLike[str] = DEFAULT_CRI_SOCKET,
        *,
        cgroup_root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
        version: Version | None = None,
        timeout: float = 10.0,
        freeze_timeout: float = FREEZE_TIMEOUT,
        cache_size: int = 4096,
    ) -> None:
        self.cri = CriLookup(socket, runtime="CRI runtime", socket_flag="--cri-socket")
        self.cri.timeout = timeout
        self.root = Path(cgroup_root)
        self.version: Version = detect_version(self.root) if version is None else version
        self.freeze_timeout = freeze_timeout
        # container id -> its freezer cgroup dir (ids are unique; a new container has a new id)
        self._paths: OrderedDict[str, Path] = OrderedDict()
        self._cache_size = cache_size

    async def close(self) -> None:
        await self.cri.close()

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        """Container name -> id (see CriLookup.lookup)."""
        return await self.cri.lookup(pod_uid, containers, refresh)

    async def cgroup_of(self, container_id: str) -> Path:
        """The container's freezer cgroup dir: cached per id, else from ContainerStatus."""
        path = self._paths.get(container_id)
        if path is None:
            raw = await self.cri.cgroups_path(container_id)
            try:
                path = container_cgroup(self.root, self.version, raw)
            except ValueError as e:
                raise RuntimeFailure(f"container {container_id[:12]}: {e}") from None
            self._paths[container_id] = path
            while len(self._paths) > self._cache_size:
                self._paths.popitem(last=False)
        else:
            self._paths.move_to_end(container_id)
        return path

    # -- the freezer ---------------------------------------------------------------------------

    def _files(self, cgroup: Path) -> tuple[Path, bytes, bytes]:
        if self.version == 1:
            return cgroup / "freezer.state", b"FROZEN", b"THAWED"
        return cgroup / "cgroup.freeze", b"1", b"0"

    def _set(self, name: str, container_id: str, cgroup: Path, frozen: bool) -> None:
        path, on, off = self._files(cgroup)
        try:
            _write(path, on if frozen else off)
        except FileNotFoundError:
            self._paths.pop(container_id, None)
            raise Stale(name, f"its cgroup {cgroup} is gone") from None
        except OSError as e:
            raise RuntimeFailure(
                f"cannot write {path} for container {name} ({container_id[:12]}): {e} (the "
                "daemon needs root and the host's /sys/fs/cgroup mounted read-write)"
            ) from None

    def _status(self, name: str, container_id: str, cgroup: Path) -> str:
        try:
            return freezer_status(self.version, cgroup)
        except FileNotFoundError:
            self._paths.pop(container_id, None)
            raise Stale(name, f"its cgroup {cgroup} is gone") from None
        except OSError as e:
            raise RuntimeFailure(f"cannot read the freezer of {name} in {cgroup}: {e}") from None

    async def _change(self, name: str, container_id: str, frozen: bool) -> None:
        """Write the wanted state, then poll (bounded) until the kernel reports it.

        A v1 freeze is asynchronous (FREEZING until every task stopped) and is written again
        while polling, as runc does, since tasks that were busy in the kernel are retried then.
        A freeze that does not finish in ``freeze_timeout`` is thawed back and reported (502).
        """
        cgroup = await self.cgroup_of(container_id)
        wanted = "PAUSED" if frozen else "RUNNING"
        self._set(name, container_id, cgroup, frozen)
        deadline = time.monotonic() + self.freeze_timeout
        delay = 0.0
        while (state := self._status(name, container_id, cgroup)) != wanted:
            if time.monotonic() > deadline:
                if frozen:
                    self._set(name, container_id, cgroup, False)
                raise RuntimeFailure(
                    f"container {name} ({container_id[:12]}) did not "
                    f"{'freeze' if frozen else 'thaw'} within {self.freeze_timeout:g} s "
                    f"(freezer: {state}){'; thawed it back' if frozen else ''} — a task stuck "
                    "in uninterruptible sleep (I/O, NFS)?"
                )
            await asyncio.sleep(delay)  # 0 first: a freeze usually settles within ~0.1 ms
            delay = min(max(delay * 2, 0.0002), 0.01)
            if frozen and self.version == 1:
                self._set(name, container_id, cgroup, True)

    async def _apply(self, pod_uid: str, containers: Sequence[str], frozen: bool) -> list[str]:
        def setting(to_frozen: bool) -> Callable[[str, str], Awaitable[None]]:
            async def call(name: str, container_id: str) -> None:
                try:
                    await self._change(name, container_id, to_frozen)
                except ContainerNotFound as gone:  # CRI no longer knows it: removed or replaced
                    raise Stale(name, str(gone)) from None

            return call

        return await apply_to_pod(
            pod_uid,
            containers,
            self.cri.lookup,
            self.cri.forget,
            setting(frozen),
            setting(False) if frozen else None,
        )

    async def pause(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Freeze the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply(pod_uid, containers, True)

    async def resume(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        """Thaw the named containers (all but NEVER_FROZEN when empty); return their names."""
        return await self._apply(pod_uid, containers, False)

    async def freezer_state(self, container_id: str) -> str:
        """PAUSED, PAUSING or RUNNING per the container's cgroup."""
        cgroup = await self.cgroup_of(container_id)
        try:
            return self._status(container_id[:12], container_id, cgroup)
        except Stale as stale:
            raise ContainerNotFound(f"container {container_id}: {stale.detail}") from None

    async def list_containers(self) -> list[ListedContainer]:
        """Every CRI container of this node; a running one's status is its freezer's (PAUSED
        when frozen), so the daemon's start-up thaw finds what a dead daemon left frozen."""
        listed = await self.cri.list_all()

        async def status(c: cri_pb2.Container) -> str:
            if c.state != cri_pb2.CONTAINER_RUNNING:
                return _CRI_STATUS.get(c.state, "UNKNOWN")
            try:
                return await self.freezer_state(c.id)
            except (ContainerNotFound, RuntimeFailure):
                return "UNKNOWN"

        statuses = await asyncio.gather(*(status(c) for c in listed))
        return [
            ListedContainer(
                pod_uid=c.labels.get(POD_UID_LABEL, ""),
                pod_name=c.labels.get(POD_NAME_LABEL, ""),
                namespace=c.labels.get(POD_NAMESPACE_LABEL, ""),
                name=c.labels.get(CONTAINER_NAME_LABEL) or c.metadata.name,
                container_id=c.id,
                status=s,
            )
            for c, s in zip(listed, statuses, strict=True)
        ]

    async def resume_container(self, container_id: str) -> None:
        """Thaw one container by id (running already: fine; gone: ContainerNotFound)."""
        try:
            await self._change(container_id[:12], container_id, False)
        except Stale as stale:
            raise ContainerNotFound(f"container {container_id}: {stale.detail}") from None
