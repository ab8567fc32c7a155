"""The pure Pod -> JSONPatch mutation, on pods shaped as Knative's reconciler makes them."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.knative_pods import (
    TCP_PROBE,
    knative_pod,
    multi_container,
    queue_proxy,
    tcp_probe,
    user_container,
)
from webhook.mutation import (
    ANNOTATION_CONTAINER,
    ANNOTATION_ENABLED,
    ANNOTATION_GRACE,
    LABEL_ADDED,
    MutationSettings,
    escape_pointer,
    mutate,
    rewrite_readiness_env,
)

SETTINGS = MutationSettings(proxy_image="ghcr.io/freeze-proxy/freeze-proxy:test")


# --- a tiny RFC 6902 applier (add/replace/remove/test), enough to check our patches -------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    assert path.startswith("/"), path
    tokens = [_unescape(t) for t in path[1:].split("/")]
    node = doc
    for token in tokens[:-1]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node, tokens[-1]


def apply_patch(doc: Any, patch: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in patch:
        parent, key = _parent(doc, op["path"])
        kind = op["op"]
        if kind == "test":
            current = parent[int(key)] if isinstance(parent, list) else parent[key]
            assert current == op["value"], op
        elif kind == "add":
            if isinstance(parent, list):
                if key == "-":
                    parent.append(copy.deepcopy(op["value"]))
                else:
                    parent.insert(int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(key)] = copy.deepcopy(op["value"])
            else:
                assert key in parent, f"replace of missing {op['path']}"
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(key) if isinstance(parent, list) else key]
        else:
            raise AssertionError(f"unexpected op {kind}")
    return doc


# --- helpers on the pods of tests/knative_pods.py ------------------------------------------------


def mutated(pod: dict[str, Any]) -> dict[str, Any]:
    result = mutate(pod, SETTINGS)
    assert result.action == "mutated", result.reason
    return apply_patch(pod, result.patch)  # type: ignore[no-any-return]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def validate(pod: dict[str, Any]) -> None:
    kubernetes_validate.validate(pod, "1.33", strict=True)


# --- examples ------------------------------------------------------------------------------------


def test_default_knative_pod_is_fully_mutated() -> None:
    pod = knative_pod()
    validate(pod)
    out = mutated(pod)
    validate(out)
    labels = out["metadata"]["labels"]
    assert labels["freeze-pod-added"] == "true"
    assert labels["freeze-pod-version"] == "9"
    assert labels["serving.knative.dev/revision"] == "hello-00001"  # untouched
    volume, state = out["spec"]["volumes"]
    assert state == {
        "name": "freeze-proxy-state",
        "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
    }
    assert volume == {
        "name": "freeze-projected",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "freeze",
                        "expirationSeconds": 600,
                        "path": "token",
                    }
                }
            ]
        },
    }
    assert env(container(out, "queue-proxy"))["USER_PORT"] == "9999"
    proxy = out["spec"]["containers"][-1]
    assert proxy["name"] == "freeze-proxy"
    assert proxy["image"] == SETTINGS.proxy_image
    assert proxy["args"][-4:] == [
        "--upstream", "http://127.0.0.1:8080", "--container", "user-container"
    ]  # fmt: skip
    proxy_env = env(proxy)
    assert proxy_env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert "USER_CONTAINER" not in proxy_env  # the --container flags say it (version 7)
    assert "FREEZE_GRACE" not in proxy_env
    assert proxy["volumeMounts"] == [
        {"name": "freeze-projected", "mountPath": "/var/run/projected", "readOnly": True},
        {"name": "freeze-proxy-state", "mountPath": "/var/run/freeze-proxy"},
    ]
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 9998}
    assert set(proxy["resources"]["requests"]) == {"cpu", "memory"}
    # Kubelet holds our SIGTERM until queue-proxy drained, like the app's (Knative's hook).
    assert proxy["lifecycle"] == container(pod, "user-container")["lifecycle"]
    # The user container itself is not changed (no probes to re-aim here).
    assert container(out, "user-container") == container(pod, "user-container")


def test_no_drain_hook_is_invented_when_the_app_has_none() -> None:
    pod = knative_pod()
    del container(pod, "user-container")["lifecycle"]
    assert "lifecycle" not in mutated(pod)["spec"]["containers"][-1]


def test_custom_user_port_and_container_name() -> None:
    pod = knative_pod([queue_proxy(user_port=3000), user_container("api", 3000)])
    out = mutated(pod)
    validate(out)
    proxy = container(out, "freeze-proxy")
    assert proxy["args"][-3:] == ["http://127.0.0.1:3000", "--container", "api"]
    assert env(container(out, "queue-proxy"))["USER_PORT"] == "9999"


def test_multi_container_picks_the_one_declaring_the_port() -> None:
    sidecar = user_container("log-shipper", None)
    pod = knative_pod([sidecar, user_container("web", 8081), queue_proxy(user_port=8081)])
    result = mutate(pod, SETTINGS)
    assert result.user_container == "web"
    assert result.user_port == 8081
    validate(apply_patch(pod, result.patch))


def test_user_container_by_knative_port_env_when_no_port_declared() -> None:
    web = user_container("web", None)
    web["env"].insert(0, {"name": "PORT", "value": "8080"})
    pod = knative_pod([user_container("sidecar", None), web, queue_proxy()])
    assert mutate(pod, SETTINGS).user_container == "web"


def test_user_container_by_annotation() -> None:
    pod = knative_pod(
        [user_container("a", None), user_container("b", None), queue_proxy()],
        annotations={ANNOTATION_CONTAINER: "b"},
    )
    assert mutate(pod, SETTINGS).user_container == "b"


def test_single_other_container_without_ports() -> None:
    pod = knative_pod([user_container("only", None), queue_proxy()])
    assert mutate(pod, SETTINGS).user_container == "only"


def test_undecidable_user_container_is_left_alone_with_a_warning() -> None:
    pod = knative_pod([user_container("a", None), user_container("b", None), queue_proxy()])
    result = mutate(pod, SETTINGS)
    assert result.patch == []
    assert result.action == "skipped"
    assert result.warnings and "cannot tell" in result.warnings[0]


def test_already_mutated_gets_empty_patch() -> None:
    out = mutated(knative_pod())
    again = mutate(out, SETTINGS)
    assert again.patch == [] and again.action == "skipped" and not again.warnings


def test_opted_out() -> None:
    pod = knative_pod(annotations={ANNOTATION_ENABLED: "false"})
    result = mutate(pod, SETTINGS)
    assert result.patch == [] and "opted out" in result.reason
    assert mutate(knative_pod(annotations={ANNOTATION_ENABLED: "true"}), SETTINGS).patch


def test_non_knative_pod_untouched_silently() -> None:
    pod = knative_pod([user_container("nginx", 80)])
    result = mutate(pod, SETTINGS)
    assert result.patch == [] and not result.warnings


@pytest.mark.parametrize("grace", ["0", "250ms", "1.5s", "2m", "10"])
def test_valid_grace_becomes_env(grace: str) -> None:
    out = mutated(knative_pod(annotations={ANNOTATION_GRACE: grace}))
    assert env(container(out, "freeze-proxy"))["FREEZE_GRACE"] == grace
    assert not mutate(knative_pod(annotations={ANNOTATION_GRACE: grace}), SETTINGS).warnings


@pytest.mark.parametrize("grace", ["soon", "-1s", "5 days", ""])
def test_invalid_grace_is_dropped_with_warning(grace: str) -> None:
    pod = knative_pod(annotations={ANNOTATION_GRACE: grace})
    result = mutate(pod, SETTINGS)
    assert result.action == "mutated"  # still admitted and frozen, with the default grace
    out = apply_patch(pod, result.patch)
    assert "FREEZE_GRACE" not in env(container(out, "freeze-proxy"))
    (warning,) = result.warnings
    assert ANNOTATION_GRACE in warning and "refused" in warning and "default" in warning
    assert "invalid duration" in warning  # says why


def test_mode_annotations_become_the_sidecars_flags_and_the_proxy_reads_them() -> None:
    from freeze_proxy.__main__ import parse_args

    prefix = "freeze-proxy.knative.dev/"
    default_args = container(mutated(knative_pod()), "freeze-proxy")["args"]
    assert "--mode" not in default_args  # freeze: the proxy's own default, nothing passed
    pod = knative_pod(annotations={prefix + "mode": "throttle", prefix + "throttle-cpu": "20m"})
    args = container(mutated(pod), "freeze-proxy")["args"]
    mode_at = args.index("--mode")
    assert args[mode_at : mode_at + 4] == ["--mode", "throttle", "--throttle-cpu", "20m"]
    settings = parse_args(args, env={})
    assert (settings.mode, settings.throttle_cpu) == ("throttle", "20m")
    dry = container(mutated(knative_pod(annotations={prefix + "mode": "dry-run"})), "freeze-proxy")
    assert parse_args(dry["args"], env={}).mode == "dry-run"
    result = mutate(knative_pod(annotations={prefix + "throttle-cpu": "1"}), SETTINGS)
    assert result.action == "mutated"
    (warning,) = result.warnings
    assert "throttle-cpu" in warning and "10m to 999m" in warning


def test_volume_name_collision() -> None:
    users = [
        {"name": "freeze-projected", "emptyDir": {}},
        {"name": "freeze-projected-2", "emptyDir": {}},
        {"name": "projected", "emptyDir": {}},
        {"name": "freeze-proxy-state", "emptyDir": {}},
    ]
    pod = knative_pod(volumes=copy.deepcopy(users))
    out = mutated(pod)
    validate(out)
    assert out["spec"]["volumes"][:4] == users
    assert out["spec"]["volumes"][4]["name"] == "freeze-projected-3"
    assert out["spec"]["volumes"][5]["name"] == "freeze-proxy-state-2"
    mounts = container(out, "freeze-proxy")["volumeMounts"]
    assert [m["name"] for m in mounts] == ["freeze-projected-3", "freeze-proxy-state-2"]


def test_missing_labels_map_is_created() -> None:
    pod = knative_pod()
    del pod["metadata"]["labels"]
    out = mutated(pod)
    assert out["metadata"]["labels"] == {"freeze-pod-added": "true", "freeze-pod-version": "9"}


def qp_probe(pod: dict[str, Any]) -> Any:
    return json.loads(env(container(pod, "queue-proxy"))["SERVING_READINESS_PROBE"])


def timeout_header(seconds: int = 1) -> dict[str, str]:
    return {"name": "Freeze-Probe-Timeout", "value": str(seconds)}


READY = {
    "path": "/ready/tcp/8080",
    "port": 9998,
    "host": "127.0.0.1",
    "scheme": "HTTP",
    "httpHeaders": [timeout_header()],
}


def test_readiness_probe_http_is_answered_by_freeze_proxy() -> None:
    """queue-proxy's httpGet probe of the app: freeze-proxy GETs the same path, with the same
    headers, while the app is awake, and answers from that while it is frozen."""
    probe = {
        "httpGet": {
            "path": "/healthz?deep=1",
            "port": 8080,
            "host": "127.0.0.1",
            "scheme": "HTTP",
            "httpHeaders": [{"name": "X-Check", "value": "deep"}],
        },
        "successThreshold": 1,
        "timeoutSeconds": 4,
    }
    out = mutated(knative_pod([user_container(), queue_proxy(probe=json.dumps(probe))]))
    assert qp_probe(out) == {
        "httpGet": {
            "path": "/ready/http/8080/healthz?deep=1",
            "port": 9998,
            "host": "127.0.0.1",
            "scheme": "HTTP",
            "httpHeaders": [{"name": "X-Check", "value": "deep"}, timeout_header(4)],
        },
        "successThreshold": 1,
        "timeoutSeconds": 4,
    }


def test_readiness_probe_tcp_becomes_freeze_proxys_ready_check() -> None:
    """Knative's default probe (a TCP connect to the app) would say ready before freeze-proxy
    listens: queue-proxy then dials a closed 9999 and answers 502 (a cold start on a real
    node). freeze-proxy's /ready checks both."""
    assert json.loads(TCP_PROBE) == {
        "tcpSocket": {"port": 8080, "host": "127.0.0.1"},
        "successThreshold": 1,
    }
    out = mutated(knative_pod())
    assert qp_probe(out) == {"httpGet": READY, "successThreshold": 1}


