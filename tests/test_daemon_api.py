"""daemon.api over real HTTP: the status-code table, both protocols, container narrowing.

The authenticator is the real one (real keys, real PyJWT; TokenReview off), so the pod acted on
really comes from a signed token. The runtime is a small in-memory fake (the containerd backend
has its own tests). The last tests start the real ``python -m daemon`` process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.api import make_app
from daemon.auth import AuthUnavailable, JwtVerifier, KeyCache, KeyDocument, PodTokenAuthenticator
from daemon.claims import Identity
from daemon.runtimes import NEVER_FROZEN, ContainerNotFound, ListedContainer, RuntimeFailure
from testbed.processes import free_port, wait_listening
from testbed.tokens import DEFAULT_ISSUER, SigningKey, jwks, mint_token, new_rsa_key, write_jwks

POD_A: dict[str, Any] = {
    "pod_uid": "aaaaaaaa-0000-4000-8000-000000000001",
    "pod_name": "a-1",
    "namespace": "shop",
}
POD_B: dict[str, Any] = {
    "pod_uid": "bbbbbbbb-0000-4000-8000-000000000002",
    "pod_name": "b-1",
    "namespace": "shop",
}
ABSENT: dict[str, Any] = {
    "pod_uid": "cccccccc-0000-4000-8000-000000000003",
    "pod_name": "c-1",
    "namespace": "x",
}


class FakeRuntime:
    """In-memory pods: pod uid -> container name -> "running" | "paused"."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, str]] = {
            POD_A["pod_uid"]: {
                "user-container": "running",
                "sidecar": "running",
                "queue-proxy": "running",
                "freeze-proxy": "running",
            },
            POD_B["pod_uid"]: {"user-container": "running", "queue-proxy": "running"},
        }
        self.calls: list[tuple[str, str, list[str]]] = []
        self.fail: Exception | None = None
        self.delay = 0.0
        self.active: dict[str, int] = {}
        self.max_active = 0
        self.closed = False

    async def _set(
        self, verb: str, pod_uid: str, containers: Sequence[str], state: str
    ) -> list[str]:
        self.calls.append((verb, pod_uid, list(containers)))
        self.active[pod_uid] = self.active.get(pod_uid, 0) + 1
        self.max_active = max(self.max_active, self.active[pod_uid])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            pod = self.pods.get(pod_uid)
            if pod is None:
                raise ContainerNotFound(f"no running pod {pod_uid} on this node")
            names = list(containers) or [n for n in pod if n not in NEVER_FROZEN]
            for name in names:
                if name not in pod:
                    raise ContainerNotFound(f"pod {pod_uid} has no running container {name!r}")
            for name in names:
                pod[name] = state
            return names
        finally:
            self.active[pod_uid] -= 1

    async def pause(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        return await self._set("pause", pod_uid, containers, "paused")

    async def resume(self, pod_uid: str, containers: Sequence[str]) -> list[str]:
        return await self._set("resume", pod_uid, containers, "running")

    async def list_containers(self) -> list[ListedContainer]:
        return [
            ListedContainer(uid, "pod", "ns", name, f"{uid}/{name}", state.upper())
            for uid, pod in self.pods.items()
            for name, state in pod.items()
        ]

    async def resume_container(self, container_id: str) -> None:
        uid, _, name = container_id.partition("/")
        self.calls.append(("resume_container", uid, [name]))
        if self.fail is not None:
            raise self.fail
        if name not in self.pods.get(uid, {}):
            raise ContainerNotFound(f"no task {container_id}")
        self.pods[uid][name] = "running"

    async def close(self) -> None:
        self.closed = True


class StaticKeys:
    def __init__(self, key: SigningKey) -> None:
        self.key = key

    async def __call__(self) -> KeyDocument:
        return KeyDocument(jwks=jwks(self.key))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
async def client(key: SigningKey, runtime: FakeRuntime) -> AsyncIterator[TestClient[Any, Any]]:
    auth = PodTokenAuthenticator(
        JwtVerifier(KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)), None
    )
    async with TestClient(TestServer(make_app(auth, runtime))) as c:
        yield c


def tok(key: SigningKey, pod: dict[str, Any] = POD_A, **kw: Any) -> dict[str, str]:
    return {"Token": mint_token(key, **pod, **kw)}


