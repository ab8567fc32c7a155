"""The daemon's ``GET /metrics``: calls by action and status, runtime latency, refusals by
reason, TokenReviews made; over real HTTP with the real authenticator (tests/test_daemon_api)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from daemon.api import make_app
from daemon.auth import AuthUnavailable, JwtVerifier, KeyCache, PodTokenAuthenticator, TokenReviewer
from daemon.claims import TokenRefused
from daemon.metrics import CONTENT_TYPE, DaemonMetrics, backend_name
from testbed.tokens import DEFAULT_ISSUER, SigningKey, new_rsa_key
from tests.test_daemon_api import POD_A, FakeRuntime, StaticKeys, UnavailableAuth, tok

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture
async def client(key: SigningKey) -> AsyncIterator[TestClient[Any, Any]]:
    auth = PodTokenAuthenticator(
        JwtVerifier(KeyCache(StaticKeys(key), issuer=DEFAULT_ISSUER)), None
    )
    async with TestClient(TestServer(make_app(auth, FakeRuntime()))) as c:
        yield c


async def scrape(client: TestClient[Any, Any]) -> Samples:
    async with client.get("/metrics") as r:  # no Token header: Prometheus sends none
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_calls_by_action_and_status_and_runtime_latency(
    client: TestClient[Any, Any], key: SigningKey
) -> None:
    for path, body in (("/freeze", None), ("/thaw", None), ("/", {"action": "pause"})):
        async with client.post(path, headers=tok(key), json=body) as r:
            assert r.status == 200
    async with client.post("/freeze", headers=tok(key, pod=POD_A)) as r:
        assert r.status == 200  # already frozen as this daemon set it: no runtime call
    async with client.post("/", headers=tok(key), json={"action": "nap"}) as r:
        assert r.status == 400
    got = await scrape(client)
    assert at(got, "freeze_daemon_calls_total", action="pause", status="200") == 3
    assert at(got, "freeze_daemon_calls_total", action="resume", status="200") == 1
    assert at(got, "freeze_daemon_calls_total", action="unknown", status="400") == 1
    fake = {"backend": "fake"}
    assert at(got, "freeze_daemon_runtime_call_seconds_count", **fake, action="pause") == 2
    assert at(got, "freeze_daemon_runtime_call_seconds_count", **fake, action="resume") == 1
    assert (
        at(got, "freeze_daemon_runtime_call_seconds_bucket", **fake, action="pause", le="+Inf") == 2
    )
    assert ("process_cpu_seconds_total", ()) in got
    assert not any(name.endswith("_created") for name, _ in got)


async def test_refusals_by_reason(client: TestClient[Any, Any], key: SigningKey) -> None:
    async with client.post("/freeze") as r:
        assert r.status == 400
    async with client.post("/freeze", headers={"Token": "junk"}) as r:
        assert r.status == 403
    got = await scrape(client)
    assert at(got, "freeze_daemon_auth_refusals_total", reason="missing_token") == 1
    assert at(got, "freeze_daemon_auth_refusals_total", reason="refused") == 1
    assert at(got, "freeze_daemon_auth_refusals_total", reason="rate_limited") == 0
    assert ("freeze_daemon_auth_refusals_total", (("reason", "rate_limited"),)) in got
    assert at(got, "freeze_daemon_calls_total", action="pause", status="403") == 1


async def test_unavailable_auth_is_counted(key: SigningKey) -> None:
    async with TestClient(TestServer(make_app(UnavailableAuth(), FakeRuntime()))) as c:
        async with c.post("/thaw", headers=tok(key)) as r:
            assert r.status == 503
        got = await scrape(c)
    assert at(got, "freeze_daemon_auth_refusals_total", reason="unavailable") == 1
    assert at(got, "freeze_daemon_calls_total", action="resume", status="503") == 1


async def test_token_reviews_made_are_read_from_the_reviewer() -> None:
    answers: list[Any] = [{"authenticated": False, "error": "no"}, RuntimeError("down")]

    async def review(token: str, audiences: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    reviewer = TokenReviewer(review)
    metrics = DaemonMetrics("containerd")
    metrics.count_reviews(lambda: (reviewer.answered_calls, reviewer.failed_calls))
    with pytest.raises(TokenRefused):
        await reviewer.review("a")
    with pytest.raises(AuthUnavailable):
        await reviewer.review("b")
    got = {
        (s.name, s.labels.get("result")): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    assert got[("freeze_daemon_token_reviews_total", "answered")] == 1
    assert got[("freeze_daemon_token_reviews_total", "failed")] == 1


async def test_jwks_fetches_count_a_flood_of_random_kids_once_per_interval(
    key: SigningKey,
) -> None:
    """A flood of unknown key ids costs one key-set fetch per refetch interval, and the metric
    shows exactly the fetches made (ok and failed)."""
    fail = [False]

    class Keys(StaticKeys):
        async def __call__(self) -> Any:
            if fail[0]:
                raise AuthUnavailable("API server down")
            return await super().__call__()

    now = [0.0]
    keys = KeyCache(Keys(key), issuer=DEFAULT_ISSUER, clock=lambda: now[0])
    metrics = DaemonMetrics("containerd")
    metrics.count_key_fetches(lambda: (keys.fetches, keys.failed_fetches))
    for i in range(500):
        with pytest.raises(TokenRefused, match="unknown key id"):
            await keys.key(f"random-{i}")
    now[0] = 10.0
    fail[0] = True
    for i in range(100):
        with pytest.raises((TokenRefused, AuthUnavailable)):
            await keys.key(f"again-{i}")
    assert (await keys.key(key.kid)).kid == key.kid  # the loaded keys still serve
    got = {
        (s.name, s.labels.get("result")): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    assert got[("freeze_daemon_jwks_fetches_total", "ok")] == 1  # the first load
    assert got[("freeze_daemon_jwks_fetches_total", "failed")] == 1  # one retry after 10 s


def test_backend_label_from_the_runtime_class() -> None:
    class ContainerdRuntime:
        pass

    assert backend_name(ContainerdRuntime()) == "containerd"
    assert backend_name(FakeRuntime()) == "fake"