TIMING = {
    "initialDelaySeconds": 2,
    "timeoutSeconds": 3,
    "periodSeconds": 5,
    "successThreshold": 2,
    "failureThreshold": 4,
    "terminationGracePeriodSeconds": 7,
}


def test_readiness_probe_tcp_keeps_its_timing() -> None:
    probe = json.dumps({"tcpSocket": {"port": "8080", "host": "127.0.0.1"}, **TIMING})
    new = rewrite_readiness_env(probe, 9998)
    assert new is not None
    ready = {**READY, "httpHeaders": [timeout_header(3)]}
    assert json.loads(new) == {"httpGet": ready, **TIMING}
    # The health port is the one the sidecar serves its probe paths on.
    custom = MutationSettings(proxy_image="img", proxy_port=7999, health_port=7998)
    out = apply_patch(knative_pod(), mutate(knative_pod(), custom).patch)
    assert qp_probe(out)["httpGet"] == {**READY, "port": 7998}
    assert "--health-listen" in container(out, "freeze-proxy")["args"]
    assert "0.0.0.0:7998" in container(out, "freeze-proxy")["args"]


def test_readiness_probe_list_form_only_the_user_containers_is_rewritten() -> None:
    """Multi-container probing: the list's first entry is the user container's (whatever its
    port), the others are other containers' (not frozen)."""
    probes = [
        {"tcpSocket": {"port": 8080, "host": "127.0.0.1"}, "periodSeconds": 1},
        {"httpGet": {"path": "/", "port": 8080}},
        {"tcpSocket": {"port": 9001, "host": "127.0.0.1"}},
    ]
    new = rewrite_readiness_env(json.dumps(probes), 9998)
    assert new is not None
    assert json.loads(new) == [{"httpGet": READY, "periodSeconds": 1}, *probes[1:]]
    custom = [{"httpGet": {"path": "/up", "port": 8081, "host": "127.0.0.1"}}]
    new = rewrite_readiness_env(json.dumps(custom), 9998)
    assert new is not None and json.loads(new)[0]["httpGet"]["path"] == "/ready/http/8081/up"
    assert rewrite_readiness_env("not json", 9998) is None
    assert rewrite_readiness_env("[]", 9998) is None
    assert rewrite_readiness_env(json.dumps([None, {"tcpSocket": {"port": 9001}}]), 9998) is None


