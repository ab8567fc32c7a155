"""The cgroup backend without a kernel: where a container's cgroup is, and the freezer protocol.

The v2 tests run against a TEMPORARY DIRECTORY LAID OUT LIKE CGROUPFS, not a real cgroup v2
hierarchy (these machines have v1 only): a small fake "kernel" task turns what the backend
writes to ``cgroup.freeze`` into ``frozen 0/1`` in ``cgroup.events``, after a delay, as the
real kernel does asynchronously. v1 is tested for real in tests/test_cgroup_containerd.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from daemon._proto import cri_pb2
from daemon.runtimes import ContainerNotFound, RuntimeFailure
from daemon.runtimes.cgroup import (
    CgroupRuntime,
    cgroup_relpath,
    container_cgroup,
    detect_version,
    expand_slice,
)
from daemon.runtimes.cri import cgroups_path_of

UID = "5f1c8a2e-0d3b-4a8e-9c57-3b3f0e8d2a11"
UIDU = UID.replace("-", "_")  # the systemd driver's pod slice spells the uid with underscores
CID = "f21879fa5c52624aaff46e3c3cf97bab2b72f9c7be53620a57156f6f9c0d739f"


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        # cgroupfs driver (kubelet --cgroup-driver=cgroupfs), each QoS class
        (f"/kubepods/besteffort/pod{UID}/{CID}", f"/kubepods/besteffort/pod{UID}/{CID}"),
        (f"/kubepods/burstable/pod{UID}/{CID}", f"/kubepods/burstable/pod{UID}/{CID}"),
        (f"/kubepods/pod{UID}/{CID}", f"/kubepods/pod{UID}/{CID}"),  # guaranteed
        (f"/kubepods/besteffort/pod{UID}/crio-{CID}", f"/kubepods/besteffort/pod{UID}/crio-{CID}"),
        (f"kubepods/pod{UID}/{CID}", f"/kubepods/pod{UID}/{CID}"),  # relative: under the root
        (f"/kubepods/pod{UID}/{CID}/", f"/kubepods/pod{UID}/{CID}"),
        # systemd driver, containerd
        (
            f"kubepods-besteffort-pod{UIDU}.slice:cri-containerd:{CID}",
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{UIDU}.slice/cri-containerd-{CID}.scope",
        ),
        (
            f"kubepods-burstable-pod{UIDU}.slice:cri-containerd:{CID}",
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{UIDU}.slice/cri-containerd-{CID}.scope",
        ),
        (
            f"kubepods-pod{UIDU}.slice:cri-containerd:{CID}",
            f"/kubepods.slice/kubepods-pod{UIDU}.slice/cri-containerd-{CID}.scope",
        ),
        # systemd driver, CRI-O
        (
            f"kubepods-besteffort-pod{UIDU}.slice:crio:{CID}",
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{UIDU}.slice/crio-{CID}.scope",
        ),
        # runc's rules at the edges: the root slice, the default slice, a unit that is a slice
        ("-.slice:crio:abc", "/crio-abc.scope"),
        (":crio:abc", "/system.slice/crio-abc.scope"),
        ("kubepods.slice:crio:sub.slice", "/kubepods.slice/sub.slice"),
        ("kubepods.slice::abc", "/kubepods.slice/abc.scope"),
        ("kubepods.slice::abc.scope", "/kubepods.slice/abc.scope"),
    ],
)
def test_cgroup_relpath(cgroups_path: str, expected: str) -> None:
    assert cgroup_relpath(cgroups_path) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a:b",  # two parts
        "a.slice:b:c:d",  # four parts
        "kubepods:cri-containerd:abc",  # slice not ending .slice
        "kubepods--besteffort.slice:crio:abc",  # empty slice component
        "-kubepods.slice:crio:abc",
        "kubepods.slice:crio:",  # no unit name
        "/kubepods/a:b:c",  # a path with colons is neither form
        "/kubepods/../etc",
        "/kubepods/./x",
        "/kubepods//x",
        "/kubepods/\0x",
        "/",
    ],
)
def test_cgroup_relpath_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        cgroup_relpath(bad)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("-.slice", "/"),
        ("a.slice", "/a.slice"),
        ("a-b.slice", "/a.slice/a-b.slice"),
        ("a-b-c.slice", "/a.slice/a-b.slice/a-b-c.slice"),
    ],
)
def test_expand_slice(name: str, path: str) -> None:
    assert expand_slice(name) == path


@pytest.mark.parametrize("bad", [".slice", "a", "a/b.slice", "a-.slice", "a--b.slice", "-a.slice"])
def test_expand_slice_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_slice(bad)


def test_container_cgroup_per_version() -> None:
    root = Path("/sys/fs/cgroup")
    p = f"/kubepods/besteffort/pod{UID}/{CID}"
    assert container_cgroup(root, 1, p) == root / "freezer" / p.lstrip("/")
    assert container_cgroup(root, 2, p) == root / p.lstrip("/")


def test_detect_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no cgroup freezer"):
        detect_version(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect_version(tmp_path) == 2
    (tmp_path / "freezer").mkdir()  # hybrid: the v1 freezer wins
    assert detect_version(tmp_path) == 1


def _info(spec: object) -> dict[str, str]:
    return {"info": json.dumps({"pid": 1, "runtimeSpec": spec})}


def test_cgroups_path_of_verbose_status() -> None:
    assert cgroups_path_of(_info({"linux": {"cgroupsPath": "/a/b"}})) == "/a/b"
    for bad in (
        {},
        {"info": "not json"},
        _info({}),
        _info({"linux": {}}),
        _info({"linux": {"cgroupsPath": ""}}),
        _info({"linux": {"cgroupsPath": 3}}),
        _info(None),
    ):
        with pytest.raises(ValueError, match=r"verbose status|cgroupsPath"):
            cgroups_path_of(bad)


# -- the v2 protocol against a temporary directory laid out like cgroupfs ------------------------


class FakeCri:
    """Stands in for CriLookup: one pod, container name -> id (cached until a refresh, as
    CriLookup does), id -> cgroupsPath."""

    def __init__(self, ids: dict[str, str], paths: dict[str, str]) -> None:
        self.ids, self.paths = ids, paths
        self.cached: dict[str, str] | None = None
        self.refreshes = 0
        self.status_calls = 0

    async def lookup(
        self, pod_uid: str, containers: Sequence[str] = (), refresh: bool = False
    ) -> dict[str, str]:
        self.refreshes += refresh
        if pod_uid != UID:
            raise ContainerNotFound(f"no running pod with UID {pod_uid}")
        if self.cached is None or refresh:
            self.cached = dict(self.ids)
        return {n: self.cached[n] for n in (containers or ["user-container"])}

    async def cgroups_path(self, container_id: str) -> str:
        self.status_calls += 1
        if container_id not in self.paths:
            raise ContainerNotFound(f"no container {container_id}")
        return self.paths[container_id]

    async def list_all(self) -> list[cri_pb2.Container]:
        labels = {"io.kubernetes.pod.uid": UID}
        return [
            cri_pb2.Container(
                id=cid,
                state=cri_pb2.CONTAINER_RUNNING,
                labels={**labels, "io.kubernetes.container.name": name},
            )
            for name, cid in self.ids.items()
        ]

    def forget(self, pod_uid: str) -> None:
        pass

    async def close(self) -> None:
        pass


def _v2_cgroup(root: Path, cid: str) -> Path:
    d = root / "kubepods" / "besteffort" / f"pod{UID}" / cid
    d.mkdir(parents=True)
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return d


@contextlib.asynccontextmanager
async def fake_kernel(root: Path, delay: float = 0.005, works: bool = True) -> AsyncIterator[None]:
    """Mirror every cgroup.freeze under ``root`` into its cgroup.events after ``delay``."""

    async def loop() -> None:
        while True:
            for freeze in root.rglob("cgroup.freeze"):
                with contextlib.suppress(FileNotFoundError):
                    want = freeze.read_text().strip()
                    events = freeze.with_name("cgroup.events")
                    line = f"frozen {want if works else '0'}"
                    if line not in events.read_text().splitlines():
                        await asyncio.sleep(delay)
                        events.write_text(f"populated 1\n{line}\n")
            await asyncio.sleep(0.001)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _runtime(root: Path, ids: dict[str, str], **kwargs: float) -> tuple[CgroupRuntime, FakeCri]:
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    runtime = CgroupRuntime("/nonexistent.sock", cgroup_root=root, **kwargs)  # type: ignore[arg-type]
    cri = FakeCri(ids, {cid: f"/kubepods/besteffort/pod{UID}/{cid}" for cid in ids.values()})
    runtime.cri = cri  # type: ignore[assignment]
    return runtime, cri


async def test_v2_freeze_waits_for_the_kernel_then_thaws(tmp_path: Path) -> None:
    runtime, cri = _runtime(tmp_path, {"user-container": "c1"})
    assert runtime.version == 2
    d = _v2_cgroup(tmp_path, "c1")
    async with fake_kernel(tmp_path, delay=0.02):
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await runtime.pause(UID, []) == ["user-container"]
        assert loop.time() - started >= 0.015  # it waited for "frozen 1", not only the write
        assert (d / "cgroup.freeze").read_text() == "1"
        assert "frozen 1" in (d / "cgroup.events").read_text()
        assert await runtime.freezer_state("c1") == "PAUSED"
        assert [c.status for c in await runtime.list_containers()] == ["PAUSED"]
        assert await runtime.pause(UID, []) == ["user-container"]  # already frozen: success

        assert await runtime.resume(UID, []) == ["user-container"]
        assert (d / "cgroup.freeze").read_text() == "0"
        assert "frozen 0" in (d / "cgroup.events").read_text()
        assert await runtime.resume(UID, []) == ["user-container"]  # already running: success
        await runtime.resume_container("c1")
    assert cri.status_calls == 1  # the path is cached per container id


async def test_v2_freeze_that_never_settles_is_undone_and_502(tmp_path: Path) -> None:
    runtime, _ = _runtime(tmp_path, {"user-container": "c1"}, freeze_timeout=0.1)
    d = _v2_cgroup(tmp_path, "c1")
    async with fake_kernel(tmp_path, works=False):
        with pytest.raises(RuntimeFailure, match=r"did not freeze within 0.1 s.*thawed it back"):
            await runtime.pause(UID, [])
    assert (d / "cgroup.freeze").read_text() == "0"


async def test_vanished_cgroup_refreshes_once_then_404(tmp_path: Path) -> None:
    runtime, cri = _runtime(tmp_path, {"user-container": "c1"})
    d = _v2_cgroup(tmp_path, "c1")
    async with fake_kernel(tmp_path):
        await runtime.pause(UID, [])
        await runtime.resume(UID, [])
        # kubelet restarted the container: new id, new cgroup; the old one is gone.
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        _v2_cgroup(tmp_path, "c2")
        cri.ids["user-container"] = "c2"
        cri.paths["c2"] = f"/kubepods/besteffort/pod{UID}/c2"
        assert await runtime.pause(UID, []) == ["user-container"]
        assert cri.refreshes == 1
        assert await runtime.freezer_state("c2") == "PAUSED"
        # now the container goes for good: CRI still lists it, its cgroup is gone → 404
        shutil_rmtree(tmp_path / "kubepods" / "besteffort" / f"pod{UID}" / "c2")
        with pytest.raises(ContainerNotFound, match=r"user-container.*is gone"):
            await runtime.resume(UID, [])
        with pytest.raises(ContainerNotFound):
            await runtime.resume_container("c2")
        with pytest.raises(ContainerNotFound):
            await runtime.pause("another-pod", [])


async def test_an_unwritable_freezer_is_502_with_the_cause(tmp_path: Path) -> None:
    runtime, _ = _runtime(tmp_path, {"user-container": "c1"})
    d = _v2_cgroup(tmp_path, "c1")
    (d / "cgroup.freeze").unlink()
    (d / "cgroup.freeze").mkdir()  # writing it fails with EISDIR, as EROFS/EACCES would
    with pytest.raises(RuntimeFailure, match=r"cannot write .*cgroup.freeze.*read-write"):
        await runtime.pause(UID, [])


async def test_v1_layout_writes_freezer_state(tmp_path: Path) -> None:
    """v1's file protocol on plain files (the real kernel: tests/test_cgroup_containerd.py)."""
    (tmp_path / "freezer").mkdir()
    runtime = CgroupRuntime("/nonexistent.sock", cgroup_root=tmp_path)
    assert runtime.version == 1
    runtime.cri = FakeCri(  # type: ignore[assignment]
        {"user-container": "c1"}, {"c1": f"kubepods-besteffort-pod{UIDU}.slice:crio:c1"}
    )
    d = tmp_path / "freezer" / cgroup_relpath(f"kubepods-besteffort-pod{UIDU}.slice:crio:c1")[1:]
    d.mkdir(parents=True)
    (d / "freezer.state").write_text("THAWED\n")
    await runtime.pause(UID, [])
    assert (d / "freezer.state").read_text() == "FROZEN"
    await runtime.resume(UID, ["user-container"])
    assert (d / "freezer.state").read_text() == "THAWED"


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
