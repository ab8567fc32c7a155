"""config/ validates offline (kubernetes-validate, strict, 1.33) and agrees with the programs.

Cross-references are checked against the programs' own defaults (imported, not re-typed), so a
renamed flag default or port shows up here rather than in a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from freeze_proxy import contract
from freeze_proxy.addresses import parse_listen
from freeze_proxy.durations import parse_duration
from webhook.app import WebhookSettings, create_app
from webhook.mutation import ANNOTATION_GRACE, MutationSettings
from webhook.sidecar import KEYS as SIDECAR_KEYS
from webhook.sidecar import SidecarConfig, apply_overrides

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
K8S_VERSION = "1.33"
DEFAULTS = WebhookSettings(proxy_image="x")
PART_OF = {"app.kubernetes.io/part-of": "freeze-proxy"}
CRD_KINDS = {("serving.knative.dev/v1", "Service")}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def install_files() -> list[Path]:
    """What a non-recursive `kubectl apply -f config/` reads: *.yaml|*.yml|*.json at the top."""
    return sorted(
        p for p in CONFIG.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json")
    )


def install_objects() -> list[dict[str, Any]]:
    return [d for p in install_files() for d in docs(p)]


def all_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(CONFIG.rglob("*.yaml")):
        if path.parent.name == "kustomize":
            continue  # kustomize transformer configuration, not API objects
        for doc in docs(path):
            yield path, doc


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        o
        for o in install_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"want one {kind} {name}, got {len(matches)}"
    return matches[0]


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((CONFIG / "Kustomization").read_text())
    assert isinstance(data, dict)
    return data


def proxy_defaults() -> tuple[str, str]:
    """(daemon_url, listen) defaults of freeze-proxy, without keeping its logging setup."""
    from freeze_proxy.__main__ import parse_args

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        settings = parse_args([], env={"HOST_IP": "10.1.2.3"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return settings.daemon_url, settings.listen


OBJECTS = list(all_objects())


@pytest.mark.parametrize(
    "obj",
    [o for _, o in OBJECTS if (o["apiVersion"], o["kind"]) not in CRD_KINDS],
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_validates_strict(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_object_is_labelled_and_namespaced() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
    for obj in install_objects():
        meta = obj["metadata"]
        assert PART_OF.items() <= meta.get("labels", {}).items(), meta["name"]
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta.get("namespace") == DEFAULTS.namespace == "knative-serving"


def test_knative_service_example_structurally() -> None:
    (path,) = [p for p, o in OBJECTS if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    assert path.parent == CONFIG / "example", "CRD-backed: kept out of `kubectl apply -f config/`"
    (ksvc,) = docs(path)
    assert ksvc["metadata"]["name"] == "sleeptalker"
    template = ksvc["spec"]["template"]
    grace = template["metadata"]["annotations"][ANNOTATION_GRACE]
    parse_duration(grace)
    (container,) = template["spec"]["containers"]
    assert container["image"] == "ghcr.io/freeze-proxy/sleeptalker:latest"
    assert "ko://" not in container["image"]
    # The template's spec is a PodSpec: validate it as one (Knative fills in the name).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeptalker", "annotations": template["metadata"]["annotations"]},
        "spec": {**template["spec"], "containers": [{"name": "user-container", **container}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_webhook_names_agree_with_its_defaults() -> None:
    secret = find("Secret", DEFAULTS.secret_name)
    assert not secret.get("data") and not secret.get("stringData"), "shipped empty"
    service = find("Service", DEFAULTS.service_name)
    mwc = find("MutatingWebhookConfiguration", DEFAULTS.webhook_config_name)
    deployment = find("Deployment", "freezer-webhook")
    (hook,) = mwc["webhooks"]
    ref = hook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"]) == (DEFAULTS.service_name, DEFAULTS.namespace)
    assert "caBundle" not in hook["clientConfig"], "the webhook owns caBundle"
    routes = {r.resource.canonical for r in create_app(MutationSettings("x")).router.routes()}  # type: ignore[union-attr]
    assert ref["path"] == "/defaulting" and ref["path"] in routes
    (svc_port,) = service["spec"]["ports"]
    assert ref.get("port", 443) == svc_port["port"] == 443
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    listen_port = parse_listen(DEFAULTS.listen)[1]
    assert svc_port["targetPort"] == listen_port == 8443
    assert [p["containerPort"] for p in container["ports"]] == [listen_port]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["scheme"], get["path"], get["port"]) == ("HTTPS", path, listen_port)
        assert path in routes
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    env = {e["name"]: e for e in container["env"]}
    assert env["SYSTEM_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["FREEZE_PROXY_IMAGE"]["value"] == "ghcr.io/freeze-proxy/freeze-proxy:latest"
    sc = {
        **deployment["spec"]["template"]["spec"]["securityContext"],
        **container["securityContext"],
    }
    assert (
        sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    )
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "TLS temp files need a writable /tmp"


def test_webhook_stays_available_through_rollouts_and_drains() -> None:
    """With failurePolicy Ignore, every pod created while no webhook answers runs unfrozen for
    good: two replicas on different nodes, a PodDisruptionBudget, and time to drain."""
    deployment = find("Deployment", "freezer-webhook")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = spec["template"]["metadata"]["labels"]
    pdbs = [o for o in install_objects() if o["kind"] == "PodDisruptionBudget"]
    (pdb,) = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert pdb["spec"]["minAvailable"] == 1 < spec["replicas"]  # a node drain may evict one
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # SIGTERM -> drain delay -> in-flight reviews finish -> exit, before kubelet's SIGKILL.
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS.drain_delay + DEFAULTS.shutdown_timeout


def test_sidecar_configmap_is_the_one_the_webhook_reads_and_documents_the_defaults() -> None:
    cm = find("ConfigMap", DEFAULTS.config_map)
    assert cm["metadata"]["namespace"] == DEFAULTS.namespace
    assert set(cm["data"]) == {"_example"}, "ships only documentation: operators add keys"
    lines = [line.strip() for line in cm["data"]["_example"].splitlines()]
    example = yaml.safe_load("\n".join(line for line in lines if not line.startswith("#")))
    assert set(example) == set(SIDECAR_KEYS), "every setting documented"
    config, warnings = apply_overrides(SidecarConfig(), example, "{key}", "")
    assert not warnings
    expected = dataclasses.replace(
        SidecarConfig(),
        grace=contract.DEFAULT_GRACE,
        resume_timeout=contract.DEFAULT_RESUME_TIMEOUT,
        drain_timeout=contract.DEFAULT_DRAIN_TIMEOUT,
        mode=contract.MODE_FREEZE,
        throttle_cpu=contract.DEFAULT_THROTTLE_CPU,
    )
    assert config == expected, "the example shows the built-in defaults"
    role = find("Role", "freezer-webhook")
    assert {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [DEFAULTS.config_map],
        "verbs": ["get"],
    } in role["rules"]


def test_mutating_webhook_configuration_policy() -> None:
    (hook,) = find("MutatingWebhookConfiguration")["webhooks"]
    assert hook["name"] == DEFAULTS.webhook_config_name
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": "serving.knative.dev/configuration", "operator": "Exists"}]
    }
    (rule,) = hook["rules"]
    assert rule["operations"] == ["CREATE"] and rule["resources"] == ["pods"]
    assert rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"]
    assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Ignore"
    assert hook["reinvocationPolicy"] in ("Never", "IfNeeded")
    assert 1 <= hook["timeoutSeconds"] <= 10


def test_rbac_is_least_privilege_and_wired() -> None:
    accounts = {o["metadata"]["name"] for o in install_objects() if o["kind"] == "ServiceAccount"}
    roles = {
        (o["kind"], o["metadata"]["name"]): o
        for o in install_objects()
        if o["kind"] in ("Role", "ClusterRole")
    }
    for binding in (o for o in install_objects() if o["kind"].endswith("Binding")):
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            assert subject["namespace"] == DEFAULTS.namespace
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"]) in roles
    reviewer = find("ClusterRoleBinding", "freeze-tokenreview")
    assert reviewer["roleRef"]["name"] == "freeze-tokenreview"
    assert reviewer["subjects"][0]["name"] == "freeze-tokenreview"
    (review_rule,) = roles[("ClusterRole", "freeze-tokenreview")]["rules"]
    assert review_rule == {
        "apiGroups": ["authentication.k8s.io"],
        "resources": ["tokenreviews"],
        "verbs": ["create"],
    }
    secret_rule, configmap_rule = roles[("Role", "freezer-webhook")]["rules"]
    assert configmap_rule["resourceNames"] == [DEFAULTS.config_map]
    assert configmap_rule["verbs"] == ["get"]
    assert secret_rule["resources"] == ["secrets"]
    assert secret_rule["resourceNames"] == [DEFAULTS.secret_name]
    assert set(secret_rule["verbs"]) == {"get", "update", "patch"}
    (mwc_rule,) = roles[("ClusterRole", "freezer-webhook")]["rules"]
    assert mwc_rule["resources"] == ["mutatingwebhookconfigurations"]
    assert mwc_rule["resourceNames"] == [DEFAULTS.webhook_config_name]
    assert set(mwc_rule["verbs"]) == {"get", "update", "patch"}
    for kind in ("Deployment", "DaemonSet"):
        for obj in (o for o in install_objects() if o["kind"] == kind):
            assert obj["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    assert find("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "freezer-webhook"


# Each runtime's DaemonSet: (runtime, socket env, socket path, the daemon's Settings field).
DAEMONSETS = {
    "freeze-daemon-containerd": (
        "containerd", "CONTAINERD_SOCKET", "/run/containerd/containerd.sock", "containerd_socket"
    ),
    "freeze-daemon-docker": ("docker", "DOCKER_SOCKET", "/var/run/docker.sock", "docker_socket"),
}  # fmt: skip
# The CRI-O DaemonSet runs the cgroup backend on its own socket: its own test below.
ALL_DAEMONSETS = (*DAEMONSETS, "freeze-daemon-crio")


def test_every_daemonset_is_one_of_a_known_runtime() -> None:
    from daemon.__main__ import RUNTIMES

    names = {o["metadata"]["name"] for o in install_objects() if o["kind"] == "DaemonSet"}
    assert names == set(ALL_DAEMONSETS)
    assert {runtime for runtime, *_ in DAEMONSETS.values()} <= set(RUNTIMES)


@pytest.mark.parametrize("name", DAEMONSETS)
def test_daemonset_matches_proxy_and_daemon_defaults(name: str) -> None:
    from daemon.__main__ import parse_args as daemon_args

    runtime, socket_env, socket_path, setting = DAEMONSETS[name]
    ds = find("DaemonSet", name)
    spec = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["serviceAccountName"] == "freeze-tokenreview"
    assert spec["nodeSelector"]["knative.dev/container-runtime"] == runtime
    assert spec["tolerations"], "a node agent tolerates the nodes' taints"
    (container,) = spec["containers"]
    (port,) = container["ports"]
    daemon_url, _ = proxy_defaults()
    assert port["hostPort"] == urlsplit(daemon_url).port == 9696
    daemon = daemon_args([])
    assert port["containerPort"] == daemon.port == 8080
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RUNTIME_TYPE"] == runtime
    assert env.get(socket_env, socket_path) == getattr(daemon, setting) == socket_path
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (sock,) = [n for n, p in mounts.items() if p == socket_path]
    assert volumes[sock]["hostPath"] == {"path": socket_path, "type": "Socket"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["containerPort"]}
    assert {"requests", "limits"} <= container["resources"].keys()


def test_crio_daemonset_runs_the_cgroup_backend_with_least_privilege() -> None:
    from daemon.__main__ import parse_args as daemon_args

    ds = find("DaemonSet", "freeze-daemon-crio")
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"]["knative.dev/container-runtime"] == "crio"
    assert spec["serviceAccountName"] == "freeze-tokenreview" and spec["tolerations"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env == {"RUNTIME_TYPE": "cgroup", "CRI_SOCKET": "/var/run/crio/crio.sock"}
    os_env = {"RUNTIME_TYPE": env["RUNTIME_TYPE"], "CRI_SOCKET": env["CRI_SOCKET"]}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in os_env.items():
            mp.setenv(k, v)
        daemon = daemon_args(container["args"])
    assert (daemon.runtime, daemon.cri_socket) == ("cgroup", "/var/run/crio/crio.sock")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    sock = mounts[daemon.cri_socket]
    assert volumes[sock["name"]]["hostPath"] == {"path": daemon.cri_socket, "type": "Socket"}
    cgroup = mounts[daemon.cgroup_root]
    assert not cgroup.get("readOnly"), "writing freezer files needs a read-write mount"
    assert volumes[cgroup["name"]]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert daemon.cgroup_root != "/sys/fs/cgroup", "not over the container's own cgroupfs"
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] == 0
    (port,) = container["ports"]
    assert port["hostPort"] == 9696 and port["containerPort"] == daemon.port


def test_daemonsets_serve_disjoint_nodes() -> None:
    selectors = [
        o["spec"]["template"]["spec"]["nodeSelector"]["knative.dev/container-runtime"]
        for o in install_objects()
        if o["kind"] == "DaemonSet"
    ]
    assert sorted(selectors) == sorted(set(selectors)) and len(selectors) >= 2


def test_kustomization_lists_every_install_file() -> None:
    assert (
        not (CONFIG / "kustomization.yaml").exists() and not (CONFIG / "kustomization.yml").exists()
    ), "`kubectl apply -f config/` would try to create a Kustomization object"
    k = kustomization()
    assert k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == [p.name for p in install_files()]
    for extra in k.get("configurations", []):
        assert (CONFIG / extra).exists()
    images_named = {i["name"] for i in k["images"]}
    used = {
        c["image"].rpartition(":")[0]
        for o in install_objects()
        if o["kind"] in ("Deployment", "DaemonSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    used.add(DEFAULTS_PROXY_IMAGE.rpartition(":")[0])
    assert used == images_named, "every image is overridable with `images:`"


DEFAULTS_PROXY_IMAGE = "ghcr.io/freeze-proxy/freeze-proxy:latest"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@needs_kubectl
def test_kustomize_build_and_image_override(tmp_path: Path) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(CONFIG)], capture_output=True, text=True, check=True
    )
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, objects)) == sorted(map(key, install_objects()))
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(CONFIG, overlay)],
                "images": [
                    {
                        "name": "ghcr.io/freeze-proxy/freeze-proxy",
                        "newName": "reg.example/fp",
                        "newTag": "v1",
                    },
                    {
                        "name": "ghcr.io/freeze-proxy/freeze-webhook",
                        "newName": "reg.example/wh",
                        "newTag": "v1",
                    },
                ],
            }
        )
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    )
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "reg.example/wh:v1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FREEZE_PROXY_IMAGE"] == "reg.example/fp:v1"


@needs_kubectl
def test_kubectl_apply_f_reads_only_the_manifests(tmp_path: Path) -> None:
    """With no server reachable kubectl names each file it read: no Kustomization, no example."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:1"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}],
                "users": [{"name": "u", "user": {}}],
                "current-context": "x",
            }
        )
    )
    result = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-f",
            "config/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    read = {
        line.split('"')[1]
        for line in result.stderr.splitlines()
        if line.startswith("unable to recognize")
    }
    assert read == {f"config/{p.name}" for p in install_files()}