@pytest.mark.parametrize("where", ["SERVING_READINESS_PROBE", "livenessProbe", "startupProbe"])
@pytest.mark.parametrize(
    ("probe", "named"),
    [
        ({"grpc": {"port": 8080, "service": None}}, "grpc"),
        ({"httpGet": {"path": "/", "port": 8080, "scheme": "HTTPS"}}, "httpGet with scheme HTTPS"),
    ],
)
def test_probes_freeze_proxy_cannot_answer_skip_the_pod(
    where: str, probe: dict[str, Any], named: str
) -> None:
    """Frozen, a grpc or HTTPS probe of the app would fail (NotReady for good, or restarts):
    the pod runs unfrozen, with a warning naming the probe and the ways out."""
    user, queue = user_container(), queue_proxy()
    if where == "SERVING_READINESS_PROBE":
        queue = queue_proxy(probe=json.dumps(probe))
    else:
        user[where] = probe
    result = mutate(knative_pod([user, queue]), SETTINGS)
    assert result.action == "skipped" and result.patch == []
    (warning,) = result.warnings
    assert f"{named} probe" in warning and "user-container" in warning
    assert "tcpSocket" in warning and ANNOTATION_ENABLED in warning


LIVENESS_CASES = [
    # (the user's probe, what kubelet gets)
    (
        {"httpGet": {"path": "/healthz", "port": "user-port"}},
        {"path": "/probe/http/8080/healthz", "httpHeaders": [timeout_header()]},
    ),
    (
        {"httpGet": {"path": "healthz", "port": 8080, "scheme": "HTTP"}, **TIMING},
        {"path": "/probe/http/8080/healthz", "httpHeaders": [timeout_header(3)]},
    ),
    (
        {
            "httpGet": {
                "port": 8080,
                "httpHeaders": [
                    {"name": "Host", "value": "app.example"},
                    {"name": "freeze-probe-timeout", "value": "99"},
                ],
            },
            "timeoutSeconds": 2,
        },
        {
            "path": "/probe/http/8080/",
            "httpHeaders": [{"name": "Host", "value": "app.example"}, timeout_header(2)],
        },
    ),
    ({"tcpSocket": {"port": 8080}}, {"path": "/probe/tcp/8080", "httpHeaders": [timeout_header()]}),
    (
        {"tcpSocket": {"port": "8080"}, "periodSeconds": 30},
        {"path": "/probe/tcp/8080", "httpHeaders": [timeout_header()]},
    ),
    # Another port of the frozen container: it cannot answer either.
    (
        {"httpGet": {"path": "/admin", "port": 8081}},
        {"path": "/probe/http/8081/admin", "httpHeaders": [timeout_header()]},
    ),
]


