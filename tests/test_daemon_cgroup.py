"""The real ``python -m daemon --runtime cgroup`` over HTTP against a real containerd (its CRI)
and the real v1 freezer: a pod's own token, and only that, freezes that pod's containers, never
its sidecars; a daemon that died leaving a pod frozen is undone by the next one's start."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.runtimes.cgroup import CgroupRuntime
from freeze_proxy.contract import SIDECAR_NAME
from testbed.containerd import Containerd
from testbed.pods import MakePod, Pod, sleeper
from testbed.tokens import SigningKey, new_rsa_key, write_jwks
from tests.daemon_process import daemon_process
from tests.pod_checks import USER, eventually, log_grows, log_is_quiet, until
from tests.test_daemon_containerd import post, token

pytestmark = [pytest.mark.containerd, pytest.mark.containerd_flavors]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def jwks(key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jwks(tmp_path_factory.mktemp("daemon-cgroup") / "jwks.json", key)


@contextlib.contextmanager
def daemon(containerd: Containerd, jwks: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One daemon process with the cgroup backend on containerd's CRI socket."""
    backend = [
        "--runtime=cgroup",
        f"--cri-socket={containerd.socket}",
        "--cgroup-root=/sys/fs/cgroup",
        "--freeze-rate=0",
    ]
    with daemon_process(jwks, backend) as running:
        yield running


@pytest.fixture(scope="module")
def daemon_url(containerd: Containerd, jwks: Path) -> Iterator[str]:
    with daemon(containerd, jwks) as (url, proc):
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


@pytest.fixture
async def http(daemon_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(daemon_url) as session:
        yield session


async def ticking_pod(make_pod: MakePod) -> Pod:
    """user-container ticking, queue-proxy and our sidecar sleeping (both NEVER_FROZEN)."""
    pod = await make_pod(queue_proxy=True, extra=[sleeper(SIDECAR_NAME)])
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"
    return pod


def sidecars_thawed(pod: Pod) -> bool:
    return pod.freezer_state("queue-proxy") == pod.freezer_state(SIDECAR_NAME) == "THAWED"


async def test_own_token_freezes_and_thaws(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)
    status, body = await post(http, "/freeze", token(key, pod))
    assert status == 200, body
    assert (body["containers"], body["state"]) == ([USER], "frozen")
    assert pod.freezer_state(USER) == "FROZEN"
    assert sidecars_thawed(pod)
    assert await log_is_quiet(pod)
    assert (await post(http, "/freeze", token(key, pod)))[0] == 200  # already frozen

    status, body = await post(http, "/thaw", token(key, pod))
    assert (status, body["state"], body["containers"]) == (200, "thawed", [USER])
    assert pod.freezer_state(USER) == "THAWED" and await log_grows(pod)
    assert (await post(http, "/thaw", token(key, pod)))[0] == 200  # already running
    status, body = await post(http, "/", token(key, pod), json={"action": "pause"})
    assert (status, body["state"]) == (200, "frozen")
    status, body = await post(http, "/", token(key, pod), json={"action": "resume"})
    assert (status, body["state"]) == (200, "thawed")
    assert sidecars_thawed(pod)


async def test_another_pods_token_cannot_touch_it(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    victim = await ticking_pod(make_pod)
    other = await ticking_pod(make_pod)
    status, body = await post(http, "/freeze", token(key, other))
    assert (status, body["pod_uid"]) == (200, other.uid)
    assert other.freezer_state(USER) == "FROZEN"
    headers = {**token(key, other), "X-Pod-Uid": victim.uid}
    status, body = await post(http, "/", headers, json={"action": "pause", "pod_uid": victim.uid})
    assert (status, body["pod_uid"]) == (200, other.uid)
    assert victim.freezer_state(USER) == "THAWED" and await log_grows(victim)
    await post(http, "/thaw", token(key, other))


async def test_sidecars_cannot_be_named_and_missing_is_404(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)
    status, body = await post(http, "/freeze?container=no-such-container", token(key, pod))
    assert status == 404, body
    for name in ("queue-proxy", SIDECAR_NAME):
        status, body = await post(http, f"/freeze?container={name}", token(key, pod))
        assert status in (400, 403, 404), body
    assert sidecars_thawed(pod) and pod.freezer_state(USER) == "THAWED"
    await pod.remove()
    status, body = await post(http, "/freeze", token(key, pod))
    assert (status, body["pod_uid"]) == (404, pod.uid)


async def test_a_restart_thaws_what_a_killed_daemon_left_frozen(
    containerd: Containerd, jwks: Path, make_pod: MakePod, key: SigningKey
) -> None:
    ours = await ticking_pod(make_pod)
    foreign = await make_pod()  # no sidecar: someone else's freeze is not our business
    bystander = CgroupRuntime(containerd.socket)
    try:
        await bystander.pause(foreign.uid, [])
        with daemon(containerd, jwks) as (url, proc):
            async with aiohttp.ClientSession(url) as http:
                assert (await post(http, "/freeze", token(key, ours)))[0] == 200
            proc.kill()  # no graceful stop: nothing thaws on the way out
            proc.wait()
        assert ours.freezer_state(USER) == "FROZEN"
        with daemon(containerd, jwks):  # serving means its start-up thaw is done
            await until(lambda: ours.freezer_state(USER) == "THAWED", "thawed by the start")
            assert await log_grows(ours) and sidecars_thawed(ours)
            assert foreign.freezer_state(USER) == "FROZEN"
    finally:
        await bystander.resume(foreign.uid, [])
        await bystander.close()
