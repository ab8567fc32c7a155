"""Calls for one pod are carried out in the order the proxy sent them, not the order they arrive.

A pause that timed out on the proxy is still carried out by the daemon, possibly after a later
resume sent on another connection: without ordering the app ends frozen while the proxy believes
it awake. The proxy stamps each call (header ``Freeze-Sequence``, CLOCK_MONOTONIC ns); the daemon
refuses a call older than one it already carried out for that pod with 409, runtime untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.api import make_app
from daemon.auth import Authenticator, JwtVerifier, KeyCache, PodTokenAuthenticator
from daemon.claims import Identity
from daemon.ordering import CallOrder, parse_sequence
from testbed.tokens import DEFAULT_ISSUER, SigningKey, mint_token, new_rsa_key
from tests.pod_checks import until
from tests.proxy_harness import free_port, start_site
from tests.test_daemon_api import POD_A, POD_B, FakeRuntime, StaticKeys
from tests.test_no_daemon import real_proxy

UID = "pod-1"

# -- the pure bookkeeping ---------------------------------------------------------------------


def test_a_call_older_than_one_carried_out_is_refused_and_names_the_newer_one() -> None:
    order = CallOrder()
    assert order.admit(UID, 10, now=0.0) is None
    assert order.admit(UID, 20, now=0.1) is None
    assert order.admit(UID, 15, now=0.2) == 20
    assert order.admit(UID, 20, now=0.3) is None  # the same call again (a re-sent request)
    assert order.admit(UID, 21, now=0.4) is None
    assert order.admit(UID, 20, now=0.5) == 21


def test_pods_are_ordered_independently() -> None:
    order = CallOrder()
    assert order.admit("a", 100, now=0.0) is None
    assert order.admit("b", 5, now=0.0) is None
    assert order.admit("a", 50, now=0.0) == 100
    assert order.admit("b", 6, now=0.0) is None


def test_entries_expire() -> None:
    order = CallOrder(ttl=60.0)
    order.admit(UID, 100, now=0.0)
    assert order.admit(UID, 50, now=59.0) == 100
    assert order.admit(UID, 50, now=59.0 + 60.0 + 1) is None  # forgotten: nothing to compare
    assert len(order) == 1


def test_size_is_bounded_dropping_the_least_recently_used() -> None:
    order = CallOrder(max_pods=3)
    for i, uid in enumerate("abcd"):
        order.admit(uid, 10, now=float(i))
    assert len(order) == 3
    assert order.admit("a", 1, now=5.0) is None  # "a" was dropped to make room for "d"
    assert order.admit("d", 1, now=5.0) == 10


def test_expired_entries_are_dropped_when_others_are_added() -> None:
    order = CallOrder(ttl=10.0)
    for i in range(100):
        order.admit(f"pod-{i}", 1, now=float(i))
    assert len(order) <= 11


@pytest.mark.parametrize(
    ("text", "value"),
    [(None, None), ("0", 0), ("123", 123), (" 42 ", 42), (str(2**64 - 1), 2**64 - 1)],
)
def test_sequences_are_read(text: str | None, value: int | None) -> None:
    assert parse_sequence(text) == value


@pytest.mark.parametrize(
    "text", ["", "-1", "1.5", "0x10", "abc", "1 2", str(2**64), "\u0661\u0662"]
)
def test_bad_sequences_are_refused_naming_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="Freeze-Sequence"):
        parse_sequence(text)


# -- the daemon's API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


def authenticator(key: SigningKey) -> PodTokenAuthenticator:
    return PodTokenAuthenticator(
        JwtVerifier(KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)), None
    )


@contextlib.asynccontextmanager
async def daemon_client(
    auth: Authenticator, runtime: FakeRuntime
) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(auth, runtime))) as c:
        yield c


def headers(key: SigningKey, seq: int | None, pod: dict[str, Any] = POD_A) -> dict[str, str]:
    out = {"Token": mint_token(key, **pod)}
    if seq is not None:
        out["Freeze-Sequence"] = str(seq)
    return out


async def test_the_daemon_refuses_an_older_call_with_409_without_touching_the_runtime(
    key: SigningKey,
) -> None:
    runtime = FakeRuntime()
    async with daemon_client(authenticator(key), runtime) as c:
        async with c.post("/thaw", headers=headers(key, 200)) as r:
            assert r.status == 200
        async with c.post("/freeze", headers=headers(key, 100)) as r:
            assert r.status == 409
            body = await r.json()
        assert body["cause"] == "out-of-order"
        assert body["sequence"] == 100 and body["newer"] == 200
        assert body["pod_uid"] == POD_A["pod_uid"]
        assert "later call" in body["error"]
        assert [verb for verb, _, _ in runtime.calls] == ["resume"]
        assert runtime.pods[POD_A["pod_uid"]]["user-container"] == "running"
        # Another pod's calls are not compared with pod A's.
        async with c.post("/freeze", headers=headers(key, 100, POD_B)) as r:
            assert r.status == 200
        # Calls without the header (Knative's protocol) are unchanged.
        async with c.post("/", headers=headers(key, None), json={"action": "pause"}) as r:
            assert r.status == 200
        async with c.post("/freeze", headers=headers(key, 300)) as r:
            assert r.status == 200


async def test_a_bad_sequence_is_400(key: SigningKey) -> None:
    runtime = FakeRuntime()
    async with daemon_client(authenticator(key), runtime) as c:
        h = {**headers(key, None), "Freeze-Sequence": "soon"}
        async with c.post("/freeze", headers=h) as r:
            assert r.status == 400
            assert "Freeze-Sequence" in (await r.json())["error"]
    assert runtime.calls == []


class SlowFirstCall:
    """The real authenticator, but its first call takes ``delay`` s (a slow TokenReview)."""

    def __init__(self, inner: Authenticator, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.calls = 0

    async def authenticate(self, token: str, *, thaw: bool = False) -> Identity:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(self.delay)
        return await self.inner.authenticate(token, thaw=thaw)


async def test_order_holds_when_the_older_call_authenticates_slower(key: SigningKey) -> None:
    """The sequence is checked under the pod's lock, after authentication: a call overtaken
    while authenticating is refused, not carried out after the newer one."""
    runtime = FakeRuntime()
    async with daemon_client(SlowFirstCall(authenticator(key), 0.3), runtime) as c:

        async def post(path: str, seq: int) -> int:
            async with c.post(path, headers=headers(key, seq)) as r:
                return r.status

        late = asyncio.ensure_future(post("/freeze", 1))
        await asyncio.sleep(0.05)
        assert await post("/thaw", 2) == 200
        assert await late == 409
    assert runtime.pods[POD_A["pod_uid"]]["user-container"] == "running"


# -- end to end: the real proxy process and the daemon's HTTP surface -------------------------


async def test_a_late_pause_cannot_freeze_an_app_the_proxy_believes_awake(
    tmp_path: Path, key: SigningKey
) -> None:
    """The proxy's first pause takes longer than its 2 s call timeout (a slow authentication):
    the proxy counts the app as maybe frozen, a request resumes it on a new connection, and
    then the late pause reaches the runtime step. It must be refused, and the app stays awake."""
    runtime = FakeRuntime()
    uid = POD_A["pod_uid"]
    violations: list[str] = []

    async def app_handler(request: web.Request) -> web.Response:
        if runtime.pods[uid]["user-container"] != "running":
            violations.append(request.path)
        return web.Response(text="hello")

    answered: list[tuple[str, int]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        answered.append((request.path, response.status))
        return response

    daemon = make_app(SlowFirstCall(authenticator(key), 2.6), runtime)
    daemon.middlewares.append(record)
    daemon_port = free_port()
    app = web.Application()
    app.router.add_get("/{tail:.*}", app_handler)
    app_port = free_port()
    runners = [await start_site(daemon, daemon_port), await start_site(app, app_port)]
    try:
        async with real_proxy(
            tmp_path,
            app_port,
            f"http://127.0.0.1:{daemon_port}",
            "--grace=1500ms",
            token=mint_token(key, **POD_A),
        ) as proxy:
            health: dict[str, Any] = {}

            async def state() -> str:
                nonlocal health
                health = await proxy.health()
                return str(health["state"])

            deadline = time.monotonic() + 15
            while await state() != "frozen":  # the pause timed out: maybe frozen
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.02)
            assert runtime.calls == [], "the slow pause reached the runtime already"
            async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/x") as r:
                assert r.status == 200
            assert [v for v, _, _ in runtime.calls] == ["resume"]
            # The late pause now reaches the daemon's runtime step.
            await until(lambda: ("/freeze", 409) in answered or len(answered) >= 2, "answered")
            assert await state() == "awake", health
            assert runtime.pods[uid]["user-container"] == "running", (
                f"the late pause froze an app the proxy believes awake: {answered}"
            )
            assert ("/freeze", 409) in answered, answered
    finally:
        for runner in runners:
            await runner.cleanup()
    assert violations == []
