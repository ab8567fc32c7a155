"""Turn a ``Token`` header into the pod it proves, or refuse it.

Two checks, cheapest first: the token's signature and claims are verified locally against the
cluster's service-account public keys (drops junk without any API call), then a TokenReview
confirms the token is still valid (its pod may be gone) and names the same pod. Reviews are
cached by sha256(token) until min(token exp, now + 30 s), so the hot path makes no API call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt

from daemon.claims import (
    Identity,
    TokenRefused,
    identity_from_claims,
    identity_from_review,
    same_pod,
)
from freeze_proxy.durations import format_duration

log = logging.getLogger("daemon.auth")

# What the API server (or an external signer, KEP-740) can sign service-account tokens with.
ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
_RSA_ALGORITHMS = frozenset(a for a in ALGORITHMS if a[:2] in ("RS", "PS"))
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "aud", "sub"]
MAX_TOKEN_BYTES = 16 * 1024  # real tokens are ~1 KiB; anything huge is junk


class AuthUnavailable(Exception):
    """The token could not be checked right now (key fetch or TokenReview failed): answered 503.

    ``str(e)`` is the detail for the daemon's log (it may quote the API server); ``cause`` is
    what an unauthenticated caller is told.
    """

    def __init__(
        self, detail: str, *, cause: str = "the token cannot be checked right now"
    ) -> None:
        super().__init__(detail)
        self.cause = cause or _DEFAULT_CAUSE


_DEFAULT_CAUSE = "the token cannot be checked right now"
_KEYS_CAUSE = "the cluster's service-account keys cannot be loaded right now"
_REVIEW_CAUSE = "the API server's TokenReview is unavailable"


class Authenticator(Protocol):
    """What the HTTP layer needs: a token in, the verified pod out (or TokenRefused).

    ``thaw`` says the caller wants to thaw: that (safe) direction may proceed on a locally
    verified token while TokenReview is unavailable (see PodTokenAuthenticator).
    """

    async def authenticate(self, token: str, *, thaw: bool = False) -> Identity: ...


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyDocument:
    """A JWKS document and, when discovered, the issuer that signs with it."""

    jwks: Mapping[str, Any]
    issuer: str | None = None


class KeyFetcher(Protocol):
    """Where the public keys come from (a file, the API server)."""

    async def __call__(self) -> KeyDocument: ...


class JwksFile:
    """Keys from a JWKS file (e.g. a mounted ConfigMap); re-read when an unknown kid shows up."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> KeyDocument:
        return KeyDocument(jwks=json.loads(self.path.read_text()))

    async def __call__(self) -> KeyDocument:
        try:
            return await asyncio.to_thread(self._read)
        except (OSError, ValueError) as e:
            raise AuthUnavailable(
                f"cannot read JWKS file {self.path}: {e}", cause=_KEYS_CAUSE
            ) from e


HeaderSource = Callable[[], Awaitable[Mapping[str, str]]]


class ApiServerJwks:
    """Keys from the API server's ``/openid/v1/jwks``, issuer from its OIDC discovery document.

    The discovery document's ``jwks_uri`` is ignored on purpose: it may point outside the cluster.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        headers: HeaderSource,
        *,
        discover_issuer: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self._session = session
        self._server = server.rstrip("/")
        self._headers = headers
        self._discover_issuer = discover_issuer
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get_json(self, path: str) -> Any:
        url = self._server + path
        try:
            async with self._session.get(
                url, headers=dict(await self._headers()), timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:200]
                    raise AuthUnavailable(
                        f"GET {url} answered {resp.status}: {body}", cause=_KEYS_CAUSE
                    )
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise AuthUnavailable(
                f"GET {url} failed: {e or type(e).__name__}", cause=_KEYS_CAUSE
            ) from e

    async def __call__(self) -> KeyDocument:
        issuer: str | None = None
        if self._discover_issuer:
            discovery = await self._get_json("/.well-known/openid-configuration")
            issuer = discovery.get("issuer") if isinstance(discovery, dict) else None
            if not isinstance(issuer, str) or not issuer:
                raise AuthUnavailable(
                    "the API server's OIDC discovery document has no issuer", cause=_KEYS_CAUSE
                )
        document = await self._get_json("/openid/v1/jwks")
        if not isinstance(document, dict):
            raise AuthUnavailable("the API server's JWKS is not a JSON object", cause=_KEYS_CAUSE)
        return KeyDocument(jwks=document, issuer=issuer)


def key_algorithms(entry: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms one JWKS entry may verify: those its key type allows (RSA: RS*/PS*, EC: the
    one of its curve, OKP: EdDSA), narrowed to its ``alg`` when it states one. Empty for
    symmetric (``oct``) and unknown keys: they are never used."""
    kty, crv = entry.get("kty"), entry.get("crv")
    allowed: frozenset[str] = frozenset()
    if kty == "RSA":
        allowed = _RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in _EC_CURVES:
        allowed = frozenset({_EC_CURVES[crv]})
    elif kty == "OKP" and crv in _OKP_CURVES:
        allowed = frozenset({"EdDSA"})
    stated = entry.get("alg")
    if stated is None:
        return allowed
    return allowed & {stated} if isinstance(stated, str) else frozenset()