async def call(
    client: TestClient[Any, Any], method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with client.request(method, path, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        body: dict[str, Any] = await resp.json()
        return resp.status, body


# ------------------------------------------------------------------ 200


async def test_healthz(client: TestClient[Any, Any]) -> None:
    assert await call(client, "GET", "/healthz") == (200, {"status": "ok"})


async def test_freeze_then_thaw(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    status, body = await call(client, "POST", "/freeze", headers=tok(key))
    assert status == 200
    assert set(body) == {"pod_uid", "containers", "state", "took_ms"}
    assert body["pod_uid"] == POD_A["pod_uid"]
    assert body["containers"] == ["user-container", "sidecar"]
    assert body["state"] == "frozen" and body["took_ms"] >= 0
    pod = runtime.pods[POD_A["pod_uid"]]
    assert pod == {
        "user-container": "paused",
        "sidecar": "paused",
        "queue-proxy": "running",
        "freeze-proxy": "running",
    }
    status, body = await call(client, "POST", "/thaw", headers=tok(key))
    assert (status, body["state"]) == (200, "thawed")
    assert set(pod.values()) == {"running"}
    assert runtime.calls[0] == ("pause", POD_A["pod_uid"], [])  # default: the runtime decides


async def test_idempotent_success(client: TestClient[Any, Any], key: SigningKey) -> None:
    for path, state in [
        ("/freeze", "frozen"),
        ("/freeze", "frozen"),
        ("/thaw", "thawed"),
        ("/thaw", "thawed"),
    ]:
        status, body = await call(client, "POST", path, headers=tok(key))
        assert (status, body["state"]) == (200, state)


@pytest.mark.parametrize(
    "action,state,pod_state", [("pause", "frozen", "paused"), ("resume", "thawed", "running")]
)
async def test_knative_protocol(
    client: TestClient[Any, Any],
    key: SigningKey,
    runtime: FakeRuntime,
    action: str,
    state: str,
    pod_state: str,
) -> None:
    status, body = await call(client, "POST", "/", headers=tok(key), json={"action": action})
    assert (status, body["state"], body["pod_uid"]) == (200, state, POD_A["pod_uid"])
    assert runtime.pods[POD_A["pod_uid"]]["user-container"] == pod_state


async def test_knative_body_without_content_type(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    status, _ = await call(client, "POST", "/", headers=tok(key), data=b'{"action": "pause"}')
    assert status == 200


async def test_knative_queue_proxy_audience_when_configured(
    key: SigningKey, runtime: FakeRuntime
) -> None:
    """queue-proxy sends a token of audience concurrency-state-hook: --audience makes that work."""
    keys = KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)
    auth = PodTokenAuthenticator(JwtVerifier(keys, audience="concurrency-state-hook"), None)
    async with TestClient(TestServer(make_app(auth, runtime))) as c:
        headers = tok(key, audience="concurrency-state-hook")
        status, _ = await call(c, "POST", "/", headers=headers, json={"action": "pause"})
        assert status == 200


# ------------------------------------------------------------------ narrowing


async def test_narrow_to_one_container(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    status, body = await call(client, "POST", "/freeze?container=sidecar", headers=tok(key))
    assert (status, body["containers"]) == (200, ["sidecar"])
    assert runtime.pods[POD_A["pod_uid"]]["user-container"] == "running"
    assert runtime.pods[POD_A["pod_uid"]]["sidecar"] == "paused"


async def test_narrow_repeatable_and_deduplicated(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    path = "/?container=sidecar&container=user-container&container=sidecar"
    status, body = await call(client, "POST", path, headers=tok(key), json={"action": "pause"})
    assert (status, body["containers"]) == (200, ["sidecar", "user-container"])
    assert runtime.calls[-1][2] == ["sidecar", "user-container"]


@pytest.mark.parametrize(
    "query,fragment",
    [
        ("container=User", "DNS-1123"),
        ("container=", "DNS-1123"),
        ("container=-x", "DNS-1123"),
        ("container=a_b", "DNS-1123"),
        ("container=" + "a" * 64, "DNS-1123"),
        ("container=x%0A", "DNS-1123"),
        ("container=queue-proxy", "never frozen"),
        ("container=freeze-proxy", "never frozen"),
        ("containers=sidecar", "unknown query parameter"),
        ("pod_uid=bbbbbbbb-0000-4000-8000-000000000002", "unknown query parameter"),
    ],
)
async def test_bad_narrowing_is_400(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime, query: str, fragment: str
) -> None:
    status, body = await call(client, "POST", f"/freeze?{query}", headers=tok(key))
    assert status == 400 and fragment in body["error"]
    assert runtime.calls == []


async def test_narrowing_cannot_reach_another_pod(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    """Pod B's container name in pod A's request still means pod A (which has no such one)."""
    runtime.pods[POD_B["pod_uid"]]["only-in-b"] = "running"
    status, body = await call(client, "POST", "/freeze?container=only-in-b", headers=tok(key))
    assert status == 404 and "only-in-b" in body["error"]
    assert runtime.pods[POD_B["pod_uid"]]["only-in-b"] == "running"


# ------------------------------------------------------------------ the pod comes from the token


async def test_pod_uid_in_request_is_ignored(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    headers = {
        **tok(key, POD_A),
        "X-Pod-Uid": POD_B["pod_uid"],
        "Pod-Uid": POD_B["pod_uid"],
    }
    body = {"action": "pause", "pod_uid": POD_B["pod_uid"], "podUID": POD_B["pod_uid"]}
    status, answer = await call(client, "POST", "/", headers=headers, json=body)
    assert (status, answer["pod_uid"]) == (200, POD_A["pod_uid"])
    assert set(runtime.pods[POD_B["pod_uid"]].values()) == {"running"}
    assert {uid for _, uid, _ in runtime.calls} == {POD_A["pod_uid"]}


async def test_each_token_moves_only_its_own_pod(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    await call(client, "POST", "/freeze", headers=tok(key, POD_B))
    assert runtime.pods[POD_B["pod_uid"]]["user-container"] == "paused"
    assert runtime.pods[POD_A["pod_uid"]]["user-container"] == "running"


# ------------------------------------------------------------------ 400 / 403


@pytest.mark.parametrize("path", ["/freeze", "/thaw", "/"])
@pytest.mark.parametrize("headers", [{}, {"Token": ""}, {"Token": "   "}])
async def test_missing_token_is_400(
    client: TestClient[Any, Any], runtime: FakeRuntime, path: str, headers: dict[str, str]
) -> None:
    status, body = await call(client, "POST", path, headers=headers, json={"action": "pause"})
    assert status == 400 and "missing Token header" in body["error"]
    assert runtime.calls == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'"pause"',
        b"{}",
        b'{"action": "freeze"}',
        b'{"action": "PAUSE"}',
        b'{"action": 1}',
        b'{"Action": "pause"}',
        b"\xff\xfe",
    ],
)
async def test_bad_knative_body_is_400(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime, data: bytes
) -> None:
    status, body = await call(client, "POST", "/", headers=tok(key), data=data)
    assert status == 400 and '{"action": "pause"}' in body["error"]
    assert runtime.calls == []


async def test_body_too_large_is_json(client: TestClient[Any, Any], key: SigningKey) -> None:
    status, body = await call(client, "POST", "/", headers=tok(key), data=b"x" * 10_000)
    assert status == 413 and "too large" in body["error"]


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"now": time.time() - 3600}, "token expired"),
        ({"audience": "vault"}, "wrong audience"),
        ({"issuer": "https://evil.example"}, "wrong issuer"),
        ({"nbf": int(time.time()) + 600}, "not valid yet"),
        ({"headers": {"kid": "rotated-away"}}, "unknown key id"),
    ],
)
async def test_refused_tokens_are_403_with_reason(
    client: TestClient[Any, Any],
    key: SigningKey,
    runtime: FakeRuntime,
    kwargs: dict[str, Any],
    reason: str,
) -> None:
    for path in ("/freeze", "/"):
        status, body = await call(
            client, "POST", path, headers=tok(key, **kwargs), json={"action": "pause"}
        )
        assert (
            status == 403
            and body["error"].startswith("token refused: ")
            and reason in body["error"]
        )
    assert runtime.calls == []


async def test_bad_signature_is_403(
    client: TestClient[Any, Any], runtime: FakeRuntime, key: SigningKey
) -> None:
    attacker = new_rsa_key(kid=key.kid)
    status, body = await call(client, "POST", "/freeze", headers=tok(attacker))
    assert status == 403 and "bad signature" in body["error"]
    assert runtime.calls == []


@pytest.mark.parametrize("token", ["junk", "a.b.c", "Bearer ", "eyJhbGciOiJub25lIn0.e30."])
async def test_junk_tokens_are_403(
    client: TestClient[Any, Any], runtime: FakeRuntime, token: str
) -> None:
    status, body = await call(client, "POST", "/thaw", headers={"Token": token})
    assert status == 403 and body["error"].startswith("token refused")
    assert runtime.calls == []


# ------------------------------------------------------------------ 404 / 405


async def test_pod_not_on_this_node_is_404(client: TestClient[Any, Any], key: SigningKey) -> None:
    status, body = await call(client, "POST", "/freeze", headers=tok(key, ABSENT))
    assert status == 404 and ABSENT["pod_uid"] in body["error"]
    assert body["pod_uid"] == ABSENT["pod_uid"]


async def test_missing_container_is_404(client: TestClient[Any, Any], key: SigningKey) -> None:
    status, body = await call(client, "POST", "/freeze?container=nope", headers=tok(key))
    assert status == 404 and "nope" in body["error"]


async def test_runtime_doing_nothing_is_never_200(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    runtime.pods[POD_B["pod_uid"]] = {"queue-proxy": "running"}  # nothing freezable
    status, body = await call(client, "POST", "/freeze", headers=tok(key, POD_B))
    assert status == 404 and "no container" in body["error"]


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/freeze"), ("PUT", "/thaw"), ("GET", "/"), ("DELETE", "/"), ("POST", "/healthz")],
)
async def test_wrong_method_is_405_json(
    client: TestClient[Any, Any], method: str, path: str
) -> None:
    status, body = await call(client, method, path)
    assert status == 405 and "not allowed" in body["error"] and body["allowed"]


async def test_unknown_path_is_404_json(client: TestClient[Any, Any]) -> None:
    status, body = await call(client, "POST", "/pause")
    assert status == 404 and "POST /freeze" in body["error"]


# ------------------------------------------------------------------ 502 / 503


async def test_runtime_failure_is_502_with_its_message(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    runtime.fail = RuntimeFailure("containerd Tasks.Pause: UNAVAILABLE: connection refused")
    status, body = await call(client, "POST", "/freeze", headers=tok(key))
    assert status == 502 and "UNAVAILABLE: connection refused" in body["error"]


async def test_unexpected_runtime_exception_is_502(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    runtime.fail = ValueError("bug in the backend")
    status, body = await call(client, "POST", "/thaw", headers=tok(key))
    assert status == 502 and "ValueError: bug in the backend" in body["error"]


class UnavailableAuth:
    async def authenticate(self, token: str, *, thaw: bool = False) -> Identity:
        raise AuthUnavailable(
            "TokenReview answered 500: etcdserver: request timed out (10.9.8.7:2379)",
            cause="the API server's TokenReview is unavailable",
        )


async def test_auth_unavailable_is_503(
    runtime: FakeRuntime, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    async with TestClient(TestServer(make_app(UnavailableAuth(), runtime))) as c:
        status, body = await call(c, "POST", "/freeze", headers=tok(key))
    assert status == 503 and "retry" in body["error"]
    assert "TokenReview is unavailable" in body["error"]
    assert runtime.calls == []
    # The API server's own words go to the daemon's log only, never to an unauthenticated caller.
    assert "10.9.8.7" not in json.dumps(body) and "etcdserver" not in json.dumps(body)
    record = next(r for r in caplog.records if r.getMessage() == "cannot check token")
    assert "10.9.8.7" in record.__dict__["error"]


# ------------------------------------------------------------------ concurrency and logs


async def test_calls_for_one_pod_never_overlap(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    runtime.delay = 0.02
    headers = tok(key)
    results = await asyncio.gather(
        *(call(client, "POST", "/freeze" if i % 2 else "/thaw", headers=headers) for i in range(8)),
        call(client, "POST", "/freeze", headers=tok(key, POD_B)),
    )
    assert all(status == 200 for status, _ in results)
    assert runtime.max_active == 1


async def test_structured_log_of_an_action(
    client: TestClient[Any, Any], key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.api")
    await call(client, "POST", "/freeze", headers=tok(key))
    record = next(r for r in caplog.records if r.getMessage() == "frozen pod")
    assert record.__dict__["pod_uid"] == POD_A["pod_uid"]
    assert record.__dict__["pod_name"] == "a-1" and record.__dict__["namespace"] == "shop"
    assert record.__dict__["containers"] == ["user-container", "sidecar"]
    assert record.__dict__["outcome"] == "frozen" and record.__dict__["took_ms"] >= 0


async def test_refusals_are_logged_without_the_token(
    client: TestClient[Any, Any], key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.api")
    headers = tok(key, audience="vault")
    await call(client, "POST", "/freeze", headers=headers)
    record = next(r for r in caplog.records if r.getMessage() == "token refused")
    assert record.__dict__["outcome"] == "refused" and "wrong audience" in record.__dict__["reason"]
    assert headers["Token"] not in caplog.text


# ------------------------------------------------------------------ the real process


def _daemon(*args: str) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RUNTIME_TYPE", None)
    env.pop("CONTAINERD_SOCKET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def daemon_process(tmp_path: Path, key: SigningKey) -> Iterator[str]:
    pytest.importorskip("daemon.runtimes.containerd")
    port = free_port()
    jwks_file = write_jwks(tmp_path / "jwks.json", key)
    proc = _daemon(
        "--listen",
        f"127.0.0.1:{port}",
        "--no-token-review",
        "--jwks-file",
        str(jwks_file),
        "--issuer",
        DEFAULT_ISSUER,
        "--containerd-socket",
        str(tmp_path / "no-containerd.sock"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(proc, "127.0.0.1", port, "freeze-daemon")
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_real_daemon_process(daemon_process: str, key: SigningKey) -> None:
    async with aiohttp.ClientSession(daemon_process) as http:
        async with http.get("/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}

        async with http.post("/freeze", headers=tok(key)) as resp:
            body = await resp.json()
            assert resp.status == 502, body
            assert "containerd" in body["error"] and "--containerd-socket" in body["error"]
            assert body["pod_uid"] == POD_A["pod_uid"]

        async with http.post("/", headers=tok(key), json={"action": "resume"}) as resp:
            assert resp.status == 502

        for headers in (tok(key, audience="vault"), tok(new_rsa_key()), {"Token": "junk"}):
            async with http.post("/freeze", headers=headers) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"].startswith("token refused")

        async with http.post("/thaw") as resp:
            assert resp.status == 400
        async with http.get("/freeze") as resp:
            assert resp.status == 405


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no-token-review"], "--no-token-review needs --jwks-file and --issuer"),
        (["--no-token-review", "--jwks-file", "/x"], "--jwks-file needs --issuer"),
        (["--runtime", "crio"], "supported runtimes are containerd, docker"),
        (["--listen", "8080"], "expected HOST:PORT"),
    ],
)
def test_daemon_refuses_bad_flags(args: list[str], message: str) -> None:
    proc = _daemon(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in err.decode()


def test_daemon_refuses_unknown_runtime_from_env() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "daemon"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "RUNTIME_TYPE": "crio"},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "unknown runtime 'crio'" in proc.stderr.decode()


def test_daemon_stops_on_a_missing_jwks_file(tmp_path: Path) -> None:
    proc = _daemon(
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--no-token-review",
        "--jwks-file",
        str(tmp_path / "missing.json"),
        "--issuer",
        DEFAULT_ISSUER,
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    line = json.loads(err.decode().strip().splitlines()[-1])
    assert line["level"] == "error" and "cannot read JWKS file" in line["msg"]


def test_help_lists_every_flag() -> None:
    proc = _daemon("--help")
    out, _ = proc.communicate(timeout=30)
    for flag in (
        "--listen",
        "--runtime",
        "RUNTIME_TYPE",
        "--containerd-socket",
        "CONTAINERD_SOCKET",
        "--containerd-namespace",
        "--audience",
        "--jwks-file",
        "--issuer",
        "--token-review",
        "--no-token-review",
        "--kubeconfig",
        "--log-level",
    ):
        assert flag in out.decode(), flag


# ------------------------------------------------------------------ what a caller may cost


async def limited_client(
    key: SigningKey, runtime: FakeRuntime, **limits: Any
) -> TestClient[Any, Any]:
    from daemon.limits import LimitSettings

    auth = PodTokenAuthenticator(
        JwtVerifier(KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)), None
    )
    client: TestClient[Any, Any] = TestClient(
        TestServer(make_app(auth, runtime, LimitSettings(**limits)))
    )
    await client.start_server()
    return client


async def test_freezing_a_frozen_pod_costs_no_runtime_call(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    headers = tok(key)
    for _ in range(3):
        status, body = await call(client, "POST", "/freeze", headers=headers)
        assert (status, body["state"], body["containers"]) == (
            200,
            "frozen",
            ["user-container", "sidecar"],
        )
    assert body["unchanged"] is True
    for _ in range(3):
        status, body = await call(client, "POST", "/", headers=headers, json={"action": "resume"})
        assert (status, body["state"]) == (200, "thawed")
    assert [verb for verb, _, _ in runtime.calls] == ["pause", "resume"]


async def test_a_failed_call_forgets_the_state(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    headers = tok(key)
    assert (await call(client, "POST", "/freeze", headers=headers))[0] == 200
    runtime.fail = RuntimeFailure("containerd hiccup")
    assert (await call(client, "POST", "/thaw", headers=headers))[0] == 502
    runtime.fail = None
    assert (await call(client, "POST", "/freeze", headers=headers))[0] == 200
    assert (await call(client, "POST", "/freeze", headers=headers))[0] == 200
    assert [verb for verb, _, _ in runtime.calls] == ["pause", "resume", "pause"]


async def test_another_narrowing_is_never_a_noop(
    client: TestClient[Any, Any], key: SigningKey, runtime: FakeRuntime
) -> None:
    """A whole-pod thaw after a one-container freeze must reach the runtime."""
    headers = tok(key)
    assert (await call(client, "POST", "/thaw", headers=headers))[0] == 200
    assert (await call(client, "POST", "/freeze?container=sidecar", headers=headers))[0] == 200
    assert (await call(client, "POST", "/thaw", headers=headers))[0] == 200
    assert runtime.pods[POD_A["pod_uid"]]["sidecar"] == "running"
    assert [c for _, _, c in runtime.calls] == [[], ["sidecar"], []]


async def test_freezes_are_rate_limited_per_pod_thaws_never(
    key: SigningKey, runtime: FakeRuntime
) -> None:
    client = await limited_client(key, runtime, freeze_rate=0.01, freeze_burst=2)
    try:
        a, b = tok(key), tok(key, POD_B)
        for _ in range(2):
            assert (await call(client, "POST", "/freeze", headers=a))[0] == 200
            assert (await call(client, "POST", "/thaw", headers=a))[0] == 200
        async with client.post("/freeze", headers=a) as resp:
            body = await resp.json()
            assert resp.status == 429 and "stays thawed" in body["error"], body
            assert int(resp.headers["Retry-After"]) >= 1
        assert runtime.pods[POD_A["pod_uid"]]["user-container"] == "running"
        assert (await call(client, "POST", "/thaw", headers=a))[0] == 200
        assert (await call(client, "POST", "/freeze", headers=b))[0] == 200  # another pod
    finally:
        await client.close()


async def test_a_flood_of_bad_tokens_never_blocks_a_good_one(
    key: SigningKey, runtime: FakeRuntime
) -> None:
    client = await limited_client(
        key, runtime, refusal_rate=0.01, refusal_burst=5, refusal_delay=0.2
    )
    try:
        good = tok(key)
        assert (await call(client, "POST", "/thaw", headers=good))[0] == 200
        statuses = []
        started = time.monotonic()
        for token in ["junk", mint_token(new_rsa_key(), **ABSENT)] * 5:
            statuses.append((await call(client, "POST", "/freeze", headers={"Token": token}))[0])
        assert statuses[:5] == [403] * 5 and set(statuses[5:]) == {429}
        assert time.monotonic() - started >= 5 * 0.2  # each 429 made its caller wait
        # The flooded source (every pod of a node shares one behind hostPort's SNAT) still thaws
        # with a known token, and with a freshly rotated token of a pod known here.
        assert (await call(client, "POST", "/freeze", headers=good))[0] == 200
        assert (await call(client, "POST", "/thaw", headers=tok(key)))[0] == 200
        # A pod never seen here shares the source's bucket: its first call waits for a refill.
        status, body = await call(client, "POST", "/thaw", headers=tok(key, POD_B))
        assert status == 429 and "too many refused tokens" in body["error"]
    finally:
        await client.close()


async def test_a_slow_knative_body_is_408(key: SigningKey, runtime: FakeRuntime) -> None:
    client = await limited_client(key, runtime, body_timeout=0.2)
    try:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        token = mint_token(key, **POD_A)
        writer.write(
            f"POST / HTTP/1.1\r\nHost: x\r\nToken: {token}\r\nContent-Length: 30\r\n\r\n"
            '{"action": '.encode()
        )
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert time.monotonic() - started < 2
        writer.close()
        assert runtime.calls == []
    finally:
        await client.close()
