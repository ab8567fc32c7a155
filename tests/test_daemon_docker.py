"""The real ``python -m daemon --runtime docker`` over HTTP against a real dockerd.

Pods are made the way cri-dockerd makes them (testbed.dockerpods): a ``k8s_POD_...`` sandbox and
labelled ``k8s_<container>_...`` containers. Tokens are minted locally and checked against a
JWKS file (``--no-token-review``). What is checked: a pod's own token, and only that, pauses
that pod's app containers (``docker inspect`` says paused, the kernel's freezer says FROZEN, the
ticker's log stops), never the sandbox or the sidecars; a daemon that starts thaws what a dead
one left paused in pods with our sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from freeze_proxy.contract import SIDECAR_NAME
from testbed.docker import Dockerd
from testbed.dockerpods import SANDBOX, DockerPod, DockerPods, load_busybox, sleeper, ticker
from testbed.processes import free_port, wait_listening
from testbed.tokens import DEFAULT_ISSUER, SigningKey, mint_token, new_rsa_key, write_jwks
from tests.test_daemon_containerd import _alg_none, _swap_pod_uid

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
USER = "user-container"
SIDECARS = ("queue-proxy", SIDECAR_NAME)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def jwks_file(key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jwks(tmp_path_factory.mktemp("daemon") / "jwks.json", key)


@pytest.fixture(scope="module")
def engine(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Dockerd:
    """The session's private dockerd (tests/image_fixtures.py) with the busybox image in it."""
    load_busybox(dockerd, tmp_path_factory.mktemp("busybox"))
    return dockerd


@contextlib.contextmanager
def daemon(jwks_file: Path, socket: Path | str, *flags: str) -> Iterator[tuple[str, Path]]:
    """The daemon process on a free port; yields its URL and log file; SIGTERM at the end."""
    port = free_port()
    log = jwks_file.parent / f"daemon-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "daemon",
                f"--listen=127.0.0.1:{port}",
                "--no-token-review", f"--jwks-file={jwks_file}", f"--issuer={DEFAULT_ISSUER}",
                "--runtime=docker", f"--docker-socket={socket}",
                *flags,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )  # fmt: skip
    try:
        wait_listening(proc, "127.0.0.1", port, "freeze-daemon", log_file=log)
        yield f"http://127.0.0.1:{port}", log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def daemon_url(engine: Dockerd, jwks_file: Path) -> Iterator[str]:
    with daemon(jwks_file, engine.socket) as (url, _):
        yield url


