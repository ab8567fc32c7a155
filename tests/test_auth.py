"""daemon.auth: real keys, real PyJWT, real HTTP for key fetching; a fake only for TokenReview."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon.auth import (
    ApiServerJwks,
    AuthUnavailable,
    JwksFile,
    JwtVerifier,
    KeyCache,
    KeyDocument,
    KubernetesTokenReview,
    PodTokenAuthenticator,
    TokenReviewer,
    key_algorithms,
)
from daemon.claims import Identity, TokenRefused
from testbed.tokens import (
    DEFAULT_ISSUER,
    DROP,
    SigningKey,
    jwks,
    mint_token,
    new_ec_key,
    new_key,
    new_rsa_key,
    review_status,
    write_jwks,
)

UID = "6c0ffee0-1234-4abc-8def-0123456789ab"
OTHER_UID = "deadbeef-0000-4000-8000-000000000000"
POD: dict[str, Any] = {"pod_uid": UID, "pod_name": "cart-1", "namespace": "shop"}


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return new_ec_key()


@pytest.fixture(scope="module")
def stranger() -> SigningKey:
    """A key the cluster never published (an attacker's)."""
    return new_rsa_key()


class StaticKeys:
    """A KeyFetcher over an in-memory JWKS that a test can rotate; counts fetches."""

    def __init__(self, *keys: SigningKey, issuer: str | None = None) -> None:
        self.document = KeyDocument(jwks=jwks(*keys), issuer=issuer)
        self.calls = 0
        self.fail: Exception | None = None

    async def __call__(self) -> KeyDocument:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.document


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(*keys: SigningKey, issuer: str = DEFAULT_ISSUER) -> JwtVerifier:
    return JwtVerifier(KeyCache(StaticKeys(*keys), issuer=issuer))


async def refused(coro: Any) -> str:
    with pytest.raises(TokenRefused) as info:
        await coro
    return info.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)]
    )


def payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return result


# ------------------------------------------------------------------ local JWT check


@pytest.mark.parametrize("which", ["rsa_key", "ec_key"])
async def test_valid_token_verifies(which: str, request: pytest.FixtureRequest) -> None:
    key: SigningKey = request.getfixturevalue(which)
    claims = await verifier(key).verify(mint_token(key, **POD))
    assert claims["kubernetes.io"]["pod"]["uid"] == UID


async def test_wrong_audience(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, audience="https://kubernetes.default.svc")
    reason = await refused(verifier(rsa_key).verify(token))
    assert "wrong audience" in reason and "'freeze'" in reason


async def test_one_of_several_audiences_is_enough(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, audience=["vault", "freeze"])
    assert (await verifier(rsa_key).verify(token))["aud"] == ["vault", "freeze"]


async def test_expired(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, now=time.time() - 700, lifetime=600)
    assert "token expired" in await refused(verifier(rsa_key).verify(token))


async def test_expired_within_leeway_is_accepted(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, now=time.time() - 602, lifetime=600)
    assert await verifier(rsa_key).verify(token)


async def test_not_yet_valid(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, nbf=int(time.time()) + 300)
    assert "not valid yet" in await refused(verifier(rsa_key).verify(token))


async def test_issued_in_the_future(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, now=time.time() + 300)
    assert "not valid yet" in await refused(verifier(rsa_key).verify(token))


async def test_wrong_issuer(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, issuer="https://evil.example")
    reason = await refused(verifier(rsa_key).verify(token))
    assert "wrong issuer" in reason and DEFAULT_ISSUER in reason


async def test_unknown_kid(rsa_key: SigningKey, stranger: SigningKey) -> None:
    token = mint_token(stranger, **POD)
    assert "unknown key id" in await refused(verifier(rsa_key).verify(token))


async def test_strangers_key_under_our_kid(rsa_key: SigningKey, stranger: SigningKey) -> None:
    token = mint_token(stranger, **POD, headers={"kid": rsa_key.kid})
    assert "bad signature" in await refused(verifier(rsa_key).verify(token))


async def test_tampered_signature(rsa_key: SigningKey) -> None:
    head, body, sig = mint_token(rsa_key, **POD).split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert "bad signature" in await refused(verifier(rsa_key).verify(f"{head}.{body}.{flipped}"))