@pytest.mark.parametrize("name", ALL_DAEMONSETS)
def test_daemonset_is_node_critical(name: str) -> None:
    """A node agent whose absence leaves frozen pods frozen is evicted last (issue #11, 13)."""
    spec = find("DaemonSet", name)["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"


@pytest.mark.parametrize("name", ALL_DAEMONSETS)
def test_daemonset_grace_covers_the_thaw_on_the_way_out(name: str) -> None:
    """SIGTERM -> thaw what it froze -> calls in flight finish -> exit, before kubelet's
    SIGKILL: a daemon killed first leaves its frozen apps frozen until another one starts."""
    from daemon.api import STOP_THAW_BUDGET
    from daemon.server import SHUTDOWN_TIMEOUT

    spec = find("DaemonSet", name)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > STOP_THAW_BUDGET + SHUTDOWN_TIMEOUT + 5


@pytest.mark.parametrize("name", ALL_DAEMONSETS)
def test_daemon_network_policy_admits_only_mutated_pods(name: str) -> None:
    from webhook.mutation import LABEL_ADDED

    ds = find("DaemonSet", name)
    spec = ds["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork"), "a NetworkPolicy does not apply to hostNetwork pods"
    (port,) = spec["containers"][0]["ports"]
    policy = find("NetworkPolicy", "freeze-daemon")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    (peer,) = rule["from"]
    assert peer == {"namespaceSelector": {}, "podSelector": {"matchLabels": {LABEL_ADDED: "true"}}}