@pytest.fixture
async def http(daemon_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(daemon_url) as session:
        yield session


@pytest.fixture
def pods(engine: Dockerd) -> Iterator[DockerPods]:
    made = DockerPods(engine)
    yield made
    made.close()


def token(key: SigningKey, pod: DockerPod, **kwargs: Any) -> dict[str, str]:
    return {
        "Token": mint_token(
            key, pod_uid=pod.uid, pod_name=pod.name, namespace=pod.namespace, **kwargs
        )
    }


async def post(
    http: aiohttp.ClientSession, path: str, headers: dict[str, str], **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(path, headers=headers, **kwargs) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def eventually(pod: DockerPod, lines: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while len(pod.log_lines(USER)) < lines:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def ticking(pod: DockerPod) -> bool:
    """The app's log grows (it prints a line every 150 ms while it runs)."""
    return await eventually(pod, len(pod.log_lines(USER)) + 2)


async def quiet(pod: DockerPod, seconds: float = 0.6) -> bool:
    await asyncio.sleep(0.1)
    before = len(pod.log_lines(USER))
    await asyncio.sleep(seconds)
    return len(pod.log_lines(USER)) == before


async def untouched(pod: DockerPod) -> bool:
    """Every container of the pod runs, and the app ticks."""
    names = [SANDBOX, *pod.containers]
    return all(pod.state(n) == "running" for n in names) and await ticking(pod)


async def app_pod(pods: DockerPods) -> DockerPod:
    """A Knative-like pod: the ticking app, queue-proxy and our sidecar (all on busybox)."""
    pod = pods.create_pod([ticker(USER), *(sleeper(n) for n in SIDECARS)])
    assert await eventually(pod, 2), "the ticker never logged"
    return pod


async def test_own_token_freezes_and_thaws(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await app_pod(pods)

    status, body = await post(http, "/freeze", token(key, pod))
    assert status == 200, body
    assert body["pod_uid"] == pod.uid and body["containers"] == [USER]
    assert body["state"] == "frozen"
    assert pod.state(USER) == "paused"
    assert pod.freezer_state(USER) == "FROZEN"
    for name in (SANDBOX, *SIDECARS):  # never frozen
        assert pod.state(name) == "running", name
        assert pod.freezer_state(name) == "THAWED", name
    assert await quiet(pod)

    status, body = await post(http, "/freeze", token(key, pod))  # already frozen: success
    assert (status, body["state"]) == (200, "frozen")

    status, body = await post(http, "/thaw", token(key, pod))
    assert (status, body["state"], body["containers"]) == (200, "thawed", [USER])
    assert await untouched(pod)

    status, body = await post(http, "/thaw", token(key, pod))  # already running: success
    assert (status, body["state"]) == (200, "thawed")


async def test_knative_protocol_and_a_named_sidecar(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await app_pod(pods)
    status, body = await post(http, "/", token(key, pod), json={"action": "pause"})
    assert (status, body["state"]) == (200, "frozen")
    assert pod.state(USER) == "paused"
    status, body = await post(http, "/", token(key, pod), json={"action": "resume"})
    assert (status, body["state"]) == (200, "thawed")
    assert await untouched(pod)


async def test_another_pods_token_cannot_touch_it(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    victim = await app_pod(pods)
    other = await app_pod(pods)

    status, body = await post(http, "/freeze", token(key, other))
    assert (status, body["pod_uid"]) == (200, other.uid)
    assert other.state(USER) == "paused"
    assert await untouched(victim)

    headers = {**token(key, other), "X-Pod-Uid": victim.uid}
    status, body = await post(http, "/", headers, json={"action": "pause", "pod_uid": victim.uid})
    assert (status, body["pod_uid"]) == (200, other.uid)
    status, _ = await post(http, f"/freeze?pod_uid={victim.uid}", token(key, other))
    assert status == 400
    assert await untouched(victim)
    status, _ = await post(http, "/thaw", token(key, other))
    assert status == 200 and await untouched(other)


async def test_every_bad_token_is_refused_and_touches_nothing(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    victim = await app_pod(pods)
    attacker = await app_pod(pods)
    now = time.time()
    bad: dict[str, dict[str, str]] = {
        "expired": token(key, victim, now=now - 3600),
        "wrong audience": token(key, victim, audience="vault"),
        "wrong issuer": token(key, victim, issuer="https://evil.example"),
        "bad signature": token(new_rsa_key(kid=key.kid), victim),
        "unknown key id": token(new_rsa_key(), victim),
        "pod uid swapped": {"Token": _swap_pod_uid(token(key, attacker)["Token"], victim.uid)},
        "alg none": {"Token": _alg_none(token(key, victim)["Token"])},
        "junk": {"Token": "junk"},
    }
    for kind, headers in bad.items():
        status, body = await post(http, "/freeze", headers)
        assert status == 403, (kind, body)
    assert await untouched(victim)
    assert await untouched(attacker)


async def test_sidecars_and_missing_containers_and_gone_pods(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await app_pod(pods)
    status, body = await post(http, "/freeze?container=no-such-container", token(key, pod))
    assert status == 404, body
    assert "no-such-container" in body["error"]
    # The sandbox is no container of the pod's (cri-dockerd's type label): nobody can name it
    # ("POD" is refused as a name already; "pod" is no container's).
    status, body = await post(http, f"/freeze?container={SANDBOX}", token(key, pod))
    assert status == 400, body
    status, body = await post(http, f"/freeze?container={SANDBOX.lower()}", token(key, pod))
    assert status == 404, body
    assert await untouched(pod)

    only_sidecars = pods.create_pod([sleeper(n) for n in SIDECARS])
    status, body = await post(http, "/freeze", token(key, only_sidecars))
    assert status == 404 and "no container to freeze" in body["error"], body
    assert all(only_sidecars.state(n) == "running" for n in SIDECARS)

    pods.remove(pod)
    status, body = await post(http, "/freeze", token(key, pod))
    assert (status, body["pod_uid"]) == (404, pod.uid), body


async def test_a_restarted_app_is_found_again(
    pods: DockerPods, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    """The cached id goes stale when kubelet replaces the container: one fresh lookup."""
    pod = await app_pod(pods)
    assert (await post(http, "/freeze", token(key, pod)))[0] == 200
    assert (await post(http, "/thaw", token(key, pod)))[0] == 200
    pods.engine.run("rm", "-f", pod.containers[USER])
    pods.add_container(pod, ticker(USER), attempt=1)
    status, body = await post(http, "/freeze", token(key, pod))
    assert (status, body["containers"]) == (200, [USER]), body
    assert pod.state(USER) == "paused"
    assert (await post(http, "/thaw", token(key, pod)))[0] == 200


async def test_docker_unreachable_is_502_with_the_cause(
    pods: DockerPods, jwks_file: Path, key: SigningKey, tmp_path: Path
) -> None:
    pod = await app_pod(pods)
    with daemon(jwks_file, tmp_path / "no-docker.sock") as (url, _):
        async with aiohttp.ClientSession(url) as http:
            status, body = await post(http, "/freeze", token(key, pod))
    assert status == 502, body
    assert "--docker-socket" in body["error"], body
    assert await untouched(pod)


async def test_a_starting_daemon_thaws_what_a_dead_one_left_paused(
    pods: DockerPods, engine: Dockerd, jwks_file: Path, key: SigningKey
) -> None:
    ours = await app_pod(pods)
    theirs = pods.create_pod([ticker(USER), sleeper("queue-proxy")])  # no sidecar of ours
    pods.pause(ours, USER)
    pods.pause(theirs, USER)
    assert ours.state(USER) == theirs.state(USER) == "paused"

    with daemon(jwks_file, engine.socket) as (url, log):
        assert ours.state(USER) == "running"  # thawed before it listened
        assert await ticking(ours)
        assert theirs.state(USER) == "paused"  # not ours to thaw
        assert "start_thawed" in log.read_text()
        # And its own stop thaws what it froze.
        async with aiohttp.ClientSession(url) as http:
            assert (await post(http, "/freeze", token(key, ours)))[0] == 200
        assert ours.state(USER) == "paused"
    assert ours.state(USER) == "running"
    assert theirs.state(USER) == "paused"