@pytest.mark.parametrize("probe_field", ["livenessProbe", "startupProbe", "readinessProbe"])
@pytest.mark.parametrize(("probe", "expected"), LIVENESS_CASES)
def test_kubelets_probes_of_the_user_container_are_answered_by_freeze_proxy(
    probe_field: str, probe: dict[str, Any], expected: dict[str, Any]
) -> None:
    """kubelet's probes go to the pod's IP (no host): re-aimed at freeze-proxy's health port
    (no host either), everything but the handler kept."""
    user = user_container()
    user[probe_field] = copy.deepcopy(probe)
    out = mutated(knative_pod([user, queue_proxy()]))
    validate(out)
    new = container(out, "user-container")[probe_field]
    rest = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket")}
    assert new == {"httpGet": {**expected, "port": 9998, "scheme": "HTTP"}, **rest}
    assert new["httpGet"]["path"].startswith("/probe/")  # not /ready: no restart for the proxy


@pytest.mark.parametrize(
    "probe",
    [
        {"tcpSocket": {"port": 8080, "host": "10.1.2.3"}},  # aims elsewhere
        {"httpGet": {"path": "/", "port": "no-such-port"}},  # fails with or without us
        {"httpGet": {"path": "/", "port": 9998}},  # the proxy's own port
        {"tcpSocket": {"port": 9999}},
    ],
)
def test_kubelet_probes_that_do_not_aim_at_the_app_are_left_alone(probe: dict[str, Any]) -> None:
    user = user_container()
    user["livenessProbe"] = copy.deepcopy(probe)
    result = mutate(knative_pod([user, queue_proxy()]), SETTINGS)
    assert result.action == "mutated"
    assert (
        container(apply_patch(knative_pod([user, queue_proxy()]), result.patch), "user-container")[
            "livenessProbe"
        ]
        == probe
    )


