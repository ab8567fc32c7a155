"""The daemon's way out and its start, over real HTTP with the in-memory runtime: what it holds
frozen is thawed when it stops (through the pods' locks), freezes meanwhile are refused, and a
new daemon thaws what a dead one left paused in our pods only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.api import HELD_FROZEN, POD_LOCKS, make_app, thaw_on_stop
from daemon.auth import JwtVerifier, KeyCache, PodTokenAuthenticator
from daemon.lifecycle import thaw_left_frozen
from daemon.runtimes import ContainerNotFound, RuntimeFailure
from testbed.tokens import DEFAULT_ISSUER, SigningKey, mint_token, new_rsa_key
from tests.pod_checks import until
from tests.test_daemon_api import POD_A, POD_B, FakeRuntime, StaticKeys

UID_A, UID_B = POD_A["pod_uid"], POD_B["pod_uid"]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture
async def client(key: SigningKey) -> AsyncIterator[TestClient[Any, Any]]:
    keys = KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)
    auth = PodTokenAuthenticator(JwtVerifier(keys), None)
    async with TestClient(TestServer(make_app(auth, FakeRuntime()))) as c:
        yield c


def runtime_of(client: TestClient[Any, Any]) -> FakeRuntime:
    from daemon.api import RUNTIME

    runtime = client.app[RUNTIME]
    assert isinstance(runtime, FakeRuntime)
    return runtime


async def post(
    client: TestClient[Any, Any], key: SigningKey, path: str, pod: dict[str, Any] = POD_A
) -> tuple[int, dict[str, Any]]:
    async with client.post(path, headers={"Token": mint_token(key, **pod)}) as r:
        body: dict[str, Any] = await r.json()
        return r.status, body


async def test_stop_thaws_every_pod_this_daemon_froze_and_only_those(
    client: TestClient[Any, Any], key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = runtime_of(client)
    assert (await post(client, key, "/freeze"))[0] == 200
    assert (await post(client, key, "/freeze", POD_B))[0] == 200
    assert (await post(client, key, "/thaw", POD_B))[0] == 200  # its proxy thawed it already
    runtime.calls.clear()
    with caplog.at_level(logging.INFO, logger="daemon.api"):
        outcomes = await thaw_on_stop(client.app)
    assert outcomes == {UID_A: "stop_thawed"}
    assert runtime.calls == [("resume", UID_A, [])]
    assert set(runtime.pods[UID_A].values()) == {"running"}
    logged = [r for r in caplog.records if getattr(r, "outcome", None) == "stop_thawed"]
    assert [(r.pod_uid, r.namespace, r.pod_name) for r in logged] == [  # type: ignore[attr-defined]
        (UID_A, POD_A["namespace"], POD_A["pod_name"])
    ]
    assert len(client.app[HELD_FROZEN]) == 0


async def test_freezes_during_the_stop_get_503_and_are_not_carried_out(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    runtime = runtime_of(client)
    await thaw_on_stop(client.app)
    status, body = await post(client, key, "/freeze")
    assert status == 503 and body["cause"] == "stopping", body
    assert "stopping" in body["error"]
    async with client.post(
        "/", headers={"Token": mint_token(key, **POD_A)}, json={"action": "pause"}
    ) as r:
        assert r.status == 503 and (await r.json())["cause"] == "stopping"
    assert runtime.calls == []
    # Thaws are still served: a proxy resuming its app on the daemon's way out.
    assert (await post(client, key, "/thaw"))[0] == 200


async def test_a_freeze_waiting_for_the_pods_lock_when_the_stop_begins_is_refused(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    """One freeze is in the runtime, a second waits for the pod's lock: the stop's thaw queues
    behind the first (never racing it), and the second, let in after, is refused in the lock."""
    runtime = runtime_of(client)
    runtime.delay = 0.3
    first = asyncio.ensure_future(post(client, key, "/freeze"))
    while not runtime.active.get(UID_A):
        await asyncio.sleep(0.005)
    second = asyncio.ensure_future(post(client, key, "/freeze?container=sidecar"))
    locks = client.app[POD_LOCKS]._locks
    await until(lambda: locks[UID_A][1] == 2, "the second freeze waiting for the pod's lock")
    outcomes = await thaw_on_stop(client.app)
    assert (await first)[0] == 200
    status, body = await second
    assert status == 503 and body["cause"] == "stopping", body
    assert outcomes == {UID_A: "stop_thawed"}
    assert runtime.max_active == 1, "a thaw overlapped a freeze of the same pod"
    assert [verb for verb, _, _ in runtime.calls] == ["pause", "resume"]
    assert set(runtime.pods[UID_A].values()) == {"running"}


async def test_a_narrowed_freeze_is_thawed_with_its_narrowing(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    runtime = runtime_of(client)
    assert (await post(client, key, "/freeze?container=sidecar"))[0] == 200
    runtime.calls.clear()
    assert await thaw_on_stop(client.app) == {UID_A: "stop_thawed"}
    assert runtime.calls == [("resume", UID_A, ["sidecar"])]


async def test_a_failed_freeze_is_still_thawed_on_the_way_out(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    """A freeze the runtime failed may have frozen some containers: it is held all the same."""
    runtime = runtime_of(client)
    runtime.fail = RuntimeFailure("containerd pause of container x: DEADLINE_EXCEEDED")
    assert (await post(client, key, "/freeze"))[0] == 502
    runtime.fail = None
    assert await thaw_on_stop(client.app) == {UID_A: "stop_thawed"}


async def test_a_pod_deleted_while_frozen_is_reported_gone_on_the_way_out(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    runtime = runtime_of(client)
    assert (await post(client, key, "/freeze"))[0] == 200
    assert (await post(client, key, "/freeze", POD_B))[0] == 200
    del runtime.pods[UID_B]  # deleted while frozen
    outcomes = await thaw_on_stop(client.app)
    assert outcomes == {UID_A: "stop_thawed", UID_B: "stop_thaw_not_found"}


async def test_stop_is_bounded_in_total(client: TestClient[Any, Any], key: SigningKey) -> None:
    runtime = runtime_of(client)
    assert (await post(client, key, "/freeze"))[0] == 200
    runtime.delay = 5.0
    started = asyncio.get_running_loop().time()
    assert await thaw_on_stop(client.app, budget=0.2) == {UID_A: "stop_thaw_timeout"}
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_a_runtime_failure_on_the_way_out_is_reported(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    runtime = runtime_of(client)
    assert (await post(client, key, "/freeze"))[0] == 200
    runtime.fail = RuntimeFailure("containerd resume: UNAVAILABLE")
    assert await thaw_on_stop(client.app) == {UID_A: "stop_thaw_failed"}


# -- start ---------------------------------------------------------------------------------


async def test_start_thaws_paused_containers_of_pods_with_our_sidecar_only() -> None:
    runtime = FakeRuntime()  # POD_A has a freeze-proxy container, POD_B has none
    runtime.pods[UID_A]["user-container"] = "paused"
    runtime.pods[UID_B]["user-container"] = "paused"
    outcomes = await thaw_left_frozen(runtime)
    assert outcomes == {f"{UID_A}/user-container": "start_thawed"}
    assert runtime.pods[UID_A]["user-container"] == "running"
    assert runtime.pods[UID_B]["user-container"] == "paused", "someone else's pause"


async def test_start_goes_on_when_the_runtime_cannot_list_or_resume(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unlisted(FakeRuntime):
        async def list_containers(self) -> Any:
            raise RuntimeFailure("containerd CRI listing: UNAVAILABLE")

    assert await thaw_left_frozen(Unlisted()) == {}
    assert any("cannot list" in r.getMessage() for r in caplog.records)

    runtime = FakeRuntime()
    runtime.pods[UID_A]["user-container"] = "paused"
    runtime.fail = ContainerNotFound("gone")
    assert await thaw_left_frozen(runtime) == {f"{UID_A}/user-container": "start_thaw_not_found"}
    runtime.fail = RuntimeFailure("containerd resume: UNAVAILABLE")
    assert await thaw_left_frozen(runtime) == {f"{UID_A}/user-container": "start_thaw_failed"}
