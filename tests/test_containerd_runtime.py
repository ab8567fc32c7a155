"""ContainerdRuntime against a real containerd + runc (private instance from the test bed)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon.runtimes import ContainerNotFound, RuntimeFailure
from daemon.runtimes.containerd import ContainerdRuntime
from testbed import gobins
from testbed.containerd import Containerd, flavor_binaries, pod_cgroup_dirs, shim_pids
from testbed.pods import ContainerSpec, MakePod, Pod, PodClient, ticker

pytestmark = [pytest.mark.containerd, pytest.mark.containerd_flavors]

USER = "user-container"


@pytest.fixture
async def runtime(containerd: Containerd) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(containerd.socket)
    yield rt
    await rt.close()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``check`` until true or ``timeout``; the log file is written by the shim, not us."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def log_is_quiet(pod: Pod, name: str, seconds: float = 0.6) -> bool:
    """No new log line for ``seconds`` (the ticker writes one every 150 ms when running)."""
    await asyncio.sleep(0.1)  # a line already in the pipe may still land
    before = len(pod.log_lines(name))
    await asyncio.sleep(seconds)
    return len(pod.log_lines(name)) == before


async def log_grows(pod: Pod, name: str) -> bool:
    before = len(pod.log_lines(name))
    return await eventually(lambda: len(pod.log_lines(name)) >= before + 2)


async def test_the_containerd_and_its_shims_are_the_flavor_tested(
    make_pod: MakePod, containerd: Containerd
) -> None:
    """So that a wrong binary (Debian's 1.6 found in PATH, say) cannot pass for 2.x: the CRI
    says which release serves it, and each pod's shim is that flavor's own."""
    got = containerd.runtime_version()
    if containerd.flavor == "2.x":
        assert got == gobins.pinned_version("CONTAINERD_VERSION")
        want_shim = flavor_binaries("2.x").shim
    else:
        assert got.startswith("1.6."), got
        want_shim = shutil.which("containerd-shim-runc-v2")
    pod = await make_pod()
    pids = shim_pids(containerd.socket)
    assert pids and want_shim is not None
    assert {os.readlink(f"/proc/{pid}/exe") for pid in pids} == {os.path.realpath(want_shim)}
    assert pod.freezer_state("user-container") == "THAWED"


async def test_pause_freezes_and_resume_thaws(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod()
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"

    assert await runtime.pause(pod.uid, []) == [USER]
    assert pod.freezer_state(USER) == "FROZEN"
    assert await runtime.task_status(pod.container_id(USER)) == "PAUSED"
    assert await log_is_quiet(pod, USER)
    cpu = pod.cpu_usage_seconds(USER)
    await asyncio.sleep(0.3)
    assert pod.cpu_usage_seconds(USER) == cpu

    assert await runtime.resume(pod.uid, []) == [USER]
    assert pod.freezer_state(USER) == "THAWED"
    assert await runtime.task_status(pod.container_id(USER)) == "RUNNING"
    assert await log_grows(pod, USER)


async def test_pause_twice_and_resume_twice_succeed(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod()
    assert await runtime.resume(pod.uid, [USER]) == [USER]  # resuming a running one: fine
    assert await runtime.pause(pod.uid, [USER]) == [USER]
    assert await runtime.pause(pod.uid, [USER]) == [USER]
    assert pod.freezer_state(USER) == "FROZEN"
    assert await runtime.resume(pod.uid, [USER]) == [USER]
    assert await runtime.resume(pod.uid, [USER]) == [USER]
    assert pod.freezer_state(USER) == "THAWED"


async def test_queue_proxy_is_never_frozen_by_default(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod(queue_proxy=True)
    assert await runtime.pause(pod.uid, []) == [USER]
    assert pod.freezer_state(USER) == "FROZEN"
    assert pod.freezer_state("queue-proxy") == "THAWED"
    assert await pod.task_status("queue-proxy") == "RUNNING"
    assert await runtime.resume(pod.uid, []) == [USER]


async def test_default_set_pauses_all_app_containers_and_names_narrow_it(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod(queue_proxy=True, extra=[ticker("sidecar")])

    assert sorted(await runtime.pause(pod.uid, ["sidecar"])) == ["sidecar"]
    assert pod.freezer_state("sidecar") == "FROZEN"
    assert pod.freezer_state(USER) == "THAWED"

    assert sorted(await runtime.pause(pod.uid, [])) == ["sidecar", USER]  # concurrently
    assert {pod.freezer_state(n) for n in ("sidecar", USER)} == {"FROZEN"}
    assert pod.freezer_state("queue-proxy") == "THAWED"

    assert await runtime.resume(pod.uid, [USER]) == [USER]
    assert pod.freezer_state(USER) == "THAWED"
    assert pod.freezer_state("sidecar") == "FROZEN"
    assert sorted(await runtime.resume(pod.uid, [])) == ["sidecar", USER]
    assert pod.freezer_state("sidecar") == "THAWED"


async def test_unknown_pod_and_unknown_container_are_not_found(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    with pytest.raises(ContainerNotFound, match="no running pod"):
        await runtime.pause("00000000-0000-0000-0000-000000000000", [])
    pod = await make_pod(queue_proxy=True)
    with pytest.raises(ContainerNotFound, match="'nope'") as err:
        await runtime.pause(pod.uid, [USER, "nope"])
    assert USER in str(err.value)  # says what does run
    assert pod.freezer_state(USER) == "THAWED"  # nothing was paused


async def test_pod_with_only_never_frozen_containers_has_nothing_to_freeze(
    containerd: Containerd, runtime: ContainerdRuntime
) -> None:
    client = PodClient(containerd)
    try:
        pod = await client.create_pod([ticker("queue-proxy")])
        with pytest.raises(ContainerNotFound, match="no container to freeze"):
            await runtime.pause(pod.uid, [])
    finally:
        await client.close()


async def test_replaced_container_refreshes_the_cache(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod(queue_proxy=True)
    old = (await runtime.lookup(pod.uid, [USER]))[USER]
    assert old == pod.container_id(USER)

    new = await pod.replace_container(USER)  # kubelet restarting the container: new id
    assert new != old
    assert (await runtime.lookup(pod.uid, [USER]))[USER] == old  # still cached

    assert await runtime.pause(pod.uid, []) == [USER]  # NOT_FOUND -> refresh -> retry
    assert pod.freezer_state(USER) == "FROZEN"
    assert (await runtime.lookup(pod.uid, [USER]))[USER] == new
    assert await runtime.resume(pod.uid, []) == [USER]


async def test_container_added_after_lookup_is_found(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    pod = await make_pod()
    await runtime.lookup(pod.uid, [])
    await pod.add_container(ticker("late"))
    assert await runtime.pause(pod.uid, ["late"]) == ["late"]  # missing from cache -> refresh
    assert pod.freezer_state("late") == "FROZEN"


async def test_expired_cache_entry_sees_a_late_container_in_the_default_set(
    make_pod: MakePod, containerd: Containerd
) -> None:
    rt = ContainerdRuntime(containerd.socket, cache_ttl=0.2)
    try:
        pod = await make_pod()
        assert await rt.lookup(pod.uid) == {USER: pod.container_id(USER)}
        await pod.add_container(ticker("late"))
        assert list(await rt.lookup(pod.uid)) == [USER]  # cached
        await asyncio.sleep(0.25)
        assert sorted(await rt.pause(pod.uid, [])) == ["late", USER]
    finally:
        await rt.close()


async def test_removed_pod_is_not_found(make_pod: MakePod, runtime: ContainerdRuntime) -> None:
    pod = await make_pod()
    await runtime.pause(pod.uid, [])
    await pod.remove()  # works while paused: thawed first
    with pytest.raises(ContainerNotFound):
        await runtime.resume(pod.uid, [])
    with pytest.raises(ContainerNotFound):
        await runtime.resume(pod.uid, [])  # also when nothing is cached any more


async def test_missing_socket_is_a_runtime_failure_with_a_hint(tmp_path: Path) -> None:
    rt = ContainerdRuntime(tmp_path / "nope.sock", timeout=5)
    try:
        with pytest.raises(RuntimeFailure) as err:
            await rt.pause("some-uid", [])
    finally:
        await rt.close()
    msg = str(err.value)
    assert "UNAVAILABLE" in msg
    assert "--containerd-socket" in msg
    assert "nope.sock" in msg


def test_testbed_rejects_an_empty_image() -> None:
    with pytest.raises(ValueError, match="image"):
        ContainerSpec("user-container", command=["true"], image="").validate()


async def test_testbed_stop_leaves_nothing_behind(containerd: Containerd) -> None:
    """A short-lived second containerd: a paused pod, then stop(); nothing may remain."""
    cd = Containerd(flavor=containerd.flavor)
    await asyncio.to_thread(cd.start)
    try:
        client = PodClient(cd)
        pod = await client.create_pod([ticker(), ticker("other")])
        rt = ContainerdRuntime(cd.socket)
        await rt.pause(pod.uid, [])
        await rt.close()
        await client.close(remove_pods=False)  # leave the paused pod to stop()
        assert shim_pids(cd.socket)
    finally:
        await asyncio.to_thread(cd.stop)
    assert not shim_pids(cd.socket)
    assert not any(d.exists() for d in pod_cgroup_dirs(pod.uid))
    assert not cd.base.exists()
    with open("/proc/self/mountinfo") as fh:
        assert str(cd.base) not in fh.read()
    # The session's containerd is unharmed.
    assert containerd.proc is not None and containerd.proc.poll() is None
    assert os.path.exists(containerd.socket)


async def test_the_node_listing_shows_each_containers_pod_name_and_task_state(
    make_pod: MakePod, runtime: ContainerdRuntime
) -> None:
    """What a starting daemon reads to find what a dead one left paused (daemon.lifecycle)."""
    pod = await make_pod(queue_proxy=True)
    await pod.pause("user-container")  # the pod's removal thaws it if the test fails
    mine = {c.name: c for c in await runtime.list_containers() if c.pod_uid == pod.uid}
    assert set(mine) == {"user-container", "queue-proxy"}
    user = mine["user-container"]
    assert (user.pod_name, user.namespace) == (pod.name, pod.namespace)
    assert user.container_id == pod.container_id("user-container")
    assert (user.status, mine["queue-proxy"].status) == ("PAUSED", "RUNNING")
    await runtime.resume_container(user.container_id)
    assert await pod.task_status("user-container") == "RUNNING"
    await runtime.resume_container(user.container_id)  # running already: fine
    with pytest.raises(ContainerNotFound):
        await runtime.resume_container("0" * 64)