def test_a_knative_pod_with_liveness_and_startup_probes() -> None:
    """As the revision reconciler writes them (rewriteUserLivenessProbe: the port becomes the
    user port), beside Knative's default readiness: nothing is left on the app's port."""
    user = user_container()
    user["livenessProbe"] = {
        "tcpSocket": {"port": 8080},
        "periodSeconds": 10,
        "timeoutSeconds": 1,
        "failureThreshold": 3,
    }
    user["startupProbe"] = {
        "httpGet": {"path": "/started", "port": 8080, "scheme": "HTTP"},
        "periodSeconds": 1,
        "failureThreshold": 30,
    }
    pod = knative_pod([user, queue_proxy()])
    out = mutated(pod)
    validate(out)
    new = container(out, "user-container")
    probes = [new["livenessProbe"], new["startupProbe"], qp_probe(out)]
    assert all(set(p) - set(TIMING) == {"httpGet"} for p in probes), probes
    assert all(p["httpGet"]["port"] == 9998 for p in probes)
    assert [p["httpGet"]["path"] for p in probes] == [
        "/probe/tcp/8080",
        "/probe/http/8080/started",
        "/ready/tcp/8080",
    ]
    assert "8080" not in json.dumps([new["livenessProbe"]["httpGet"]["port"]])


