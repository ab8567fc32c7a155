"""Locally minted service-account tokens, shaped like the ones kube-apiserver projects into pods.

Tests, the demo and the benchmarks need pod-bound tokens without a cluster: these keys sign
tokens with the same header (alg, kid), the same claim layout (iss, sub, aud list, exp, iat, nbf,
jti, nested ``kubernetes.io``) and the same JWKS document the API server serves at
``/openid/v1/jwks``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class _Drop:
    """Marker for ``mint_token(..., claim=DROP)``: leave that claim out."""

    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@dataclass(frozen=True)
class SigningKey:
    """A private key plus the key id and algorithm the API server would publish for it."""

    kid: str
    algorithm: str
    private_key: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        """The public half as one JWKS entry (kty, kid, alg, use, n/e or crv/x/y)."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.algorithm, "use": "sig"})
        jwk.pop("key_ops", None)
        return jwk

    def public_pem(self) -> bytes:
        """The public key as PEM (for algorithm-confusion tests)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _kid(private_key: PrivateKey) -> str:
    """Key id computed like kube-apiserver does: base64url(sha256(DER public key))."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def new_rsa_key(kid: str | None = None, bits: int = 2048) -> SigningKey:
    """A fresh RSA key (RS256), the API server's default kind."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return SigningKey(kid=kid or _kid(key), algorithm="RS256", private_key=key)


def new_ec_key(kid: str | None = None) -> SigningKey:
    """A fresh P-256 key (ES256), also accepted by the API server as a signing key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(kid=kid or _kid(key), algorithm="ES256", private_key=key)


_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


def new_key(algorithm: str, kid: str | None = None) -> SigningKey:
    """A fresh key for any asymmetric JWS algorithm: RS*/PS* (RSA 2048), ES256/384/512 (P-256,
    P-384, P-521), EdDSA (Ed25519) or "EdDSA-Ed448"."""
    key: PrivateKey
    if algorithm[:2] in ("RS", "PS"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm in _CURVES:
        key = ec.generate_private_key(_CURVES[algorithm])
    elif algorithm == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "EdDSA-Ed448":
        key, algorithm = ed448.Ed448PrivateKey.generate(), "EdDSA"
    else:
        raise ValueError(f"no key kind for {algorithm!r}")
    return SigningKey(kid=kid or _kid(key), algorithm=algorithm, private_key=key)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """The JWKS document for these keys, as served at ``/openid/v1/jwks``."""
    return {"keys": [k.public_jwk() for k in keys]}


def write_jwks(path: str | Path, *keys: SigningKey) -> Path:
    """Write the JWKS document for ``keys`` to ``path`` (for ``--jwks-file``)."""
    target = Path(path)
    target.write_text(json.dumps(jwks(*keys)))
    return target


def mint_token(
    key: SigningKey,
    *,
    pod_uid: str,
    pod_name: str,
    namespace: str,
    audience: str | list[str] = "freeze",
    issuer: str = DEFAULT_ISSUER,
    lifetime: int = 600,
    service_account: str = "default",
    service_account_uid: str = "00000000-0000-4000-8000-00000000beef",
    node_name: str | None = None,
    now: float | None = None,
    headers: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    """A signed pod-bound token; ``overrides`` replace top-level claims (``DROP`` removes one).

    ``headers`` overrides JOSE header fields (e.g. ``{"kid": "other"}``, ``{"kid": DROP}``);
    the header's ``alg`` is always the key's algorithm.
    """
    issued = int(time.time() if now is None else now)
    k8s: dict[str, Any] = {
        "namespace": namespace,
        "pod": {"name": pod_name, "uid": pod_uid},
        "serviceaccount": {"name": service_account, "uid": service_account_uid},
    }
    if node_name is not None:
        k8s["node"] = {"name": node_name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, node_name))}
    claims: dict[str, Any] = {
        "aud": [audience] if isinstance(audience, str) else list(audience),
        "exp": issued + lifetime,
        "iat": issued,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": k8s,
        "nbf": issued,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    for name, value in overrides.items():
        if value is DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    header: dict[str, Any] = {"kid": key.kid, "typ": None}
    header.update(headers or {})
    header = {name: value for name, value in header.items() if value is not DROP}
    # kube-apiserver's header is exactly {"alg", "kid"}: no "typ".
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers=header)


def review_status(
    *,
    pod_uid: str,
    pod_name: str,
    namespace: str,
    service_account: str = "default",
    audiences: list[str] | None = None,
) -> dict[str, Any]:
    """A TokenReview ``status`` as the API server returns it for a valid pod-bound token."""
    return {
        "authenticated": True,
        "audiences": ["freeze"] if audiences is None else audiences,
        "user": {
            "username": f"system:serviceaccount:{namespace}:{service_account}",
            "uid": "00000000-0000-4000-8000-00000000beef",
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "extra": {
                "authentication.kubernetes.io/credential-id": [f"JTI={uuid.uuid4()}"],
                "authentication.kubernetes.io/pod-name": [pod_name],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
            },
        },
    }