async def test_tampered_pod_uid(rsa_key: SigningKey) -> None:
    """Swapping the pod uid in the payload (to freeze someone else's pod) breaks the signature."""
    head, _, sig = mint_token(rsa_key, **POD).split(".")
    claims = payload(mint_token(rsa_key, **POD))
    claims["kubernetes.io"]["pod"]["uid"] = OTHER_UID
    body = b64(json.dumps(claims).encode())
    assert "bad signature" in await refused(verifier(rsa_key).verify(f"{head}.{body}.{sig}"))


KUBERNETES_ALGORITHMS = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip


@pytest.mark.parametrize("jwk_states_alg", [True, False], ids=["alg-in-jwk", "no-alg-in-jwk"])
@pytest.mark.parametrize("alg", [*KUBERNETES_ALGORITHMS, "EdDSA-Ed448"])
async def test_every_asymmetric_signing_algorithm_verifies(alg: str, jwk_states_alg: bool) -> None:
    """An API server (or external signer) signing with any asymmetric JWS algorithm works."""
    key = new_key(alg)
    fetch = StaticKeys(key)
    if not jwk_states_alg:
        for entry in fetch.document.jwks["keys"]:
            entry.pop("alg")
    claims = await JwtVerifier(KeyCache(fetch, issuer=DEFAULT_ISSUER)).verify(
        mint_token(key, **POD)
    )
    assert claims["kubernetes.io"]["pod"]["uid"] == UID


async def test_token_alg_must_match_the_alg_the_jwks_states() -> None:
    """A PS256 token under a kid the JWKS publishes as RS256 is refused (no alg switching)."""
    key = new_key("RS256")
    ps = SigningKey(kid=key.kid, algorithm="PS256", private_key=key.private_key)
    reason = await refused(verifier(key).verify(mint_token(ps, **POD)))
    assert "PS256" in reason and "RS256" in reason


async def test_curve_decides_the_ec_algorithm_when_the_jwks_states_none() -> None:
    key = new_key("ES384")
    fetch = StaticKeys(key)
    fetch.document.jwks["keys"][0].pop("alg")
    token = forge({"alg": "ES256", "kid": key.kid}, payload(mint_token(key, **POD)), b"x" * 64)
    reason = await refused(JwtVerifier(KeyCache(fetch, issuer=DEFAULT_ISSUER)).verify(token))
    assert "ES256" in reason and "P-384" in reason


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_symmetric_algorithms_are_refused_with_the_reason(
    rsa_key: SigningKey, alg: str
) -> None:
    claims = payload(mint_token(rsa_key, **POD))
    token = forge({"alg": alg, "kid": rsa_key.kid}, claims, b"x" * 32)
    reason = await refused(verifier(rsa_key).verify(token))
    assert "not allowed" in reason and "symmetric" in reason


async def test_unsigned_token_is_refused_with_the_reason(rsa_key: SigningKey) -> None:
    token = forge({"alg": "none", "kid": rsa_key.kid}, payload(mint_token(rsa_key, **POD)))
    reason = await refused(verifier(rsa_key).verify(token))
    assert "not allowed" in reason and "unsigned" in reason


async def test_keys_of_every_algorithm_load_from_one_jwks() -> None:
    keys = [new_key(alg) for alg in KUBERNETES_ALGORITHMS]
    v = verifier(*keys)
    for key in keys:
        assert await v.verify(mint_token(key, **POD)), key.algorithm


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none(rsa_key: SigningKey, alg: str) -> None:
    claims = payload(mint_token(rsa_key, **POD))
    token = forge({"alg": alg, "kid": rsa_key.kid}, claims)
    assert "not allowed" in await refused(verifier(rsa_key).verify(token))


async def test_hs256_with_the_public_key_as_secret(rsa_key: SigningKey) -> None:
    """The classic confusion: HMAC-sign with the (public) RSA key hoping it is used as a secret."""
    claims = payload(mint_token(rsa_key, **POD))
    header = {"alg": "HS256", "kid": rsa_key.kid}
    signing_input = (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    )
    for secret in (rsa_key.public_pem(), json.dumps(rsa_key.public_jwk()).encode()):
        sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
        token = signing_input.decode() + "." + b64(sig)
        assert "not allowed" in await refused(verifier(rsa_key).verify(token))