def test_h2c_revision_is_not_mutated_with_a_warning() -> None:
    """Knative marks an h2c revision only by queue-proxy serving on 8013 (QUEUE_SERVING_PORT);
    the app's port is named user-port like any other. Mutated, the proxy would answer
    queue-proxy's HTTP/2 preface with 505."""
    pod = knative_pod([user_container(), queue_proxy(h2c=True)])
    result = mutate(pod, SETTINGS)
    assert result.action == "skipped" and result.patch == []
    (warning,) = result.warnings
    assert "h2c" in warning and "not relayed" in warning
    assert ANNOTATION_ENABLED in warning  # the way to silence it


def test_h2c_seen_from_queue_port_when_the_env_is_missing() -> None:
    queue = queue_proxy(h2c=True)
    queue["env"] = [e for e in queue["env"] if e["name"] != "QUEUE_SERVING_PORT"]
    assert mutate(knative_pod([user_container(), queue]), SETTINGS).action == "skipped"
    queue = queue_proxy()
    queue["env"] = [e for e in queue["env"] if e["name"] != "QUEUE_SERVING_PORT"]
    assert mutate(knative_pod([user_container(), queue]), SETTINGS).action == "mutated"


def test_h2c_multi_container_revision_is_not_mutated() -> None:
    pod = knative_pod([*multi_container(), queue_proxy(h2c=True)])
    assert mutate(pod, SETTINGS).action == "skipped"


def test_http1_multi_container_revision_freezes_the_serving_container_and_sidecar() -> None:
    pod = knative_pod([*multi_container(), queue_proxy()])
    result = mutate(pod, SETTINGS)
    assert result.user_container == "user-container-0"
    assert result.frozen == ["user-container-0", "user-container-1"]  # its sidecar too
    out = apply_patch(pod, result.patch)
    validate(out)
    assert (
        container(out, "freeze-proxy")["lifecycle"]["preStop"]
        == (container(pod, "user-container-1")["lifecycle"]["preStop"])
    )


EXEC_PROBE = {"exec": {"command": ["/bin/healthcheck"]}, "periodSeconds": 10}


@pytest.mark.parametrize("probe_field", ["livenessProbe", "readinessProbe", "startupProbe"])
def test_exec_probe_on_the_frozen_container_is_not_mutated(probe_field: str) -> None:
    """kubelet would exec into the frozen container: readiness turns the pod NotReady (no
    request ever wakes it again), liveness and startup restart a healthy app."""
    user = user_container()
    user[probe_field] = copy.deepcopy(EXEC_PROBE)
    pod = knative_pod([user, queue_proxy()])
    validate(pod)
    result = mutate(pod, SETTINGS)
    assert result.action == "skipped" and result.patch == []
    (warning,) = result.warnings
    assert f"exec {probe_field}" in warning and "user-container" in warning
    assert "httpGet" in warning and ANNOTATION_ENABLED in warning  # the ways out
    assert probe_field in result.reason


def test_exec_probe_on_a_sidecar_keeps_that_sidecar_awake() -> None:
    """A sidecar kubelet exec-probes is left out of the list (with a warning), so its probe
    keeps working; the serving container is still frozen."""
    serving, other = multi_container()
    other["livenessProbe"] = copy.deepcopy(EXEC_PROBE)
    result = mutate(knative_pod([serving, other, queue_proxy()]), SETTINGS)
    assert result.action == "mutated" and result.user_container == "user-container-0"
    assert result.frozen == ["user-container-0"]
    (warning,) = result.warnings
    assert "user-container-1" in warning and "exec livenessProbe" in warning


def guaranteed(c: dict[str, Any], cpu: str = "500m", memory: str = "256Mi") -> dict[str, Any]:
    c["resources"] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu, "memory": memory},
    }
    return c


