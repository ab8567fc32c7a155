"""Which containers the webhook has freeze-proxy freeze (webhook/containers.py), and what the
sidecar is given for them, on Knative-shaped pods (tests/knative_pods.py), Istio-injected ones
included."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freeze_proxy import contract
from freeze_proxy.__main__ import parse_args
from tests.knative_pods import (
    istio_injected,
    knative_pod,
    multi_container,
    queue_proxy,
    user_container,
)
from tests.test_mutation import EXEC_PROBE, apply_patch, container, validate
from webhook.containers import (
    ANNOTATION_CONTAINERS,
    ANNOTATION_KEEP_AWAKE,
    BadContainerList,
    freeze_list,
    split_names,
)
from webhook.mutation import MutationSettings, exec_probes, mutate

SETTINGS = MutationSettings(proxy_image="img")


def pod_with(*containers: dict[str, Any], **annotations: str) -> dict[str, Any]:
    return knative_pod([*containers, queue_proxy()], annotations=annotations)


def frozen(pod: Mapping[str, Any], serving: str = "user-container") -> list[str]:
    return freeze_list(pod, serving, "queue-proxy", exec_probes).containers


def sidecar(name: str) -> dict[str, Any]:
    return user_container(name, None)


def everything_but_queue_proxy(pod: Mapping[str, Any]) -> list[str]:
    """container-freezer's default (knative-sandbox/container-freezer: every container of the
    pod but queue-proxy), written here only to compare with ours."""
    return [c["name"] for c in pod["spec"]["containers"] if c["name"] != "queue-proxy"]


# --- the default list -----------------------------------------------------------------------


def test_single_container_pod_freezes_the_app() -> None:
    assert frozen(knative_pod()) == ["user-container"]


def test_multi_container_revision_freezes_the_serving_container_and_its_sidecars() -> None:
    pod = knative_pod([*multi_container(), queue_proxy()])
    assert frozen(pod, "user-container-0") == ["user-container-0", "user-container-1"]


def test_istio_injected_pod_keeps_istio_proxy_awake_where_the_default_freezes_it() -> None:
    """Why not container-freezer's "everything but queue-proxy": in an Istio mesh every request,
    queue-proxy's included, enters the pod through istio-proxy (istio-init's iptables redirect
    all inbound traffic to it). That default freezes istio-proxy, and then no request reaches
    queue-proxy or freeze-proxy again: the pod can never be woken."""
    pod = istio_injected(pod_with(user_container(), sidecar("log-shipper")))
    assert "istio-proxy" in everything_but_queue_proxy(pod)  # the pod would be unwakeable
    assert frozen(pod) == ["user-container", "log-shipper"]


def test_istio_native_sidecar_and_init_containers_are_never_frozen() -> None:
    pod = istio_injected(knative_pod(), native=True)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["istio-init", "istio-proxy"]
    assert frozen(pod) == ["user-container"]


@pytest.mark.parametrize("mesh", contract.MESH_PROXIES)
def test_mesh_proxies_are_never_frozen(mesh: str) -> None:
    assert frozen(pod_with(user_container(), sidecar(mesh))) == ["user-container"]


def test_keep_awake_names_more_infrastructure() -> None:
    pod = pod_with(
        user_container(), sidecar("auth-proxy"), sidecar("cache"),
        **{ANNOTATION_KEEP_AWAKE: " auth-proxy ,, "},
    )  # fmt: skip
    result = freeze_list(pod, "user-container", "queue-proxy")
    assert result == type(result)(["user-container", "cache"], [])


def test_keep_awake_of_an_unknown_container_warns() -> None:
    pod = pod_with(user_container(), **{ANNOTATION_KEEP_AWAKE: "envoy"})
    result = freeze_list(pod, "user-container", "queue-proxy")
    assert result.containers == ["user-container"]
    (warning,) = result.warnings
    assert "'envoy'" in warning and ANNOTATION_KEEP_AWAKE in warning and "ignored" in warning


def test_keep_awake_of_the_serving_container_is_refused() -> None:
    pod = pod_with(user_container(), **{ANNOTATION_KEEP_AWAKE: "user-container"})
    with pytest.raises(BadContainerList, match=r"serving container.*enabled: \"false\""):
        frozen(pod)


def test_queue_proxy_found_by_env_under_another_name_is_never_frozen() -> None:
    queue = queue_proxy()
    queue["name"] = "qp"
    pod = knative_pod([user_container(), queue])
    assert freeze_list(pod, "user-container", "qp").containers == ["user-container"]


# --- the annotation's list ------------------------------------------------------------------


def test_the_annotation_replaces_the_default_in_pod_order() -> None:
    pod = pod_with(
        user_container(), sidecar("a"), sidecar("b"),
        **{ANNOTATION_CONTAINERS: "b, user-container"},
    )  # fmt: skip
    assert frozen(pod) == ["user-container", "b"]


@pytest.mark.parametrize(
    ("listed", "error"),
    [
        ("user-container,nope", r"no container 'nope' \(containers: user-container, "),
        ("user-container,queue-proxy", r"'queue-proxy' is never frozen: it is queue-proxy"),
        ("user-container,freeze-proxy", r"'freeze-proxy' is never frozen: it is freeze-proxy"),
        ("user-container,istio-proxy", r"'istio-proxy' is never frozen: .*service-mesh proxy"),
        ("user-container,linkerd-proxy", r"'linkerd-proxy' is never frozen: .*service-mesh"),
        ("user-container,auth", r"'auth' is never frozen: it is named in .*keep-awake"),
        ("user-container,istio-init", r"'istio-init' is never frozen: .*init container"),
        ("user-container,native", r"'native' is never frozen: it is a native sidecar"),
        ("log", r"leaves out the serving container 'user-container'"),
        (" , ", r"names no container"),
        ("user-container,probed", r"'probed' has exec livenessProbe"),
    ],
)
def test_a_list_that_cannot_be_honoured_is_refused(listed: str, error: str) -> None:
    probed = sidecar("probed")
    probed["livenessProbe"] = copy.deepcopy(EXEC_PROBE)
    pod = pod_with(
        user_container(), sidecar("log"), sidecar("auth"), sidecar("istio-proxy"),
        sidecar("linkerd-proxy"), sidecar("freeze-proxy"), probed,
        **{ANNOTATION_CONTAINERS: listed, ANNOTATION_KEEP_AWAKE: "auth"},
    )  # fmt: skip
    pod["spec"]["initContainers"] = [
        {"name": "istio-init", "image": "x"},
        {"name": "native", "image": "x", "restartPolicy": "Always"},
    ]
    with pytest.raises(BadContainerList, match=error) as err:
        frozen(pod)
    assert ANNOTATION_CONTAINERS in str(err.value)


@given(st.lists(st.sampled_from(["a", "b", " a", "b ", "", " ", "c"]), max_size=8))
def test_split_names(parts: list[str]) -> None:
    names = split_names(",".join(parts))
    assert names == list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def test_split_names_of_a_non_string_is_empty() -> None:
    assert split_names(None) == split_names(3) == []


@given(
    st.lists(
        st.sampled_from(["log", "cache", "istio-proxy", "linkerd-proxy", "auth", "probed"]),
        unique=True,
    ),
    st.booleans(),
    st.booleans(),
)
def test_the_default_never_holds_the_request_path(
    sidecars: list[str], istio: bool, native: bool
) -> None:
    """Whatever the pod holds: the serving container is frozen, nothing of the request path is,
    every other regular container without an exec probe is."""
    containers = [user_container()]
    for name in sidecars:
        c = sidecar(name)
        if name == "probed":
            c["readinessProbe"] = copy.deepcopy(EXEC_PROBE)
        containers.append(c)
    pod = pod_with(*containers, **{ANNOTATION_KEEP_AWAKE: "auth"})
    if istio and "istio-proxy" not in sidecars:
        pod = istio_injected(pod, native=native)
    got = frozen(pod)
    assert got[0] == "user-container"
    never = {"queue-proxy", "freeze-proxy", "istio-proxy", "linkerd-proxy", "auth", "istio-init"}
    assert not never & set(got)
    assert set(got) == {"user-container", *sidecars} - never - {"probed"}


# --- what the sidecar is given ---------------------------------------------------------------


def proxy_settings(pod: dict[str, Any]) -> Any:
    result = mutate(pod, SETTINGS)
    assert result.action == "mutated", result.warnings
    out = apply_patch(pod, result.patch)
    validate(out)
    proxy = container(out, "freeze-proxy")
    values = {e["name"]: e["value"] for e in proxy["env"] if "value" in e}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # parse_args sets up the proxy's JSON logging: keep pytest's
        return result, parse_args(proxy["args"], env={**values, "HOST_IP": "10.0.0.7"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_sidecar_asks_for_exactly_the_webhooks_list() -> None:
    pod = istio_injected(pod_with(user_container(), sidecar("log-shipper")))
    result, settings = proxy_settings(pod)
    assert result.frozen == settings.containers == ["user-container", "log-shipper"]


def test_the_annotation_reaches_the_sidecar() -> None:
    pod = pod_with(
        user_container(), sidecar("a"), sidecar("b"), **{ANNOTATION_CONTAINERS: "user-container"}
    )
    _, settings = proxy_settings(pod)
    assert settings.containers == ["user-container"]


def test_a_bad_list_leaves_the_pod_unchanged_with_a_warning() -> None:
    listed = {ANNOTATION_CONTAINERS: "istio-proxy,user-container"}
    pod = istio_injected(pod_with(user_container(), **listed))
    result = mutate(pod, SETTINGS)
    assert result.action == "skipped" and result.patch == []
    (warning,) = result.warnings
    assert warning.startswith("freeze-proxy not injected: ") and "istio-proxy" in warning
