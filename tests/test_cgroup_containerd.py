"""The cgroup backend on a real containerd + runc with the real v1 freezer (test-bed pods).

Besides freezing and thawing, this checks the backend does not surprise the runtime or the
kubelet: a container frozen behind containerd's back still stops the way kubelet stops it, and
what containerd's Tasks API says and does about such a container is pinned down here (it does
not know: Get says RUNNING, Resume refuses and does not thaw — documented in the README).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from daemon._proto import cri_pb2, tasks_pb2
from daemon.runtimes import ContainerNotFound
from daemon.runtimes.cgroup import CgroupRuntime
from testbed.containerd import Containerd
from testbed.pods import MakePod, Pod, ticker
from tests.pod_checks import USER, eventually, log_grows, log_is_quiet

pytestmark = [pytest.mark.containerd, pytest.mark.containerd_flavors]


@pytest.fixture
async def runtime(containerd: Containerd) -> AsyncIterator[CgroupRuntime]:
    rt = CgroupRuntime(containerd.socket)
    yield rt
    await rt.close()


async def ticking(make_pod: MakePod, own_pid_namespace: bool = False) -> Pod:
    """A ticking user container beside a queue-proxy; with ``own_pid_namespace`` the user
    container is restarted in its own PID namespace, as kubelet runs containers by default."""
    pod = await make_pod(queue_proxy=True)
    if own_pid_namespace:
        pod.specs[USER] = dataclasses.replace(ticker(), own_pid_namespace=True)
        await pod.replace_container(USER)
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"
    return pod


async def test_freeze_and_thaw_write_the_v1_freezer(
    make_pod: MakePod, runtime: CgroupRuntime
) -> None:
    pod = await ticking(make_pod)
    assert await runtime.pause(pod.uid, []) == [USER]
    assert pod.freezer_state(USER) == "FROZEN"
    assert pod.freezer_state("queue-proxy") == "THAWED"  # NEVER_FROZEN
    assert await log_is_quiet(pod)
    assert await runtime.pause(pod.uid, []) == [USER]  # already frozen: success
    listed = {c.name: c.status for c in await runtime.list_containers() if c.pod_uid == pod.uid}
    assert listed == {USER: "PAUSED", "queue-proxy": "RUNNING"}

    assert await runtime.resume(pod.uid, []) == [USER]
    assert pod.freezer_state(USER) == "THAWED"
    assert await log_grows(pod)
    assert await runtime.resume(pod.uid, []) == [USER]  # a thaw of a running one: a no-op
    await runtime.resume_container(pod.container_id(USER))
    assert pod.freezer_state(USER) == "THAWED" and await log_grows(pod)


async def test_what_containerd_says_of_a_cgroup_frozen_behind_its_back(
    make_pod: MakePod, runtime: CgroupRuntime
) -> None:
    """Pinned facts (containerd 1.6 + runc shim): Tasks.Get says RUNNING; Tasks.Resume answers
    "cannot resume a running process" and leaves it frozen; Tasks.Pause fails. So only this
    backend can thaw what it froze (its start-up thaw covers a daemon that died)."""
    pod = await ticking(make_pod)
    cid = pod.container_id(USER)
    await runtime.pause(pod.uid, [USER])
    assert await pod.task_status(USER) == "RUNNING"
    with pytest.raises(grpc.aio.AioRpcError, match="cannot resume a running process"):
        await pod.client.tasks.Resume(
            tasks_pb2.ResumeTaskRequest(container_id=cid), metadata=pod.client.metadata
        )
    assert pod.freezer_state(USER) == "FROZEN"
    with pytest.raises(grpc.aio.AioRpcError):
        await pod.pause(USER)
    assert pod.freezer_state(USER) == "FROZEN"
    await runtime.resume(pod.uid, [USER])
    assert pod.freezer_state(USER) == "THAWED" and await pod.task_status(USER) == "RUNNING"


@pytest.mark.parametrize("own_pid_namespace", [False, True], ids=["pod-pidns", "kubelet-pidns"])
async def test_kubelet_stops_a_frozen_container_within_its_timeout(
    make_pod: MakePod, runtime: CgroupRuntime, own_pid_namespace: bool
) -> None:
    """kubelet's way: StopContainer(timeout) — SIGTERM is not delivered while frozen, so the
    grace period runs out and SIGKILL ends it — then RemoveContainer, StopPodSandbox."""
    pod = await ticking(make_pod, own_pid_namespace)
    await runtime.pause(pod.uid, [])
    assert pod.freezer_state(USER) == "FROZEN"
    cri, grace = pod.client.cri, 2
    started = time.monotonic()
    for cid in pod.containers.values():
        await cri.StopContainer(
            cri_pb2.StopContainerRequest(container_id=cid, timeout=grace), timeout=grace + 10
        )
    stopped = time.monotonic() - started
    for cid in pod.containers.values():
        await cri.RemoveContainer(cri_pb2.RemoveContainerRequest(container_id=cid), timeout=10)
    await cri.StopPodSandbox(
        cri_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=10
    )
    took = time.monotonic() - started
    assert stopped < grace + 2, f"StopContainer took {stopped:.2f} s (grace {grace} s)"
    assert took < grace + 3, f"stop + remove + sandbox stop took {took:.2f} s"
    listed = await cri.ListContainers(
        cri_pb2.ListContainersRequest(filter=cri_pb2.ContainerFilter(pod_sandbox_id=pod.sandbox_id))
    )
    assert list(listed.containers) == []
    with pytest.raises(ContainerNotFound):
        await runtime.resume(pod.uid, [])
    await pod.remove()


async def test_a_replaced_container_is_found_again(
    make_pod: MakePod, runtime: CgroupRuntime
) -> None:
    pod = await ticking(make_pod)
    await runtime.pause(pod.uid, [])
    await runtime.resume(pod.uid, [])
    new = await pod.replace_container(USER)  # kubelet's restart: new id, new cgroup
    assert await runtime.pause(pod.uid, []) == [USER]
    assert pod.container_id(USER) == new and pod.freezer_state(USER) == "FROZEN"
    await runtime.resume(pod.uid, [])
    await asyncio.sleep(0)
