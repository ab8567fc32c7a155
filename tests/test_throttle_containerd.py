"""Throttle mode on a real containerd (1.6 and 2.x) + runc + the kernel's CFS (cgroup v1).

What a user would check: while throttled, the container's ``cpu.cfs_quota_us`` is the floor and a
busy loop in it uses about that much CPU; after the wake it has exactly its own limits back (a
500m limit, and unlimited = -1), its memory limit never moved; and no container stays throttled
when the daemon stops, or dies and a new one starts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.runtimes import ContainerNotFound
from daemon.runtimes.cri import CriLookup
from daemon.runtimes.throttle import Throttler
from testbed.containerd import Containerd
from testbed.pods import ContainerSpec, Pod, PodClient, sleeper
from testbed.tokens import SigningKey, mint_token, new_rsa_key, write_jwks
from tests.daemon_process import daemon_process

pytestmark = [pytest.mark.containerd, pytest.mark.containerd_flavors]

ROOT = Path(__file__).resolve().parent.parent
BUSY = ("/bin/sh", "-c", "while :; do :; done")
MEMORY = 256 * 2**20
LIMITED = "limited"  # a 500m CPU limit, shares 512, 256Mi
UNLIMITED = "unlimited"  # no CPU limit at all


def busy_specs(sidecar_args: tuple[str, ...] | None = None) -> list[ContainerSpec]:
    specs = [
        ContainerSpec(
            LIMITED,
            command=BUSY,
            cpu_quota=50_000,
            cpu_period=100_000,
            cpu_shares=512,
            memory_limit=MEMORY,
        ),
        ContainerSpec(UNLIMITED, command=BUSY),
        sleeper("queue-proxy"),
    ]
    if sidecar_args is not None:
        # Stands in for freeze-proxy: its command line is what a starting daemon reads.
        specs.append(
            ContainerSpec(
                "freeze-proxy", command=("/bin/sh", "-c", "exec sleep 2147483647", *sidecar_args)
            )
        )
    return specs


@pytest.fixture
async def pods(containerd: Containerd) -> AsyncIterator[PodClient]:
    client = PodClient(containerd)
    yield client
    await client.close()


@pytest.fixture
async def throttler(containerd: Containerd) -> AsyncIterator[Throttler]:
    t = Throttler(CriLookup(containerd.socket, runtime="containerd", socket_flag="--x"))
    yield t
    await t.close()


def cfs(pod: Pod, name: str) -> tuple[int, int]:
    d = pod.cgroup_dir(name, "cpu")
    return int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())


def memory_limit(pod: Pod, name: str) -> int:
    return int((pod.cgroup_dir(name, "memory") / "memory.limit_in_bytes").read_text())


async def cpu_rate(pod: Pod, name: str, window: float = 1.0) -> float:
    """CPUs the container used over ``window`` seconds (cpuacct.usage delta)."""
    before, t0 = pod.cpu_usage_seconds(name), time.monotonic()
    await asyncio.sleep(window)  # a measurement window, not a wait for a condition
    return (pod.cpu_usage_seconds(name) - before) / (time.monotonic() - t0)


async def test_throttle_lowers_the_quota_to_the_floor_and_restores_the_containers_own(
    pods: PodClient, throttler: Throttler
) -> None:
    pod = await pods.create_pod(busy_specs())
    assert cfs(pod, LIMITED) == (50_000, 100_000) and cfs(pod, UNLIMITED)[0] == -1
    own_memory = memory_limit(pod, LIMITED)
    assert own_memory == MEMORY
    # Busy, up to its 500m; > 10x the floor even on a loaded 2-vCPU machine (0.18 seen there).
    assert await cpu_rate(pod, LIMITED) > 0.1

    assert await throttler.throttle(pod.uid, [], 10) == [LIMITED, UNLIMITED]  # not queue-proxy
    assert cfs(pod, LIMITED) == (1_000, 100_000)  # 10m = 1 ms per 100 ms
    assert cfs(pod, UNLIMITED) == (1_000, 100_000)
    assert cfs(pod, "queue-proxy")[0] == -1  # never throttled
    assert memory_limit(pod, LIMITED) == own_memory
    rates = await asyncio.gather(cpu_rate(pod, LIMITED, 2.0), cpu_rate(pod, UNLIMITED, 2.0))
    assert all(r < 0.02 for r in rates), rates  # about the 0.01 CPU floor
    # Again: a no-op, and the original kept is still the container's own, not the floor.
    assert await throttler.throttle(pod.uid, [], 10) == [LIMITED, UNLIMITED]
    orig = throttler.original(pod.container_id(LIMITED))
    assert orig is not None and orig.quota == 50_000

    assert await throttler.restore(pod.uid, [], 10) == [LIMITED, UNLIMITED]
    assert cfs(pod, LIMITED) == (50_000, 100_000)
    assert cfs(pod, UNLIMITED)[0] == -1  # unlimited stays unlimited
    assert memory_limit(pod, LIMITED) == own_memory
    shares = pod.cgroup_dir(LIMITED, "cpu") / "cpu.shares"
    assert int(shares.read_text()) == 512
    assert await cpu_rate(pod, LIMITED) > 0.1
    assert throttler.held_pods() == []
    # A restore of a container never throttled changes nothing and succeeds.
    assert await throttler.restore(pod.uid, [LIMITED], 10) == [LIMITED]
    assert cfs(pod, LIMITED) == (50_000, 100_000)


async def test_a_named_container_that_does_not_run_throttles_nothing(
    pods: PodClient, throttler: Throttler
) -> None:
    pod = await pods.create_pod(busy_specs())
    with pytest.raises(ContainerNotFound):
        await throttler.throttle(pod.uid, [LIMITED, "nope"], 10)
    assert cfs(pod, LIMITED) == (50_000, 100_000)
    assert throttler.held_pods() == []


async def test_a_new_daemon_restores_what_a_dead_one_left_throttled(
    pods: PodClient, containerd: Containerd
) -> None:
    """The record in memory died with the daemon: the creation config in the runtime is what
    the successor restores from — at start-up for pods whose sidecar runs --mode throttle,
    and at a proxy's resume (which carries the floor) for any."""
    ours = await pods.create_pod(busy_specs(("--mode", "throttle", "--throttle-cpu=20m")))
    freezing = await pods.create_pod(busy_specs(("--mode=freeze",)))
    by_proxy = await pods.create_pod(busy_specs(("--mode", "throttle")))

    def fresh() -> Throttler:
        return Throttler(CriLookup(containerd.socket, runtime="containerd", socket_flag="--x"))

    dead = fresh()
    await dead.throttle(ours.uid, [], 20)
    await dead.throttle(freezing.uid, [LIMITED], 20)  # not at a floor its sidecar states
    await dead.throttle(by_proxy.uid, [], 10)
    await dead.close()  # crashed: its records are gone
    assert cfs(ours, LIMITED)[0] == 2_000 and cfs(ours, UNLIMITED)[0] == 2_000

    successor = fresh()
    try:
        outcomes = await successor.restore_left()
        assert cfs(ours, LIMITED) == (50_000, 100_000) and cfs(ours, UNLIMITED)[0] == -1
        assert memory_limit(ours, LIMITED) == MEMORY
        assert outcomes == {
            ours.container_id(LIMITED): "start_restored",
            ours.container_id(UNLIMITED): "start_restored",
            by_proxy.container_id(LIMITED): "start_restored",
            by_proxy.container_id(UNLIMITED): "start_restored",
        }
        assert cfs(freezing, LIMITED)[0] == 2_000  # its sidecar freezes: not ours to guess
        # The proxy's resume carries the floor: that is enough without any record.
        assert await successor.restore(freezing.uid, [LIMITED], 20) == [LIMITED]
        assert cfs(freezing, LIMITED) == (50_000, 100_000)
        assert await successor.restore_left() == {}  # nothing left
    finally:
        await successor.close()