def qos_class(pod: dict[str, Any]) -> str:
    """Kubernetes' QoS classification (pkg/apis/core/helper/qos), cpu and memory only."""
    containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
    requested = limited = 0
    guaranteed_all = True
    for c in containers:
        requests = c.get("resources", {}).get("requests", {})
        limits = c.get("resources", {}).get("limits", {})
        requested += len(requests)
        limited += len(limits)
        for r in ("cpu", "memory"):
            if r not in limits or (r in requests and requests[r] != limits[r]):
                guaranteed_all = False
    if guaranteed_all:
        return "Guaranteed"
    return "Burstable" if requested or limited else "BestEffort"


def test_sidecar_has_a_cpu_limit_so_limits_cpu_quotas_accept_the_pod() -> None:
    """A namespace with a limits.cpu ResourceQuota rejects any container without a CPU limit."""
    proxy = container(mutated(knative_pod()), "freeze-proxy")
    assert set(proxy["resources"]["limits"]) == {"cpu", "memory"}
    assert set(proxy["resources"]["requests"]) == {"cpu", "memory"}


def test_guaranteed_pod_stays_guaranteed() -> None:
    pod = knative_pod([guaranteed(user_container()), guaranteed(queue_proxy(), "100m", "64Mi")])
    assert qos_class(pod) == "Guaranteed"
    out = mutated(pod)
    validate(out)
    assert qos_class(out) == "Guaranteed"
    resources = container(out, "freeze-proxy")["resources"]
    assert resources["requests"] == resources["limits"]


def test_burstable_pod_gets_small_requests() -> None:
    pod = knative_pod([guaranteed(user_container()), queue_proxy()])  # queue-proxy: 25m, no limit
    resources = container(mutated(pod), "freeze-proxy")["resources"]
    assert resources["requests"] != resources["limits"]


@pytest.mark.parametrize(
    ("annotations", "requests", "limits"),
    [
        (
            {"freeze-proxy.knative.dev/cpu-request": "50m",
             "freeze-proxy.knative.dev/cpu-limit": "2"},
            {"cpu": "50m", "memory": "32Mi"},
            {"cpu": "2", "memory": "128Mi"},
        ),
        (
            {"freeze-proxy.knative.dev/memory-request": "64Mi",
             "freeze-proxy.knative.dev/memory-limit": "1Gi"},
            {"cpu": "10m", "memory": "64Mi"},
            {"cpu": "1", "memory": "1Gi"},
        ),
    ],
)  # fmt: skip
def test_per_service_resources_by_annotation(
    annotations: dict[str, str], requests: dict[str, str], limits: dict[str, str]
) -> None:
    pod = knative_pod(annotations=annotations)
    result = mutate(pod, SETTINGS)
    assert not result.warnings
    resources = container(apply_patch(pod, result.patch), "freeze-proxy")["resources"]
    assert resources == {"requests": requests, "limits": limits}


@pytest.mark.parametrize(
    ("annotations", "refused"),
    [
        ({"freeze-proxy.knative.dev/cpu-limit": "lots"}, "cpu-limit"),
        ({"freeze-proxy.knative.dev/memory-limit": "0"}, "memory-limit"),
        ({"freeze-proxy.knative.dev/cpu-request": "-1"}, "cpu-request"),
        ({"freeze-proxy.knative.dev/cpu-request": "3"}, "cpu-request"),  # above the 1 CPU limit
    ],
)
def test_bad_resource_annotation_is_refused_and_the_pod_stays_valid(
    annotations: dict[str, str], refused: str
) -> None:
    pod = knative_pod(annotations=annotations)
    result = mutate(pod, SETTINGS)
    assert result.action == "mutated"
    (warning,) = result.warnings
    assert f"freeze-proxy.knative.dev/{refused}" in warning and "refused" in warning
    out = apply_patch(pod, result.patch)
    validate(out)
    assert (
        container(out, "freeze-proxy")["resources"]
        == container(mutated(knative_pod()), "freeze-proxy")["resources"]
    )


def test_app_on_proxy_port_is_not_mutated() -> None:
    pod = knative_pod([user_container(port=9999), queue_proxy(user_port=9999)])
    result = mutate(pod, SETTINGS)
    assert result.patch == [] and "9999" in result.warnings[0]


