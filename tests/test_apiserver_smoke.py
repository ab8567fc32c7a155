"""Smoke test of the real control plane fixture: etcd + kube-apiserver built from Go modules.

Proves what freeze-proxy's daemon relies on: pod-bound projected service-account tokens
(TokenRequest via ``kubectl create token``), their claims, TokenReview with an audience and the
pod-uid extra, refusal once the pod is gone, and the OIDC discovery endpoints.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
import pytest

from testbed.apiserver import ApiServer

pytestmark = pytest.mark.apiserver

AUDIENCE = "freeze"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


def _review(api: ApiServer, token: str, audiences: list[str]) -> Any:
    from kubernetes import client

    with api.client() as api_client:
        review = client.AuthenticationV1Api(api_client).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        )
    return review.status


def test_apiserver_is_up(apiserver: ApiServer) -> None:
    assert apiserver.running
    status, body = apiserver.get("/readyz")
    assert (status, body) == (200, b"ok")
    version = json.loads(apiserver.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert version["clientVersion"]["gitVersion"] == version["serverVersion"]["gitVersion"]
    assert apiserver.kubeconfig.is_file()
    assert apiserver.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert apiserver.url.startswith("https://127.0.0.1:")
    assert apiserver.issuer == apiserver.url


def test_pod_bound_token_review_and_discovery(apiserver: ApiServer) -> None:
    ns = f"smoke-{uuid.uuid4().hex[:8]}"
    sa, pod = "app", "app-pod"
    apiserver.kubectl("create", "namespace", ns)
    apiserver.kubectl("-n", ns, "create", "serviceaccount", sa)
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {
            "serviceAccountName": sa,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }
    apiserver.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    created = json.loads(apiserver.kubectl("-n", ns, "get", "pod", pod, "-o", "json").stdout)
    pod_uid = created["metadata"]["uid"]
    assert created["status"].get("phase") == "Pending"  # no kubelet, no scheduler
    assert not created["spec"].get("nodeName")

    token = apiserver.kubectl(
        "-n", ns, "create", "token", sa,
        "--audience", AUDIENCE,
        "--bound-object-kind", "Pod",
        "--bound-object-name", pod,
        "--bound-object-uid", pod_uid,
        "--duration", "10m",
    ).stdout.strip()  # fmt: skip

    # Claims, verified with the public half of the server's signing key.
    claims = jwt.decode(
        token,
        apiserver.service_account_public_key_file.read_text(),
        algorithms=["RS256"],
        audience=AUDIENCE,
        issuer=apiserver.issuer,
    )
    assert claims["sub"] == f"system:serviceaccount:{ns}:{sa}"
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == ns
    assert k8s["pod"] == {"name": pod, "uid": pod_uid}
    assert k8s["serviceaccount"]["name"] == sa

    # TokenReview through the Python client, with our audience.
    status = _review(apiserver, token, [AUDIENCE])
    assert status.authenticated is True, status.error
    assert status.audiences == [AUDIENCE]
    assert status.user.username == f"system:serviceaccount:{ns}:{sa}"
    assert status.user.extra[POD_UID_EXTRA] == [pod_uid]
    assert status.user.extra["authentication.kubernetes.io/pod-name"] == [pod]

    # Another audience is refused.
    other = _review(apiserver, token, ["someone-else"])
    assert not other.authenticated

    # OIDC discovery and the JWKS serve the key that signed the token.
    code, body = apiserver.get("/.well-known/openid-configuration")
    assert code == 200, body
    discovery = json.loads(body)
    assert discovery["issuer"] == apiserver.issuer
    assert discovery["jwks_uri"].endswith("/openid/v1/jwks")
    code, body = apiserver.get("/openid/v1/jwks")
    assert code == 200, body
    keys = {k["kid"]: k for k in json.loads(body)["keys"]}
    kid = jwt.get_unverified_header(token)["kid"]
    assert kid in keys
    by_jwks = jwt.decode(token, jwt.PyJWK(keys[kid]).key, algorithms=["RS256"], audience=AUDIENCE)
    assert by_jwks["sub"] == claims["sub"]

    # Once the pod is gone, the bound token is refused. kube-apiserver caches successful token
    # authentications for 10 s (its token success cache), so the refusal may lag that long.
    apiserver.kubectl("-n", ns, "delete", "pod", pod, "--wait=true", "--timeout=30s")
    assert apiserver.kubectl("-n", ns, "get", "pod", pod, check=False).returncode != 0
    deadline = time.monotonic() + 30
    gone = _review(apiserver, token, [AUDIENCE])
    while gone.authenticated and time.monotonic() < deadline:
        time.sleep(0.5)
        gone = _review(apiserver, token, [AUDIENCE])
    assert gone.authenticated is not True
    assert gone.error, "expected a reason for the refusal"