# -- the real daemon over HTTP ------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture
def daemon(
    containerd: Containerd, key: SigningKey, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    backend = [
        "--runtime=containerd",
        f"--containerd-socket={containerd.socket}",
        f"--containerd-namespace={containerd.namespace}",
    ]
    with daemon_process(write_jwks(tmp_path / "jwks.json", key), backend) as running:
        yield running


async def test_the_daemon_throttles_over_http_and_restores_on_its_stop(
    pods: PodClient,
    daemon: tuple[str, subprocess.Popen[bytes]],
    key: SigningKey,
) -> None:
    url, proc = daemon
    pod = await pods.create_pod(busy_specs())
    headers = {
        "Token": mint_token(key, pod_uid=pod.uid, pod_name=pod.name, namespace=pod.namespace)
    }
    async with aiohttp.ClientSession(url) as http:
        async with http.post("/freeze?mode=throttle&cpu=junk", headers=headers) as resp:
            assert resp.status == 400 and "millicores" in (await resp.json())["error"]
        async with http.post("/freeze?mode=nap", headers=headers) as resp:
            assert resp.status == 400
        async with http.post("/freeze?mode=throttle&cpu=50m", headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["state"] == "throttled" and body["mode"] == "throttle"
        assert cfs(pod, LIMITED)[0] == 5_000 and cfs(pod, UNLIMITED)[0] == 5_000
        assert pod.freezer_state(LIMITED) == "THAWED"  # throttled, never frozen
        async with http.post("/thaw?mode=throttle&cpu=50m", headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "restored"
        assert cfs(pod, LIMITED)[0] == 50_000 and cfs(pod, UNLIMITED)[0] == -1
        async with http.post("/freeze?mode=throttle", headers=headers) as resp:
            assert resp.status == 200
        assert cfs(pod, LIMITED)[0] == 1_000
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    assert b"stop_restored" in proc.stderr.read()
    assert cfs(pod, LIMITED) == (50_000, 100_000) and cfs(pod, UNLIMITED)[0] == -1
    assert memory_limit(pod, LIMITED) == MEMORY
