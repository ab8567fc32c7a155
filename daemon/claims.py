"""Who is asking: the pod identity inside a verified token and inside a TokenReview answer.

Pure functions over already decoded data (no I/O), so every way a token can be malformed or
disagree with the API server is unit-tested here. The pod UID the daemon acts on comes only
from these functions, never from the HTTP request.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The projected service-account token nests its Kubernetes claims under one key:
# {"kubernetes.io": {"namespace": ..., "pod": {"name", "uid"}, "serviceaccount": {"name", "uid"}}}
K8S_CLAIM = "kubernetes.io"
# TokenReview's status.user.extra keys for a pod-bound token.
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
SA_USER_PREFIX = "system:serviceaccount:"

# Kubernetes UIDs are UUIDs (static pods: a hex hash). Anything else never names a pod, and the
# UID ends up in container lookups and logs, so only this conservative alphabet passes.
_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Namespaces and service accounts are DNS-1123 labels/subdomains; pod names are subdomains.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

_PROJECT_HINT = (
    "mount a projected serviceAccountToken (audience freeze) of the pod, not a legacy secret token"
)


class TokenRefused(Exception):
    """The token does not prove which pod is asking; ``reason`` says why (answered 403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """The pod a verified token belongs to; ``pod_uid`` is what the daemon acts on."""

    pod_uid: str
    pod_name: str | None = None
    namespace: str | None = None
    service_account: str | None = None


def _check_uid(uid: object, where: str) -> str:
    if not isinstance(uid, str) or not uid:
        raise TokenRefused(f"token is not bound to a pod: no pod uid in {where}; {_PROJECT_HINT}")
    if not _UID_RE.fullmatch(uid):
        raise TokenRefused(f"malformed pod uid in {where}")
    return uid


def _optional_name(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise TokenRefused(f"malformed {what} in token")
    return value


def parse_service_account_user(username: object) -> tuple[str, str]:
    """Split ``system:serviceaccount:<ns>:<name>`` (the token's ``sub``, the review's user)."""
    if not isinstance(username, str) or not username.startswith(SA_USER_PREFIX):
        raise TokenRefused(f"not a service-account token (subject {username!r}); {_PROJECT_HINT}")
    parts = username[len(SA_USER_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise TokenRefused(f"malformed service-account subject {username!r}")
    namespace, name = parts
    _optional_name(namespace, "namespace")
    _optional_name(name, "service account")
    return namespace, name


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    """The pod identity in the (signature-checked) claims of a projected service-account token."""
    k8s = claims.get(K8S_CLAIM)
    if not isinstance(k8s, Mapping):
        raise TokenRefused(f"token has no '{K8S_CLAIM}' claims; {_PROJECT_HINT}")
    pod = k8s.get("pod")
    if not isinstance(pod, Mapping):
        raise TokenRefused(f"token is not bound to a pod (no '{K8S_CLAIM}.pod'); {_PROJECT_HINT}")
    uid = _check_uid(pod.get("uid"), f"'{K8S_CLAIM}.pod.uid'")
    pod_name = _optional_name(pod.get("name"), "pod name")
    namespace = _optional_name(k8s.get("namespace"), "namespace")
    sa = k8s.get("serviceaccount")
    sa_name = _optional_name(sa.get("name") if isinstance(sa, Mapping) else None, "service account")
    sub_ns, sub_sa = parse_service_account_user(claims.get("sub"))
    # The API server writes sub from the same fields; a disagreement means a forged layout.
    if (namespace is not None and namespace != sub_ns) or (
        sa_name is not None and sa_name != sub_sa
    ):
        raise TokenRefused(
            f"token subject {claims.get('sub')!r} disagrees with its '{K8S_CLAIM}' claims"
        )
    return Identity(pod_uid=uid, pod_name=pod_name, namespace=sub_ns, service_account=sub_sa)


def _single_extra(extra: Mapping[str, Any], key: str) -> str | None:
    values = extra.get(key)
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list | tuple) or len(values) != 1 or not isinstance(values[0], str):
        raise TokenRefused(f"TokenReview returned an ambiguous '{key}': {values!r}")
    return values[0]


def identity_from_review(status: Mapping[str, Any], *, audience: str) -> Identity:
    """The pod identity in a TokenReview ``status`` (a dict in the API's JSON shape)."""
    if status.get("authenticated") is not True:
        error = status.get("error") or "not authenticated"
        raise TokenRefused(f"TokenReview denied the token: {error}")
    audiences = status.get("audiences") or []
    # An empty list means "valid for the API server itself", not for us.
    if not isinstance(audiences, list | tuple) or audience not in audiences:
        raise TokenRefused(
            f"TokenReview did not confirm audience '{audience}' (got {list(audiences or [])})"
        )
    user = status.get("user")
    if not isinstance(user, Mapping):
        raise TokenRefused("TokenReview returned no user")
    namespace, sa_name = parse_service_account_user(user.get("username"))
    extra = user.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise TokenRefused("TokenReview returned a malformed user.extra")
    uid = _check_uid(_single_extra(extra, EXTRA_POD_UID), f"TokenReview extra '{EXTRA_POD_UID}'")
    pod_name = _optional_name(_single_extra(extra, EXTRA_POD_NAME), "pod name")
    return Identity(pod_uid=uid, pod_name=pod_name, namespace=namespace, service_account=sa_name)


def same_pod(local: Identity, reviewed: Identity) -> Identity:
    """Both views must name the same pod; return the review's, with the claims filling gaps."""
    if local.pod_uid != reviewed.pod_uid:
        raise TokenRefused(
            f"pod uid mismatch: token claims {local.pod_uid}, TokenReview {reviewed.pod_uid}"
        )
    for field in ("pod_name", "namespace", "service_account"):
        a, b = getattr(local, field), getattr(reviewed, field)
        if a is not None and b is not None and a != b:
            raise TokenRefused(f"{field} mismatch: token claims {a!r}, TokenReview {b!r}")
    return Identity(
        pod_uid=reviewed.pod_uid,
        pod_name=reviewed.pod_name or local.pod_name,
        namespace=reviewed.namespace or local.namespace,
        service_account=reviewed.service_account or local.service_account,
    )


def unverified_claims(token: str) -> tuple[str | None, float | None]:
    """(pod uid, exp) as a token *claims* them, without checking anything: only for choosing
    which rate-limit bucket a request is charged to, never for deciding what to act on."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None, None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None, None
    if not isinstance(claims, dict):
        return None, None
    k8s = claims.get(K8S_CLAIM)
    pod = k8s.get("pod") if isinstance(k8s, dict) else None
    uid = pod.get("uid") if isinstance(pod, dict) else None
    exp = claims.get("exp")
    return (
        uid if isinstance(uid, str) and _UID_RE.fullmatch(uid) else None,
        float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None,
    )