def refuse_algorithm(alg: object) -> str | None:
    """Why a token header's ``alg`` is refused before any key is looked at; None if allowed."""
    if alg in ALGORITHMS:
        return None
    if not alg or (isinstance(alg, str) and alg.lower() == "none"):
        return f"algorithm {alg!r} not allowed: the token is unsigned"
    if isinstance(alg, str) and alg.upper().startswith("HS"):
        return (
            f"algorithm {alg!r} not allowed: symmetric (HMAC) signatures are never accepted; "
            "service-account tokens are signed with the API server's private key"
        )
    return f"algorithm {alg!r} not allowed: only {', '.join(ALGORITHMS)}"


class PublicKey:
    """One usable JWKS entry: its key id, the algorithms it may verify, a PyJWK per algorithm."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.kid: str | None = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        self.algorithms = key_algorithms(entry)
        if not self.algorithms:
            raise ValueError(
                f"no asymmetric algorithm of {', '.join(ALGORITHMS)} fits this key "
                f"(kty {entry.get('kty')!r}, crv {entry.get('crv')!r}, alg {entry.get('alg')!r})"
            )
        self._entry = dict(entry)
        self._built: dict[str, jwt.PyJWK] = {}
        self.for_algorithm(min(self.algorithms))  # a malformed key fails here, at load time

    def describe(self) -> str:
        kind = self._entry.get("crv") or self._entry.get("kty")
        return f"{kind}: {', '.join(sorted(self.algorithms))}"

    def for_algorithm(self, alg: str) -> jwt.PyJWK:
        """The key bound to ``alg``; TokenRefused when this key may not verify ``alg``."""
        if alg not in self.algorithms:
            raise TokenRefused(
                f"algorithm {alg!r} not allowed for key {self.kid!r} ({self.describe()}): "
                "the token was not signed by this cluster's service-account key"
            )
        key = self._built.get(alg)
        if key is None:
            entry = {k: v for k, v in self._entry.items() if k != "alg"}
            try:
                key = jwt.PyJWK(entry, algorithm=alg)
            except (jwt.PyJWTError, TypeError, ValueError) as e:
                raise ValueError(f"unusable key: {e}") from e
            self._built[alg] = key
        return key


class KeyCache:
    """The current key set, refetched on an unknown kid at most once per ``refetch_interval``."""

    def __init__(
        self,
        fetch: KeyFetcher,
        *,
        issuer: str | None = None,
        refetch_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._issuer = issuer
        self._interval = refetch_interval
        self._clock = clock
        self._keys: dict[str | None, PublicKey] | None = None
        self._last_fetch: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # key-set fetches started (API server: discovery + JWKS GETs each)
        self.failed_fetches = 0  # of ``fetches``: no usable answer

    async def _refresh(self) -> None:
        self._last_fetch = self._clock()
        self.fetches += 1
        try:
            await self._load()
        except BaseException:
            self.failed_fetches += 1
            raise

    async def _load(self) -> None:
        document = await self._fetch()
        keys: dict[str | None, PublicKey] = {}
        for entry in document.jwks.get("keys", []) if isinstance(document.jwks, Mapping) else []:
            try:
                if not isinstance(entry, Mapping):
                    raise ValueError("not a JSON object")
                key = PublicKey(entry)
            except ValueError as e:
                log.warning(
                    "skipping unusable key in JWKS", extra={"kid": _kid_of(entry), "error": str(e)}
                )
                continue
            keys[key.kid] = key
        if not keys:
            raise AuthUnavailable(
                f"the JWKS holds no usable key (accepted: {', '.join(ALGORITHMS)}; "
                "symmetric keys are never used)",
                cause=_KEYS_CAUSE,
            )
        if self._issuer is None:
            self._issuer = document.issuer
        self._keys = keys
        log.info(
            "loaded service-account keys",
            extra={
                "kids": sorted(str(k) for k in keys),
                "algorithms": {str(kid): key.describe() for kid, key in keys.items()},
            },
        )

    def _may_refetch(self) -> bool:
        return self._last_fetch is None or self._clock() - self._last_fetch >= self._interval

    async def _ensure_loaded(self) -> dict[str | None, PublicKey]:
        if self._keys is None:
            async with self._lock:
                if self._keys is None:
                    if not self._may_refetch():
                        raise AuthUnavailable(
                            "service-account keys unavailable; retrying soon", cause=_KEYS_CAUSE
                        )
                    await self._refresh()
        assert self._keys is not None
        return self._keys

    async def issuer(self) -> str:
        """The expected ``iss``: as configured, else as discovered with the keys."""
        await self._ensure_loaded()
        if self._issuer is None:
            raise AuthUnavailable("no issuer configured or discovered", cause=_KEYS_CAUSE)
        return self._issuer

    async def key(self, kid: str | None) -> PublicKey:
        """The public key for ``kid`` (a kid-less token only when the set has exactly one key)."""
        keys = await self._ensure_loaded()
        found = _pick(keys, kid)
        if found is None and self._may_refetch():
            async with self._lock:
                found = _pick(self._keys or {}, kid)
                if found is None and self._may_refetch():
                    await self._refresh()
                    found = _pick(self._keys or {}, kid)
        if found is None:
            raise TokenRefused(
                f"unknown key id {kid!r}: the token was not signed by this cluster's "
                "service-account keys"
            )
        return found


def _kid_of(entry: object) -> object:
    return entry.get("kid") if isinstance(entry, dict) else None


def _pick(keys: Mapping[str | None, PublicKey], kid: str | None) -> PublicKey | None:
    if kid is None:
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


# --------------------------------------------------------------------------- local check


class JwtVerifier:
    """Local check of a projected token: signature, alg, aud, iss, exp, nbf (small leeway).

    A token that passed is remembered (by its SHA-256) until it expires or ``cache_ttl`` passes,
    whichever is sooner: the proxy sends the same token on every call, and re-checking an RSA
    signature each time would put ~0.3 ms on every wake.
    """

    def __init__(
        self,
        keys: KeyCache,
        *,
        audience: str = "freeze",
        leeway: float = 5.0,
        cache_ttl: float = 30.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self.audience = audience
        self._leeway = leeway
        self._ttl = cache_ttl
        self._max = max_entries
        self._clock = clock
        self._verified: dict[bytes, tuple[float, dict[str, Any]]] = {}

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims; TokenRefused saying what is wrong otherwise."""
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._verified.get(digest)
        if hit is not None:
            if now < hit[0]:
                return hit[1]
            del self._verified[digest]
        claims = await self._verify_signed(token)
        until = min(float(claims["exp"]), now + self._ttl)
        if len(self._verified) >= self._max:
            self._verified.clear()  # rare (10k distinct live tokens on one node): start over
        self._verified[digest] = (until, claims)
        return claims

    async def _verify_signed(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise TokenRefused(f"malformed token: {e}") from e
        alg = header.get("alg")
        why = refuse_algorithm(alg)
        if why is not None:
            raise TokenRefused(why)
        assert isinstance(alg, str)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("malformed token: kid is not a string")
        key = (await self._keys.key(kid)).for_algorithm(alg)
        issuer = await self._keys.issuer()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as e:
            raise TokenRefused(
                "token expired: the proxy must re-read its projected token (kubelet rotates it)"
            ) from e
        except jwt.ImmatureSignatureError as e:
            raise TokenRefused(f"token not valid yet ({e}): check the node clocks") from e
        except jwt.InvalidAudienceError as e:
            raise TokenRefused(
                f"wrong audience ({e}): this daemon accepts '{self.audience}'; set it as the "
                "projected serviceAccountToken's audience"
            ) from e
        except jwt.InvalidIssuerError as e:
            raise TokenRefused(f"wrong issuer: expected {issuer!r}") from e
        except jwt.InvalidSignatureError as e:
            raise TokenRefused("bad signature: not signed by this cluster's key") from e
        except jwt.MissingRequiredClaimError as e:
            raise TokenRefused(f"token lacks the '{e.claim}' claim") from e
        except jwt.InvalidAlgorithmError as e:
            raise TokenRefused(f"algorithm not allowed: {e}") from e
        except jwt.PyJWTError as e:
            raise TokenRefused(f"invalid token: {e}") from e
        return claims


# --------------------------------------------------------------------------- TokenReview


class ReviewCall(Protocol):
    """One TokenReview: the token and audiences in, the review's ``status`` (JSON shape) out."""

    async def __call__(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]: ...


_Outcome = Identity | TokenRefused


class TokenReviewer:
    """TokenReview with a cache keyed by sha256(token), so repeat callers make no API call.

    A confirmation lives until min(token exp, now + ttl); a refusal only ``refusal_ttl`` (the
    API server answers ``authenticated: false`` for transient failures too, and a refusal
    cached for the whole TTL would lock a pod out that long). A failed call is not cached, but
    remembered as an outage (``outage``) until a call succeeds. Concurrent reviews of one token
    share one call.
    """

    def __init__(
        self,
        call: ReviewCall,
        *,
        audience: str = "freeze",
        ttl: float = 30.0,
        refusal_ttl: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._call = call
        self.audience = audience
        self._ttl = ttl
        self._refusal_ttl = refusal_ttl
        self._failing_since: float | None = None
        self._max = max_entries
        self._clock = clock
        self._cache: dict[bytes, tuple[float, _Outcome]] = {}
        self._inflight: dict[bytes, asyncio.Task[_Outcome]] = {}
        self.calls = 0
        self.answered_calls = 0  # of ``calls``: the API server said yes or no
        self.failed_calls = 0  # of ``calls``: no answer (an outage)

    def __len__(self) -> int:
        return len(self._cache)

    def outage(self) -> float | None:
        """Seconds since TokenReview calls began failing (None: the last call got an answer)."""
        if self._failing_since is None:
            return None
        return max(0.0, self._clock() - self._failing_since)

    async def review(self, token: str, *, expires_at: float | None = None) -> Identity:
        """The pod the API server says ``token`` belongs to; TokenRefused if it does not."""
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            deadline, outcome = hit
            if self._clock() < deadline:
                return _unwrap(outcome)
            del self._cache[digest]
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._review(digest, token, expires_at))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._done(digest, t))
        # A caller that disconnects must not cancel the review others wait for.
        return _unwrap(await asyncio.shield(task))

    def _done(self, digest: bytes, task: asyncio.Task[_Outcome]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here so an abandoned failure is not reported as lost

    async def _review(self, digest: bytes, token: str, expires_at: float | None) -> _Outcome:
        self.calls += 1
        try:
            status = await self._call(token, [self.audience])
        except Exception as e:
            self.failed_calls += 1
            if self._failing_since is None:
                self._failing_since = self._clock()
            if isinstance(e, AuthUnavailable):
                if e.cause == _DEFAULT_CAUSE:
                    e.cause = _REVIEW_CAUSE
                raise
            raise AuthUnavailable(
                f"TokenReview failed: {e or type(e).__name__}", cause=_REVIEW_CAUSE
            ) from e
        self._failing_since = None
        self.answered_calls += 1
        outcome: _Outcome
        try:
            outcome = identity_from_review(status, audience=self.audience)
        except TokenRefused as refused:
            outcome = refused
        ttl = self._refusal_ttl if isinstance(outcome, TokenRefused) else self._ttl
        deadline = self._clock() + ttl
        if expires_at is not None:
            deadline = min(deadline, expires_at)
        self._store(digest, deadline, outcome)
        return outcome

    def _store(self, digest: bytes, deadline: float, outcome: _Outcome) -> None:
        if len(self._cache) >= self._max:
            now = self._clock()
            for key in [k for k, (d, _) in self._cache.items() if d <= now]:
                del self._cache[key]
            while len(self._cache) >= self._max:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (deadline, outcome)


def _unwrap(outcome: _Outcome) -> Identity:
    if isinstance(outcome, TokenRefused):
        raise TokenRefused(outcome.reason)
    return outcome


_RBAC_HINT = (
    "the daemon's service account needs 'create tokenreviews': apply "
    "config/200-tokenreview-rbac.yaml"
)


class KubernetesTokenReview:
    """The real ReviewCall: POST /apis/authentication.k8s.io/v1/tokenreviews (kubernetes.aio)."""

    def __init__(self, api_client: Any, *, timeout: float = 5.0) -> None:
        from kubernetes.aio import client

        self._client = client
        self._api = client.AuthenticationV1Api(api_client)
        self._timeout = timeout

    async def __call__(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        client = self._client
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        try:
            result = await self._api.create_token_review(body, _request_timeout=self._timeout)
        except client.ApiException as e:
            hint, cause = "", _REVIEW_CAUSE
            if e.status in (401, 403):
                hint = f" ({_RBAC_HINT})"
                cause = f"the daemon may not create TokenReviews ({_RBAC_HINT})"
            raise AuthUnavailable(
                f"TokenReview answered {e.status} {e.reason}{hint}", cause=cause
            ) from e
        status = result.status
        return dict(status.to_dict()) if status is not None else {}


# --------------------------------------------------------------------------- composed


class PodTokenAuthenticator:
    """Local JWT check first (free), then the cached TokenReview; both must name the same pod.

    While TokenReview is unavailable (the API server is down or unreachable), a *thaw* may
    proceed on the local check alone (signature against the last loaded keys, issuer,
    audience, exp/nbf, pod claims) for the first ``outage_thaw_grace`` seconds of the outage:
    thawing is the safe direction (a frozen pod whose wake fails stays down), and the worst an
    unreviewed token can do is thaw its own pod early (e.g. a deleted pod's token, not yet
    expired). Freezing always needs a review. 0 turns this off.
    """

    def __init__(
        self,
        verifier: JwtVerifier,
        reviewer: TokenReviewer | None,
        *,
        outage_thaw_grace: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._reviewer = reviewer
        self._grace = outage_thaw_grace
        self._clock = clock

    async def authenticate(self, token: str, *, thaw: bool = False) -> Identity:
        token = token.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not token:
            raise TokenRefused("empty token")
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenRefused("malformed token")
        claims = await self._verifier.verify(token)
        local = identity_from_claims(claims)
        if self._reviewer is None:
            return local
        exp = claims.get("exp")
        try:
            reviewed = await self._reviewer.review(
                token, expires_at=float(exp) if isinstance(exp, int | float) else None
            )
        except AuthUnavailable as e:
            outage = self._reviewer.outage()
            if not thaw or self._grace <= 0 or outage is None or outage > self._grace:
                raise
            log.warning(
                "thawing on a locally verified token: TokenReview unavailable",
                extra={
                    "pod_uid": local.pod_uid,
                    "pod_name": local.pod_name,
                    "namespace": local.namespace,
                    "outage": format_duration(outage),
                    "grace": format_duration(self._grace),
                    "error": str(e),
                },
            )
            return local
        return same_pod(local, reviewed)


# --------------------------------------------------------------------------- wiring helpers


@dataclass
class KubeAccess:
    """How to reach the API server: the kubernetes.aio client plus what plain aiohttp needs."""

    api_client: Any
    server: str
    ssl_context: ssl.SSLContext
    configuration: Any

    async def headers(self) -> Mapping[str, str]:
        """The current auth headers (the in-cluster token rotates; read it per call)."""
        settings = await self.configuration.auth_settings()
        return {s["key"]: s["value"] for s in settings.values() if s.get("in") == "header"}

    async def close(self) -> None:
        await self.api_client.close()


async def connect_kubernetes(kubeconfig: str | None) -> KubeAccess:
    """Load a kubeconfig file, or the in-cluster service account when none is given."""
    from kubernetes.aio import client, config

    configuration = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    else:
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    ctx = ssl.create_default_context(
        cafile=configuration.ssl_ca_cert, cadata=configuration.ca_cert_data
    )
    if configuration.cert_file:
        ctx.load_cert_chain(configuration.cert_file, keyfile=configuration.key_file)
    if not configuration.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return KubeAccess(
        api_client=client.ApiClient(configuration),
        server=configuration.host,
        ssl_context=ctx,
        configuration=configuration,
    )