async def test_header_alg_must_match_the_key(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    """An ES256 header naming an RSA key's kid is refused, whatever the signature."""
    token = mint_token(ec_key, **POD, headers={"kid": rsa_key.kid})
    reason = await refused(verifier(rsa_key, ec_key).verify(token))
    assert "not allowed" in reason or "bad signature" in reason


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "iss", "aud", "sub"])
async def test_required_claims(rsa_key: SigningKey, claim: str) -> None:
    token = mint_token(rsa_key, **POD, **{claim: DROP})
    reason = await refused(verifier(rsa_key).verify(token))
    assert f"'{claim}'" in reason


@pytest.mark.parametrize(
    "token",
    ["x", "a.b", "a.b.c", "....", "e30.e30.", "eyJhbGciOiJSUzI1NiJ9.%%%.sig"],
)
async def test_malformed_tokens(rsa_key: SigningKey, token: str) -> None:
    reason = await refused(verifier(rsa_key).verify(token))
    assert "malformed" in reason or "not allowed" in reason or "invalid" in reason


async def test_kid_less_token_with_a_single_key(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, headers={"kid": DROP})
    assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert await verifier(rsa_key).verify(token)


async def test_kid_less_token_with_several_keys(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD, headers={"kid": DROP})
    assert "unknown key id" in await refused(verifier(rsa_key, ec_key).verify(token))


async def test_other_audience_configured(rsa_key: SigningKey) -> None:
    v = JwtVerifier(KeyCache(StaticKeys(rsa_key), issuer=DEFAULT_ISSUER), audience="concurrency")
    assert await v.verify(mint_token(rsa_key, **POD, audience="concurrency"))
    assert "wrong audience" in await refused(v.verify(mint_token(rsa_key, **POD)))


# ------------------------------------------------------------------ key sets


async def test_unknown_kid_refetches_once_then_rate_limits(
    rsa_key: SigningKey, stranger: SigningKey
) -> None:
    fetch, clock = StaticKeys(rsa_key), FakeClock()
    v = JwtVerifier(KeyCache(fetch, issuer=DEFAULT_ISSUER, refetch_interval=10, clock=clock))
    await v.verify(mint_token(rsa_key, **POD))
    assert fetch.calls == 1
    clock.now += 11
    for _ in range(5):
        await refused(v.verify(mint_token(stranger, **POD)))
    assert fetch.calls == 2  # one refetch for the unknown kid, then rate-limited
    clock.now += 11
    await refused(v.verify(mint_token(stranger, **POD)))
    assert fetch.calls == 3


async def test_key_rotation_in_the_file_is_picked_up(
    tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa_key)
    clock = FakeClock()
    v = JwtVerifier(KeyCache(JwksFile(path), issuer=DEFAULT_ISSUER, clock=clock))
    await v.verify(mint_token(rsa_key, **POD))
    write_jwks(path, rsa_key, ec_key)  # the API server got a second signing key
    clock.now += 11
    assert await v.verify(mint_token(ec_key, **POD))


async def test_missing_jwks_file(tmp_path: Path, rsa_key: SigningKey) -> None:
    v = JwtVerifier(KeyCache(JwksFile(tmp_path / "nope.json"), issuer=DEFAULT_ISSUER))
    with pytest.raises(AuthUnavailable, match="cannot read JWKS file"):
        await v.verify(mint_token(rsa_key, **POD))


