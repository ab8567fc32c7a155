"""daemon.claims: every way a token's claims or a TokenReview can fail to name one pod."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.claims import (
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    Identity,
    TokenRefused,
    identity_from_claims,
    identity_from_review,
    parse_service_account_user,
    same_pod,
)
from testbed.tokens import review_status

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def claims(**overrides: Any) -> dict[str, Any]:
    """Decoded claims of a real projected token (layout as kube-apiserver issues it)."""
    base: dict[str, Any] = {
        "aud": ["freeze"],
        "exp": 2_000_000_600,
        "iat": 2_000_000_000,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "jti": "8e0b9d9e-4a39-4bb4-9a0e-1f4c2f0d7c11",
        "kubernetes.io": {
            "namespace": "shop",
            "node": {"name": "node-1", "uid": "c0ffee00-0000-4000-8000-000000000001"},
            "pod": {"name": "cart-00001-deployment-5d8f7-abcde", "uid": UID},
            "serviceaccount": {"name": "default", "uid": "5a5a5a5a-0000-4000-8000-000000000002"},
        },
        "nbf": 2_000_000_000,
        "sub": "system:serviceaccount:shop:default",
    }
    base.update(overrides)
    return base


def with_k8s(**k8s: Any) -> dict[str, Any]:
    c = claims()
    c["kubernetes.io"].update(k8s)
    return c


def refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(TokenRefused) as info:
        fn(*args, **kwargs)
    assert info.value.reason == str(info.value)
    return info.value.reason


# ------------------------------------------------------------------ claims


def test_real_token_layout_gives_the_pod() -> None:
    assert identity_from_claims(claims()) == Identity(
        pod_uid=UID,
        pod_name="cart-00001-deployment-5d8f7-abcde",
        namespace="shop",
        service_account="default",
    )


def test_static_pod_hex_uid_is_accepted() -> None:
    c = with_k8s(pod={"name": "etcd-node-1", "uid": "5b1c0a7e9f2d3c4b5a6e7f8091a2b3c4"})
    assert identity_from_claims(c).pod_uid == "5b1c0a7e9f2d3c4b5a6e7f8091a2b3c4"


def test_pod_name_is_optional() -> None:
    c = with_k8s(pod={"uid": UID})
    assert identity_from_claims(c).pod_name is None


def test_flat_dotted_claim_is_not_the_real_shape() -> None:
    c = claims()
    del c["kubernetes.io"]
    c["kubernetes.io.pod.uid"] = UID
    assert "no 'kubernetes.io' claims" in refused(identity_from_claims, c)


@pytest.mark.parametrize("k8s", [None, "shop", [], 42])
def test_kubernetes_claim_must_be_an_object(k8s: Any) -> None:
    assert "kubernetes.io" in refused(identity_from_claims, claims(**{"kubernetes.io": k8s}))


def test_legacy_or_unbound_token_has_no_pod() -> None:
    c = claims()
    del c["kubernetes.io"]["pod"]
    reason = refused(identity_from_claims, c)
    assert "not bound to a pod" in reason and "projected serviceAccountToken" in reason


def test_legacy_secret_token_is_refused() -> None:
    legacy = {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "shop",
        "kubernetes.io/serviceaccount/service-account.name": "default",
        "sub": "system:serviceaccount:shop:default",
    }
    assert "kubernetes.io" in refused(identity_from_claims, legacy)


@pytest.mark.parametrize("pod", [None, "uid", [UID], {"name": "x"}, {"uid": ""}, {"uid": 7}])
def test_pod_claim_without_a_uid(pod: Any) -> None:
    c = with_k8s(pod=pod)
    assert "not bound to a pod" in refused(identity_from_claims, c)


@pytest.mark.parametrize(
    "uid", ["../../etc", "a b", "uid\n", "-leading-dash", "x" * 129, "uid;rm", "ü-uid"]
)
def test_malformed_uids_never_pass(uid: str) -> None:
    assert "malformed pod uid" in refused(identity_from_claims, with_k8s(pod={"uid": uid}))


@pytest.mark.parametrize("name", ["UPPER", "has space", "-x", "x-", 5, "a/b"])
def test_malformed_pod_name(name: Any) -> None:
    c = with_k8s(pod={"name": name, "uid": UID})
    assert "malformed pod name" in refused(identity_from_claims, c)


def test_malformed_namespace() -> None:
    assert "malformed namespace" in refused(identity_from_claims, with_k8s(namespace="Shop!"))


@pytest.mark.parametrize(
    "sub",
    [
        None,
        "",
        "alice",
        "system:node:node-1",
        "system:serviceaccount:shop",
        "system:serviceaccount::default",
        "system:serviceaccount:shop:",
        "system:serviceaccount:shop:default:extra",
    ],
)
def test_subject_must_be_a_service_account(sub: Any) -> None:
    refused(identity_from_claims, claims(sub=sub))


def test_subject_disagreeing_with_nested_namespace() -> None:
    reason = refused(identity_from_claims, claims(sub="system:serviceaccount:other:default"))
    assert "disagrees" in reason


def test_subject_disagreeing_with_nested_service_account() -> None:
    reason = refused(identity_from_claims, claims(sub="system:serviceaccount:shop:admin"))
    assert "disagrees" in reason


def test_missing_nested_namespace_falls_back_to_subject() -> None:
    c = claims()
    del c["kubernetes.io"]["namespace"]
    del c["kubernetes.io"]["serviceaccount"]
    ident = identity_from_claims(c)
    assert (ident.namespace, ident.service_account) == ("shop", "default")


def test_parse_service_account_user() -> None:
    assert parse_service_account_user("system:serviceaccount:ns:sa") == ("ns", "sa")
    assert "not a service-account" in refused(parse_service_account_user, "admin")


@given(
    st.dictionaries(
        st.text(max_size=20),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=30),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=10), inner, max_size=3)
            ),
            max_leaves=10,
        ),
    )
)
def test_arbitrary_claims_only_ever_refuse(junk: dict[str, Any]) -> None:
    """No claim set can crash the parser: it yields an identity or TokenRefused, nothing else."""
    try:
        ident = identity_from_claims(junk)
    except TokenRefused:
        return
    assert ident.pod_uid


# ------------------------------------------------------------------ TokenReview


def status(**overrides: Any) -> dict[str, Any]:
    s = review_status(pod_uid=UID, pod_name="cart-1", namespace="shop")
    s.update(overrides)
    return s


def test_review_gives_the_pod() -> None:
    assert identity_from_review(status(), audience="freeze") == Identity(
        pod_uid=UID, pod_name="cart-1", namespace="shop", service_account="default"
    )


@pytest.mark.parametrize("authenticated", [False, None, "true", 1])
def test_review_not_authenticated(authenticated: Any) -> None:
    s = status(authenticated=authenticated, error="service account token has been invalidated")
    reason = refused(identity_from_review, s, audience="freeze")
    assert "TokenReview denied" in reason and "invalidated" in reason


def test_review_denied_without_error_text() -> None:
    s = {"authenticated": False}
    assert "not authenticated" in refused(identity_from_review, s, audience="freeze")


@pytest.mark.parametrize("audiences", [None, [], ["https://kubernetes.default.svc"], "freeze"])
def test_review_must_confirm_our_audience(audiences: Any) -> None:
    reason = refused(identity_from_review, status(audiences=audiences), audience="freeze")
    assert "audience 'freeze'" in reason


def test_review_without_user() -> None:
    assert "no user" in refused(identity_from_review, status(user=None), audience="freeze")


def test_review_of_a_non_service_account_user() -> None:
    s = status()
    s["user"]["username"] = "kubernetes-admin"
    assert "not a service-account" in refused(identity_from_review, s, audience="freeze")


def test_review_of_an_unbound_token_has_no_pod_uid() -> None:
    s = status()
    del s["user"]["extra"][EXTRA_POD_UID]
    assert "not bound to a pod" in refused(identity_from_review, s, audience="freeze")


def test_review_without_extra_at_all() -> None:
    s = status()
    del s["user"]["extra"]
    assert "not bound to a pod" in refused(identity_from_review, s, audience="freeze")


@pytest.mark.parametrize("values", [[], [UID, "other"], [7], {"a": 1}, 7])
def test_review_ambiguous_pod_uid(values: Any) -> None:
    s = status()
    s["user"]["extra"][EXTRA_POD_UID] = values
    assert "ambiguous" in refused(identity_from_review, s, audience="freeze")


def test_review_malformed_extra() -> None:
    s = status()
    s["user"]["extra"] = ["x"]
    assert "malformed user.extra" in refused(identity_from_review, s, audience="freeze")


def test_review_pod_name_is_optional() -> None:
    s = status()
    del s["user"]["extra"][EXTRA_POD_NAME]
    assert identity_from_review(s, audience="freeze").pod_name is None


def test_review_malformed_uid() -> None:
    s = status()
    s["user"]["extra"][EXTRA_POD_UID] = ["../x"]
    assert "malformed pod uid" in refused(identity_from_review, s, audience="freeze")


def test_review_with_several_audiences_including_ours() -> None:
    s = status(audiences=["other", "freeze"])
    assert identity_from_review(s, audience="freeze").pod_uid == UID


# ------------------------------------------------------------------ comparison


LOCAL = Identity(pod_uid=UID, pod_name="cart-1", namespace="shop", service_account="default")


def test_same_pod_agrees() -> None:
    assert same_pod(LOCAL, copy.copy(LOCAL)) == LOCAL


def test_same_pod_uid_mismatch() -> None:
    other = Identity(pod_uid="11111111-2222-3333-4444-555555555555", namespace="shop")
    reason = refused(same_pod, LOCAL, other)
    assert "pod uid mismatch" in reason and UID in reason


@pytest.mark.parametrize(
    "field,value",
    [("pod_name", "cart-2"), ("namespace", "other"), ("service_account", "admin")],
)
def test_same_pod_other_field_mismatch(field: str, value: str) -> None:
    reviewed = dataclasses.replace(LOCAL, **{field: value})
    assert f"{field} mismatch" in refused(same_pod, LOCAL, reviewed)


def test_same_pod_fills_gaps_from_either_side() -> None:
    local = Identity(pod_uid=UID, pod_name="cart-1", namespace=None, service_account="default")
    reviewed = Identity(pod_uid=UID, pod_name=None, namespace="shop", service_account=None)
    assert same_pod(local, reviewed) == LOCAL


def test_unverified_claims_reads_what_the_token_says() -> None:
    from daemon.claims import unverified_claims
    from testbed.tokens import mint_token, new_rsa_key

    token = mint_token(new_rsa_key(), pod_uid="u-1", pod_name="p", namespace="n", now=1000)
    assert unverified_claims(token) == ("u-1", 1600.0)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "junk",
        "a.b",
        "a.!!!.c",
        "a.bnVsbA.c",  # null
        "a.W10.c",  # []
        "a.eyJleHAiOiB0cnVlfQ.c",  # {"exp": true}
        "a.eyJrdWJlcm5ldGVzLmlvIjogeyJwb2QiOiB7InVpZCI6ICIuLi8ifX19.c",  # uid "../"
        "a." + "A" * 9000 + ".c",
    ],
)
def test_unverified_claims_of_junk_are_none(token: str) -> None:
    from daemon.claims import unverified_claims

    assert unverified_claims(token) == (None, None)
