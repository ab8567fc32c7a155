"""The real ``python -m daemon`` over HTTP against a real containerd + runc (test-bed pods).

Tokens are minted locally (testbed.tokens) and verified by the daemon against a JWKS file with
``--no-token-review``; what is checked here is that a pod's own token, and only that, moves
that pod's containers, as the kernel's freezer and the container's log show.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testbed.containerd import Containerd
from testbed.pods import MakePod, Pod
from testbed.tokens import SigningKey, mint_token, new_rsa_key, write_jwks
from tests.daemon_process import daemon_process
from tests.pod_checks import USER, eventually, log_grows, log_is_quiet

pytestmark = [pytest.mark.containerd, pytest.mark.containerd_flavors]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def daemon_url(
    containerd: Containerd, key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The daemon process, pointed at the test bed's containerd socket and namespace."""
    jwks_file = write_jwks(tmp_path_factory.mktemp("daemon") / "jwks.json", key)
    backend = [
        "--runtime=containerd",
        f"--containerd-socket={containerd.socket}",
        f"--containerd-namespace={containerd.namespace}",
    ]
    with daemon_process(jwks_file, backend) as (url, proc):
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


@pytest.fixture
async def http(daemon_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(daemon_url) as session:
        yield session


def token(key: SigningKey, pod: Pod, **kwargs: Any) -> dict[str, str]:
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


async def running(pod: Pod) -> bool:
    """Untouched: the freezer is THAWED, Tasks says RUNNING, and the log still grows."""
    return (
        pod.freezer_state(USER) == "THAWED"
        and await pod.task_status(USER) == "RUNNING"
        and await log_grows(pod)
    )


async def ticking_pod(make_pod: MakePod) -> Pod:
    pod = await make_pod(queue_proxy=True)
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"
    return pod


async def test_own_token_freezes_and_thaws(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)

    status, body = await post(http, "/freeze", token(key, pod))
    assert status == 200, body
    assert body["pod_uid"] == pod.uid and body["containers"] == [USER]
    assert body["state"] == "frozen" and body["took_ms"] > 0
    assert pod.freezer_state(USER) == "FROZEN"
    assert await pod.task_status(USER) == "PAUSED"
    assert pod.freezer_state("queue-proxy") == "THAWED"  # never frozen
    assert await log_is_quiet(pod)

    status, body = await post(http, "/freeze", token(key, pod))  # already frozen: success
    assert (status, body["state"]) == (200, "frozen")

    status, body = await post(http, "/thaw", token(key, pod))
    assert (status, body["state"], body["containers"]) == (200, "thawed", [USER])
    assert await running(pod)

    status, body = await post(http, "/thaw", token(key, pod))  # already running: success
    assert (status, body["state"]) == (200, "thawed")


async def test_knative_protocol_pauses_and_resumes(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)
    status, body = await post(http, "/", token(key, pod), json={"action": "pause"})
    assert (status, body["state"]) == (200, "frozen")
    assert pod.freezer_state(USER) == "FROZEN"
    status, body = await post(http, "/", token(key, pod), json={"action": "resume"})
    assert (status, body["state"]) == (200, "thawed")
    assert await running(pod)


async def test_another_pods_token_cannot_touch_it(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    victim = await ticking_pod(make_pod)
    other = await ticking_pod(make_pod)

    status, body = await post(http, "/freeze", token(key, other))
    assert (status, body["pod_uid"]) == (200, other.uid)
    assert other.freezer_state(USER) == "FROZEN"
    assert await running(victim)

    # Naming the victim's uid anywhere in the request changes nothing: only the token counts.
    headers = {**token(key, other), "X-Pod-Uid": victim.uid}
    status, body = await post(http, "/", headers, json={"action": "pause", "pod_uid": victim.uid})
    assert (status, body["pod_uid"]) == (200, other.uid)
    status, _ = await post(http, f"/freeze?pod_uid={victim.uid}", token(key, other))
    assert status == 400
    assert await running(victim)
    await post(http, "/thaw", token(key, other))


def _swap_pod_uid(tok: str, uid: str) -> str:
    """Keep the signature, change the pod uid in the payload (a forgery attempt)."""
    head, body, sig = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["kubernetes.io"]["pod"]["uid"] = uid
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def _alg_none(tok: str) -> str:
    _, body, _ = tok.split(".")
    head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    return f"{head}.{body}."


async def test_every_bad_token_is_refused_and_touches_nothing(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    victim = await ticking_pod(make_pod)
    attacker = await ticking_pod(make_pod)
    now = time.time()
    bad: dict[str, dict[str, str]] = {
        "expired": token(key, victim, now=now - 3600),
        "wrong audience": token(key, victim, audience="vault"),
        "wrong issuer": token(key, victim, issuer="https://evil.example"),
        "not valid yet": token(key, victim, nbf=int(now) + 600),
        "bad signature": token(new_rsa_key(kid=key.kid), victim),
        "unknown key id": token(new_rsa_key(), victim),
        "pod uid swapped": {"Token": _swap_pod_uid(token(key, attacker)["Token"], victim.uid)},
        "alg none": {"Token": _alg_none(token(key, victim)["Token"])},
        "junk": {"Token": "junk"},
    }
    for kind, headers in bad.items():
        for path, kwargs in (("/freeze", {}), ("/", {"json": {"action": "pause"}})):
            status, body = await post(http, path, headers, **kwargs)
            assert status == 403, (kind, body)
            assert body["error"].startswith("token refused"), (kind, body)
    status, _ = await post(http, "/freeze", {})
    assert status == 400
    assert await running(victim)
    assert await running(attacker)


async def test_missing_container_is_404(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)
    status, body = await post(http, "/freeze?container=no-such-container", token(key, pod))
    assert status == 404, body
    assert "no-such-container" in body["error"]
    assert await running(pod)


async def test_pod_not_on_this_node_is_404(
    make_pod: MakePod, http: aiohttp.ClientSession, key: SigningKey
) -> None:
    pod = await ticking_pod(make_pod)
    await pod.remove()
    status, body = await post(http, "/freeze", token(key, pod))
    assert status == 404, body
    assert body["pod_uid"] == pod.uid