async def test_jwks_without_usable_keys(tmp_path: Path, rsa_key: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": rsa_key.kid}]}))
    v = JwtVerifier(KeyCache(JwksFile(path), issuer=DEFAULT_ISSUER))
    with pytest.raises(AuthUnavailable, match="no usable"):
        await v.verify(mint_token(rsa_key, **POD))


async def test_symmetric_key_in_jwks_is_ignored(rsa_key: SigningKey) -> None:
    fetch = StaticKeys(rsa_key)
    secret = {"kty": "oct", "k": b64(b"secret"), "kid": "hmac"}
    fetch.document = KeyDocument(jwks={"keys": [*jwks(rsa_key)["keys"], secret]})
    v = JwtVerifier(KeyCache(fetch, issuer=DEFAULT_ISSUER))
    claims = payload(mint_token(rsa_key, **POD))
    header = {"alg": "HS256", "kid": "hmac"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(b"secret", signing_input.encode(), hashlib.sha256).digest()
    assert "not allowed" in await refused(v.verify(signing_input + "." + b64(sig)))


async def test_fetch_failure_is_unavailable_not_refused(rsa_key: SigningKey) -> None:
    fetch = StaticKeys(rsa_key)
    fetch.fail = AuthUnavailable("GET /openid/v1/jwks failed")
    v = JwtVerifier(KeyCache(fetch, issuer=DEFAULT_ISSUER, refetch_interval=0))
    with pytest.raises(AuthUnavailable):
        await v.verify(mint_token(rsa_key, **POD))
    fetch.fail = None
    assert await v.verify(mint_token(rsa_key, **POD))


async def test_issuer_is_discovered_with_the_keys(rsa_key: SigningKey) -> None:
    v = JwtVerifier(KeyCache(StaticKeys(rsa_key, issuer="https://issuer.test")))
    assert await v.verify(mint_token(rsa_key, **POD, issuer="https://issuer.test"))
    assert "wrong issuer" in await refused(v.verify(mint_token(rsa_key, **POD)))


async def test_configured_issuer_wins_over_discovery(rsa_key: SigningKey) -> None:
    keys = KeyCache(StaticKeys(rsa_key, issuer="https://discovered.test"), issuer=DEFAULT_ISSUER)
    assert await keys.issuer() == DEFAULT_ISSUER


class FakeApiServer:
    """/.well-known/openid-configuration and /openid/v1/jwks over real HTTP."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.seen_auth: list[str | None] = []
        self.status = 200
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        self.server = TestServer(app)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.seen_auth.append(request.headers.get("Authorization"))
        return web.json_response(
            {
                "issuer": "https://issuer.test",
                "jwks_uri": "https://evil.example/keys",  # must not be followed
                "id_token_signing_alg_values_supported": ["RS256"],
            },
            status=self.status,
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.seen_auth.append(request.headers.get("Authorization"))
        return web.json_response(jwks(*self.keys), status=self.status)


async def test_keys_fetched_from_the_api_server(rsa_key: SigningKey) -> None:
    import aiohttp

    api = FakeApiServer(rsa_key)
    await api.server.start_server()
    try:

        async def headers() -> Mapping[str, str]:
            return {"Authorization": "Bearer daemon-sa-token"}

        async with aiohttp.ClientSession() as session:
            fetch = ApiServerJwks(session, str(api.server.make_url("/")), headers)
            v = JwtVerifier(KeyCache(fetch))
            token = mint_token(rsa_key, **POD, issuer="https://issuer.test")
            assert await v.verify(token)
            assert api.seen_auth == ["Bearer daemon-sa-token"] * 2
            api.status = 500
            with pytest.raises(AuthUnavailable, match="answered 500"):
                await fetch()
    finally:
        await api.server.close()


async def test_api_server_unreachable(rsa_key: SigningKey) -> None:
    import aiohttp

    async def headers() -> Mapping[str, str]:
        return {}

    async with aiohttp.ClientSession() as session:
        fetch = ApiServerJwks(session, "http://127.0.0.1:9", headers, timeout=2)
        with pytest.raises(AuthUnavailable, match="failed"):
            await fetch()


# ------------------------------------------------------------------ TokenReview cache


class FakeReview:
    """Stands in for the API server's TokenReview (the only fake in this file)."""

    def __init__(self, status: Mapping[str, Any] | None = None) -> None:
        self.status: Mapping[str, Any] = status or review_status(**POD)
        self.calls: list[tuple[str, list[str]]] = []
        self.fail: Exception | None = None
        self.delay = 0.0

    async def __call__(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        self.calls.append((token, list(audiences)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.status


async def test_review_is_cached_for_ttl() -> None:
    fake, clock = FakeReview(), FakeClock()
    reviewer = TokenReviewer(fake, ttl=30, clock=clock)
    ident = await reviewer.review("tok", expires_at=clock.now + 600)
    assert ident == Identity(
        pod_uid=UID, pod_name="cart-1", namespace="shop", service_account="default"
    )
    assert fake.calls == [("tok", ["freeze"])]
    clock.now += 29
    assert await reviewer.review("tok", expires_at=clock.now + 600) == ident
    assert len(fake.calls) == 1
    clock.now += 2
    await reviewer.review("tok", expires_at=clock.now + 600)
    assert len(fake.calls) == 2


async def test_cache_never_outlives_the_token() -> None:
    fake, clock = FakeReview(), FakeClock()
    reviewer = TokenReviewer(fake, ttl=30, clock=clock)
    await reviewer.review("tok", expires_at=clock.now + 5)
    clock.now += 4
    await reviewer.review("tok", expires_at=clock.now + 1)
    assert len(fake.calls) == 1
    clock.now += 2  # past exp, well within ttl
    await reviewer.review("tok", expires_at=clock.now - 1)
    assert len(fake.calls) == 2


async def test_cache_is_per_token() -> None:
    fake = FakeReview()
    reviewer = TokenReviewer(fake)
    await reviewer.review("a")
    await reviewer.review("b")
    await reviewer.review("a")
    assert [t for t, _ in fake.calls] == ["a", "b"]


async def test_denial_is_cached_and_explained() -> None:
    fake = FakeReview({"authenticated": False, "error": "token has been invalidated"})
    reviewer = TokenReviewer(fake)
    for _ in range(3):
        assert "invalidated" in await refused(reviewer.review("tok"))
    assert len(fake.calls) == 1


async def test_api_failure_is_not_cached() -> None:
    fake = FakeReview()
    fake.fail = ConnectionError("connection refused")
    reviewer = TokenReviewer(fake)
    with pytest.raises(AuthUnavailable, match="TokenReview failed: connection refused"):
        await reviewer.review("tok")
    fake.fail = None
    assert (await reviewer.review("tok")).pod_uid == UID
    assert len(fake.calls) == 2


async def test_concurrent_reviews_of_one_token_share_one_call() -> None:
    fake = FakeReview()
    fake.delay = 0.05
    reviewer = TokenReviewer(fake)
    results = await asyncio.gather(*(reviewer.review("tok") for _ in range(20)))
    assert {r.pod_uid for r in results} == {UID}
    assert len(fake.calls) == 1


async def test_cancelled_caller_does_not_cancel_the_shared_review() -> None:
    fake = FakeReview()
    fake.delay = 0.05
    reviewer = TokenReviewer(fake)
    first = asyncio.create_task(reviewer.review("tok"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(reviewer.review("tok"))
    first.cancel()
    assert (await second).pod_uid == UID
    assert len(fake.calls) == 1


async def test_cache_is_bounded() -> None:
    fake, clock = FakeReview(), FakeClock()
    reviewer = TokenReviewer(fake, max_entries=3, clock=clock)
    for i in range(10):
        await reviewer.review(f"tok{i}")
    assert len(reviewer) == 3


async def test_cache_key_is_a_hash_not_the_token() -> None:
    reviewer = TokenReviewer(FakeReview())
    await reviewer.review("secret-token")
    assert all(isinstance(k, bytes) and len(k) == 32 for k in reviewer._cache)
    assert b"secret-token" not in b"".join(reviewer._cache)


# ------------------------------------------------------------------ composed


def authenticator(
    key: SigningKey, review: FakeReview | None, clock: FakeClock | None = None
) -> PodTokenAuthenticator:
    reviewer = None
    if review is not None:
        reviewer = TokenReviewer(review, clock=clock or time.time)
    return PodTokenAuthenticator(verifier(key), reviewer)


async def test_local_check_then_review(rsa_key: SigningKey) -> None:
    fake = FakeReview()
    auth = authenticator(rsa_key, fake)
    token = mint_token(rsa_key, **POD)
    assert (await auth.authenticate(token)).pod_uid == UID
    assert (await auth.authenticate(token)).pod_uid == UID
    assert len(fake.calls) == 1  # the hot path made no second API call


async def test_junk_is_dropped_before_any_review(rsa_key: SigningKey, stranger: SigningKey) -> None:
    fake = FakeReview()
    auth = authenticator(rsa_key, fake)
    for token in ["junk", mint_token(stranger, **POD), mint_token(rsa_key, **POD, audience="x")]:
        await refused(auth.authenticate(token))
    assert fake.calls == []


async def test_review_naming_another_pod_is_refused(rsa_key: SigningKey) -> None:
    fake = FakeReview(review_status(pod_uid=OTHER_UID, pod_name="cart-1", namespace="shop"))
    reason = await refused(authenticator(rsa_key, fake).authenticate(mint_token(rsa_key, **POD)))
    assert "pod uid mismatch" in reason


async def test_review_denial_of_a_deleted_pods_token(rsa_key: SigningKey) -> None:
    """A signature check alone still accepts a deleted pod's token; the review does not."""
    fake = FakeReview({"authenticated": False, "error": "service account token is invalid"})
    reason = await refused(authenticator(rsa_key, fake).authenticate(mint_token(rsa_key, **POD)))
    assert "TokenReview denied" in reason


async def test_review_cache_bound_by_token_exp(rsa_key: SigningKey) -> None:
    fake = FakeReview()
    auth = authenticator(rsa_key, fake)
    token = mint_token(rsa_key, **POD, now=time.time() - 599, lifetime=600)  # 1 s left
    await auth.authenticate(token)
    entry = next(iter(auth._reviewer._cache.values()))  # type: ignore[union-attr]
    assert entry[0] <= payload(token)["exp"]


async def test_without_review_the_local_identity_is_used(rsa_key: SigningKey) -> None:
    ident = await authenticator(rsa_key, None).authenticate(mint_token(rsa_key, **POD))
    assert ident == Identity(UID, "cart-1", "shop", "default")


async def test_bearer_prefix_and_whitespace(rsa_key: SigningKey) -> None:
    auth = authenticator(rsa_key, None)
    token = mint_token(rsa_key, **POD)
    assert (await auth.authenticate(f"  Bearer {token} ")).pod_uid == UID


@pytest.mark.parametrize("token", ["", "   ", "Bearer ", "x" * 20_000, "tök.en.x"])
async def test_junk_header_values(rsa_key: SigningKey, token: str) -> None:
    await refused(authenticator(rsa_key, None).authenticate(token))


async def test_unbound_token_is_refused(rsa_key: SigningKey) -> None:
    token = mint_token(rsa_key, **POD)
    claims = payload(token)
    del claims["kubernetes.io"]["pod"]
    import jwt

    unbound = jwt.encode(
        claims, rsa_key.private_key, algorithm="RS256", headers={"kid": rsa_key.kid}
    )
    assert "not bound to a pod" in await refused(authenticator(rsa_key, None).authenticate(unbound))


# ------------------------------------------------------------------ the real TokenReview call


class FakeTokenReviewApi:
    """The TokenReview endpoint over real HTTP, to check kubernetes.aio's request and parsing."""

    def __init__(self, status: int = 201) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = status
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._review)
        self.server = TestServer(app)

    async def _review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.status >= 400:
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Forbidden",
                    "message": "tokenreviews.authentication.k8s.io is forbidden",
                    "code": self.status,
                },
                status=self.status,
            )
        return web.json_response({**body, "status": review_status(**POD)}, status=self.status)


async def test_kubernetes_token_review_over_http() -> None:
    from kubernetes.aio import client

    fake = FakeTokenReviewApi()
    await fake.server.start_server()
    configuration = client.Configuration(host=str(fake.server.make_url("")).rstrip("/"))
    api_client = client.ApiClient(configuration)
    try:
        call = KubernetesTokenReview(api_client)
        status = await call("the-token", ["freeze"])
        assert fake.bodies[0]["spec"] == {"token": "the-token", "audiences": ["freeze"]}
        assert fake.bodies[0]["kind"] == "TokenReview"
        reviewer = TokenReviewer(call)
        assert (await reviewer.review("the-token")).pod_uid == UID
        assert status["user"]["extra"]["authentication.kubernetes.io/pod-uid"] == [UID]
        fake.status = 403
        with pytest.raises(AuthUnavailable, match="create tokenreviews"):
            await call("other-token", ["freeze"])
    finally:
        await api_client.close()  # type: ignore[no-untyped-call]
        await fake.server.close()


async def test_kubeconfig_wiring_reaches_one_api_server(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    """connect_kubernetes: the same server, token and TLS settings for JWKS and TokenReview."""
    import aiohttp

    from daemon.auth import connect_kubernetes

    keys_api, review_api = FakeApiServer(rsa_key), FakeTokenReviewApi()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", keys_api._discovery)
    app.router.add_get("/openid/v1/jwks", keys_api._jwks)
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", review_api._review)
    server = TestServer(app)
    await server.start_server()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": str(server.make_url("/"))}}],
                "users": [{"name": "u", "user": {"token": "daemon-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    kube = await connect_kubernetes(str(kubeconfig))
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=kube.ssl_context)
        ) as session:
            auth = PodTokenAuthenticator(
                JwtVerifier(KeyCache(ApiServerJwks(session, kube.server, kube.headers))),
                TokenReviewer(KubernetesTokenReview(kube.api_client)),
            )
            token = mint_token(rsa_key, **POD, issuer="https://issuer.test")
            assert (await auth.authenticate(token)).pod_uid == UID
            assert keys_api.seen_auth == ["Bearer daemon-token"] * 2
            assert review_api.bodies[0]["spec"]["token"] == token
    finally:
        await kube.close()
        await server.close()


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    return calls


async def test_a_verified_token_is_not_rechecked_until_its_cache_entry_ends(
    rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(now=time.time())
    v = JwtVerifier(KeyCache(StaticKeys(rsa_key), issuer=DEFAULT_ISSUER), clock=clock)
    token = mint_token(rsa_key, **POD, now=clock.now)
    decodes = count_decodes(monkeypatch)
    first = await v.verify(token)
    assert await v.verify(token) == first
    assert decodes == [1], "the hot path re-checked a signature it had already checked"
    clock.now += 31  # past the 30 s bound: checked again
    await v.verify(token)
    assert decodes == [2]


async def test_a_cache_entry_never_outlives_the_token(
    rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(now=time.time())
    v = JwtVerifier(KeyCache(StaticKeys(rsa_key), issuer=DEFAULT_ISSUER), clock=clock)
    token = mint_token(rsa_key, **POD, now=clock.now, lifetime=10)
    decodes = count_decodes(monkeypatch)
    await v.verify(token)
    clock.now += 11  # the token's exp has passed (by our clock): no cached answer
    await v.verify(token)
    assert decodes == [2]


async def test_refused_tokens_are_not_cached_as_good(rsa_key: SigningKey) -> None:
    v = verifier(rsa_key)
    bad = mint_token(rsa_key, **POD, audience="other")
    for _ in range(2):
        assert "wrong audience" in await refused(v.verify(bad))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"kty": "RSA"}, {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
        ({"kty": "RSA", "alg": "PS384"}, {"PS384"}),
        ({"kty": "RSA", "alg": "ES256"}, set()),
        ({"kty": "RSA", "alg": "HS256"}, set()),
        ({"kty": "EC", "crv": "P-256"}, {"ES256"}),
        ({"kty": "EC", "crv": "P-384"}, {"ES384"}),
        ({"kty": "EC", "crv": "P-521"}, {"ES512"}),
        ({"kty": "EC", "crv": "P-521", "alg": "ES256"}, set()),
        ({"kty": "EC", "crv": "secp256k1"}, set()),
        ({"kty": "EC"}, set()),
        ({"kty": "OKP", "crv": "Ed25519"}, {"EdDSA"}),
        ({"kty": "OKP", "crv": "Ed448", "alg": "EdDSA"}, {"EdDSA"}),
        ({"kty": "OKP", "crv": "X25519"}, set()),
        ({"kty": "oct", "k": "c2VjcmV0"}, set()),
        ({"kty": "oct", "alg": "HS256"}, set()),
        ({}, set()),
        ({"kty": "RSA", "alg": 5}, set()),
    ],
)
def test_key_algorithms(entry: dict[str, Any], expected: set[str]) -> None:
    assert key_algorithms(entry) == expected


# ------------------------------------------------------------------ API server outages


async def test_denial_is_cached_only_briefly() -> None:
    """A transient ``authenticated: false`` must not lock a pod out for the whole review TTL."""
    fake, clock = FakeReview({"authenticated": False, "error": "etcd timed out"}), FakeClock()
    reviewer = TokenReviewer(fake, ttl=30, refusal_ttl=2, clock=clock)
    await refused(reviewer.review("tok", expires_at=clock.now + 600))
    clock.now += 1.5
    await refused(reviewer.review("tok", expires_at=clock.now + 600))
    assert len(fake.calls) == 1
    fake.status = review_status(**POD)  # the API server recovered
    clock.now += 1
    assert (await reviewer.review("tok", expires_at=clock.now + 600)).pod_uid == UID
    assert len(fake.calls) == 2


def outage_authenticator(
    key: SigningKey, fake: FakeReview, clock: FakeClock, grace: float = 300
) -> PodTokenAuthenticator:
    reviewer = TokenReviewer(fake, ttl=30, clock=clock)
    return PodTokenAuthenticator(verifier(key), reviewer, outage_thaw_grace=grace, clock=clock)


async def test_thaw_proceeds_on_a_verified_token_while_reviews_fail(rsa_key: SigningKey) -> None:
    fake, clock = FakeReview(), FakeClock(time.time())
    auth = outage_authenticator(rsa_key, fake, clock)
    token = mint_token(rsa_key, **POD)
    fake.fail = ConnectionRefusedError("connection refused")
    ident = await auth.authenticate(token, thaw=True)
    assert ident == Identity(UID, "cart-1", "shop", "default")
    with pytest.raises(AuthUnavailable):  # freezing still needs a review
        await auth.authenticate(token)
    # Junk is still refused during the outage: only the review is skipped, never the signature.
    await refused(auth.authenticate(mint_token(new_rsa_key(), **POD), thaw=True))
    await refused(auth.authenticate(mint_token(rsa_key, **POD, audience="x"), thaw=True))


async def test_outage_thaws_are_bounded_by_the_grace(rsa_key: SigningKey) -> None:
    fake, clock = FakeReview(), FakeClock(time.time())
    auth = outage_authenticator(rsa_key, fake, clock, grace=300)
    token = mint_token(rsa_key, **POD, lifetime=3600)
    fake.fail = ConnectionRefusedError("connection refused")
    clock.now += 10
    assert await auth.authenticate(token, thaw=True)  # the outage starts here
    clock.now += 299
    assert await auth.authenticate(token, thaw=True)
    clock.now += 2
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(token, thaw=True)
    fake.fail = None  # a successful review ends the outage; a later one gets a fresh grace
    assert await auth.authenticate(token, thaw=True)
    clock.now += 31
    fake.fail = ConnectionRefusedError("connection refused")
    assert await auth.authenticate(token, thaw=True)


async def test_outage_grace_zero_never_thaws_unreviewed(rsa_key: SigningKey) -> None:
    fake, clock = FakeReview(), FakeClock(time.time())
    auth = outage_authenticator(rsa_key, fake, clock, grace=0)
    fake.fail = ConnectionRefusedError("connection refused")
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(mint_token(rsa_key, **POD), thaw=True)


async def test_a_review_denial_is_no_outage(rsa_key: SigningKey) -> None:
    fake = FakeReview({"authenticated": False, "error": "token has been invalidated"})
    auth = outage_authenticator(rsa_key, fake, FakeClock(time.time()))
    assert "invalidated" in await refused(auth.authenticate(mint_token(rsa_key, **POD), thaw=True))


async def test_unavailable_says_a_generic_cause_and_keeps_the_detail() -> None:
    fake = FakeReview()
    fake.fail = AuthUnavailable("TokenReview answered 500 Internal Server Error: etcd at 10.0.0.3")
    with pytest.raises(AuthUnavailable) as info:
        await TokenReviewer(fake).review("tok")
    assert "10.0.0.3" in str(info.value) and "10.0.0.3" not in info.value.cause
    assert "TokenReview" in info.value.cause