def test_queue_proxy_found_by_env_when_renamed() -> None:
    qp = queue_proxy()
    qp["name"] = "qp"
    result = mutate(knative_pod([user_container(), qp]), SETTINGS)
    assert result.action == "mutated" and result.user_container == "user-container"


def test_pointer_escaping() -> None:
    assert escape_pointer("example.com/a~b") == "example.com~1a~0b"
    doc: dict[str, Any] = {"metadata": {"labels": {}}}
    key = "freeze-proxy.knative.dev/x~y"
    patched = apply_patch(
        doc, [{"op": "add", "path": f"/metadata/labels/{escape_pointer(key)}", "value": "1"}]
    )
    assert patched["metadata"]["labels"] == {key: "1"}


def test_malformed_pod_raises_for_the_admission_layer() -> None:
    with pytest.raises((TypeError, AttributeError, KeyError)):
        mutate({"metadata": {}, "spec": {"containers": "oops"}}, SETTINGS)


# --- property: any plausible Knative pod -> valid, idempotent ------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535).filter(lambda p: p not in (9998, 9999, 8012))


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    user_port = draw(ports)
    user_name = draw(names.filter(lambda n: n not in ("queue-proxy", "freeze-proxy")))
    user = user_container(user_name, user_port)
    if draw(st.booleans()):
        user["livenessProbe"] = {
            "httpGet": {"path": "/", "port": draw(st.sampled_from([user_port, "user-port"]))}
        }
    probe = draw(
        st.sampled_from(
            [
                None,
                tcp_probe(user_port),
                json.dumps({"httpGet": {"port": user_port, "host": "127.0.0.1"}}),
                json.dumps([{"httpGet": {"port": user_port}}, {"tcpSocket": {"port": 1234}}]),
            ]
        )
    )
    sidecars = [
        user_container(n, None)
        for n in draw(st.lists(names, max_size=2, unique=True))
        if n not in (user_name, "queue-proxy", "freeze-proxy")
    ]
    containers = [user, *sidecars, queue_proxy(user_port, probe)]
    order = draw(st.permutations(containers))
    volume_names = draw(
        st.lists(
            st.sampled_from(["freeze-projected", "projected", "freeze-projected-2", "data"]),
            unique=True,
            max_size=4,
        )
    )
    volumes = [{"name": n, "emptyDir": {}} for n in volume_names] if volume_names else None
    annotations = {}
    if draw(st.booleans()):
        annotations[ANNOTATION_GRACE] = draw(st.sampled_from(["2s", "100ms", "bogus", "0"]))
    pod = knative_pod(list(order), annotations=annotations, volumes=volumes)
    if draw(st.booleans()):
        del pod["metadata"]["labels"]
    return pod


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pods())
def test_property_patch_yields_valid_idempotent_pod(pod: dict[str, Any]) -> None:
    validate(pod)
    result = mutate(pod, SETTINGS)
    assert result.action == "mutated", result.reason
    out = apply_patch(pod, result.patch)
    validate(out)
    names_seen = [c["name"] for c in out["spec"]["containers"]]
    assert len(names_seen) == len(set(names_seen))
    volumes_seen = [v["name"] for v in out["spec"]["volumes"]]
    assert len(volumes_seen) == len(set(volumes_seen))
    assert env(container(out, "queue-proxy"))["USER_PORT"] == "9999"
    assert mutate(out, SETTINGS).patch == []


@pytest.mark.parametrize("metadata", ["missing", None])
def test_a_pod_without_metadata_gets_a_patch_that_applies(metadata: str | None) -> None:
    """Found by tests/test_fuzz_webhook.py: the labels were added under a /metadata that was
    not there, a JSON patch the API server cannot apply."""
    pod = knative_pod()
    if metadata == "missing":
        del pod["metadata"]
    else:
        pod["metadata"] = None
    result = mutate(pod, SETTINGS)
    assert result.patch
    after = apply_patch(pod, result.patch)
    assert after["metadata"]["labels"][LABEL_ADDED] == "true"
