"""The cluster add-ons' manifests and images, offline: Knative Serving core (read from the Go
module cache) and CoreDNS (ours). No root, no cluster: the lead's cluster tests apply them."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from testbed import coredns, gobins, knative, oci
from testbed.containerd import Containerd
from tests.conftest import _unavailable

K8S_VERSION = "1.33"  # the newest schema kubernetes-validate ships; the cluster runs 1.37
IMAGES = {c: knative.image_ref(c) for c in (*knative.KNATIVE_COMPONENTS, knative.QUEUE)}
SERVING_CRDS = {
    "configurations.serving.knative.dev",
    "domainmappings.serving.knative.dev",
    "revisions.serving.knative.dev",
    "routes.serving.knative.dev",
    "services.serving.knative.dev",
    "metrics.autoscaling.internal.knative.dev",
    "podautoscalers.autoscaling.internal.knative.dev",
    "images.caching.internal.knative.dev",
    "certificates.networking.internal.knative.dev",
    "clusterdomainclaims.networking.internal.knative.dev",
    "ingresses.networking.internal.knative.dev",
    "serverlessservices.networking.internal.knative.dev",
}


@pytest.fixture(scope="module")
def serving() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cache = knative.go_path() / "pkg/mod/cache/download/knative.dev/serving/@v"
    zipped = cache / f"{knative.SERVING_VERSION}.zip"
    try:
        knative.module_dir(knative.SERVING_MODULE, knative.SERVING_VERSION, download=False)
    except knative.ModuleUnavailable:
        if not zipped.is_file():
            _unavailable(
                f"the Go module cache has no knative.dev/serving@{knative.SERVING_VERSION} "
                f"(run scripts/build_k8s.sh queue-proxy)"
            )
    try:
        return knative.serving_manifests(IMAGES)
    except knative.ModuleUnavailable as exc:
        _unavailable(str(exc))


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)
    elif isinstance(obj, str):
        yield obj


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_version_is_the_build_scripts() -> None:
    script = gobins.BUILD_SCRIPT.read_text()
    assert re.search(rf"^KNATIVE_SERVING_VERSION={knative.SERVING_VERSION}\s", script, re.M)
    assert re.search(rf"^COREDNS_VERSION={coredns.COREDNS_VERSION}\s", script, re.M)
    for c in knative.KNATIVE_COMPONENTS:
        assert knative.binary_name(c) in gobins.KNOWN
    assert knative.binary_name(knative.QUEUE) == "queue-proxy" and "coredns" in gobins.KNOWN


def test_required_version_reads_require_and_replace(tmp_path: Path) -> None:
    gomod = tmp_path / "go.mod"
    gomod.write_text(
        "module example.invalid/x\n\nrequire knative.dev/hack v0.1.0\n"
        "require (\n\tknative.dev/caching v0.0.0-1 // indirect\n\tknative.dev/pkg v0.2.0\n)\n"
        "replace knative.dev/pkg => knative.dev/pkg v0.3.0\n"
    )
    assert knative.required_version(gomod, "knative.dev/hack") == "v0.1.0"
    assert knative.required_version(gomod, "knative.dev/caching") == "v0.0.0-1"
    assert knative.required_version(gomod, "knative.dev/pkg") == "v0.3.0"
    with pytest.raises(ValueError, match="does not require"):
        knative.required_version(gomod, "knative.dev/networking")


def test_serving_crds_are_the_full_set(serving: tuple[list[Any], list[Any]]) -> None:
    crds, rest = serving
    assert {c["metadata"]["name"] for c in crds} == SERVING_CRDS
    assert all(c["kind"] == "CustomResourceDefinition" for c in crds)
    assert not [o for o in rest if o["kind"] == "CustomResourceDefinition"]


def test_no_ko_reference_is_left(serving: tuple[list[Any], list[Any]]) -> None:
    crds, rest = serving
    assert not [s for s in strings([crds, rest]) if s.startswith("ko://")]
    deployments = by_kind(rest, "Deployment")
    assert set(deployments) == set(knative.KNATIVE_COMPONENTS)
    for name, dep in deployments.items():
        (container,) = containers(dep)
        assert container["image"] == IMAGES[name]
        assert container["imagePullPolicy"] == "IfNotPresent"
    assert by_kind(rest, "Image")["queue-proxy"]["spec"]["image"] == IMAGES["queue"]


def test_config_maps_are_set_for_an_offline_cluster(
    serving: tuple[list[Any], list[Any]],
) -> None:
    _, rest = serving
    cms = by_kind(rest, "ConfigMap")
    deployment = cms["config-deployment"]["data"]
    assert deployment["queue-sidecar-image"] == IMAGES["queue"]
    skipped = deployment["registries-skipping-tag-resolving"].split(",")
    assert {"kind.local", "ko.local", "dev.local", "freeze.local", "freeze.test"} <= set(skipped)
    autoscaler = cms["config-autoscaler"]["data"]
    assert autoscaler["stable-window"] == "6s"
    assert autoscaler["scale-to-zero-grace-period"] == "6s"
    assert "config-network" in cms  # a symlink upstream, from knative.dev/networking


def test_slow_mode_keeps_upstream_autoscaler_defaults() -> None:
    try:
        _, rest = knative.serving_manifests(IMAGES, quick=False)
    except knative.ModuleUnavailable as exc:
        _unavailable(str(exc))
    data = by_kind(rest, "ConfigMap")["config-autoscaler"]["data"]
    assert "stable-window" not in data and "scale-to-zero-grace-period" not in data


def test_order_and_dropped_kinds(serving: tuple[list[Any], list[Any]]) -> None:
    _, rest = serving
    kinds = [o["kind"] for o in rest]
    assert kinds[0] == "Namespace" and "HorizontalPodAutoscaler" not in kinds
    # The webhook configurations come after everything they would intercept.
    first_webhook = min(i for i, k in enumerate(kinds) if k.endswith("WebhookConfiguration"))
    assert all(
        k in ("Secret",) or k.endswith("WebhookConfiguration") for k in kinds[first_webhook:]
    )
    assert knative.ready_checks() == [
        ("knative-serving", n) for n in ("controller", "webhook", "activator", "autoscaler")
    ]


def test_builtin_objects_validate(serving: tuple[list[Any], list[Any]]) -> None:
    _, rest = serving
    for obj in rest:
        if "knative.dev" not in obj["apiVersion"]:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_missing_image_is_named() -> None:
    with pytest.raises(KeyError, match="queue"):
        knative.serving_manifests({c: "x/y:1" for c in knative.KNATIVE_COMPONENTS})


def test_coredns_manifests() -> None:
    objs = coredns.coredns_manifests(coredns.IMAGE)
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert [o["kind"] for o in objs] == [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    ]
    svc = by_kind(objs, "Service")["kube-dns"]
    assert svc["metadata"]["namespace"] == "kube-system"
    assert svc["spec"]["clusterIP"] == "10.0.0.10"
    assert {(p["protocol"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("UDP", 53, 1053),
        ("TCP", 53, 1053),
    }
    dep = by_kind(objs, "Deployment")["coredns"]
    (container,) = containers(dep)
    assert container["securityContext"]["runAsUser"] == 65532
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8181}
    assert dep["spec"]["template"]["metadata"]["labels"] == svc["spec"]["selector"]
    corefile = by_kind(objs, "ConfigMap")["coredns"]["data"]["Corefile"]
    assert corefile.startswith(".:1053 {") and "kubernetes cluster.local " in corefile
    assert "forward" not in corefile
    # Only plugins scripts/coredns_main.go compiles in.
    built = set(
        re.findall(r"plugin/(\w+)\"", (gobins.REPO_ROOT / "scripts/coredns_main.go").read_text())
    )
    used = {line.split()[0] for line in corefile.splitlines()[1:] if line.strip() not in ("}", "")}
    assert used - {"pods", "fallthrough"} <= built
    rules = by_kind(objs, "ClusterRole")["freeze-testbed:coredns"]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("discovery.k8s.io", "endpointslices") in granted and ("", "services") in granted
    other = coredns.coredns_manifests("x/y:1", cluster_ip="10.96.0.10", domain="k8s.test")
    assert by_kind(other, "Service")["kube-dns"]["spec"]["clusterIP"] == "10.96.0.10"
    assert "kubernetes k8s.test " in by_kind(other, "ConfigMap")["coredns"]["data"]["Corefile"]


def image_config(tar: Path) -> tuple[dict[str, Any], set[str]]:
    """The image config and the layer's member names of a single-image OCI tar."""
    with tarfile.open(tar) as t:
        index = json.load(t.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(t.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
        config_blob = manifest["config"]["digest"].split(":")[1]
        config = json.load(t.extractfile(f"blobs/sha256/{config_blob}"))  # type: ignore[arg-type]
        layer_blob = manifest["layers"][0]["digest"].split(":")[1]
        with tarfile.open(fileobj=t.extractfile(f"blobs/sha256/{layer_blob}")) as layer:
            names = set(layer.getnames())
    return config, names


def fake_binary(tmp_path: Path) -> Path:
    path = tmp_path / "app"
    path.write_bytes(b"#!/bin/true\n")
    path.chmod(0o755)
    return path


def test_ko_image_shape(tmp_path: Path) -> None:
    if not knative.HOST_CA_BUNDLE.is_file():
        pytest.skip(f"no host CA bundle at {knative.HOST_CA_BUNDLE}")
    app = fake_binary(tmp_path)
    ref, tar = knative.ko_image(app, "controller", tmp_path / "images")
    assert ref == f"freeze.local/knative/controller:{knative.SERVING_VERSION}"
    config, names = image_config(tar)
    assert config["config"]["User"] == "65532"
    assert config["config"]["Cmd"] == ["/ko-app/controller"]
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env["KO_DATA_PATH"] == "/var/run/ko"
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert {"ko-app/controller", "etc/ssl/certs/ca-certificates.crt", "etc/passwd"} <= names
    assert "nonroot:x:65532:65532:" in (tmp_path / "images" / "nonroot.passwd").read_text()
    # Cached: a second build of the same inputs does not rewrite the tar.
    mtime = tar.stat().st_mtime_ns
    assert knative.ko_image(app, "controller", tmp_path / "images")[1] == tar
    assert tar.stat().st_mtime_ns == mtime


def test_coredns_image_shape(tmp_path: Path) -> None:
    ref, tar = coredns.coredns_image(fake_binary(tmp_path), tmp_path)
    assert ref == coredns.IMAGE
    config, names = image_config(tar)
    assert config["config"]["User"] == "65532"
    assert config["config"]["Cmd"] == ["/coredns", "-conf", "/etc/coredns/Corefile"]
    assert {"coredns", "etc/passwd", "etc/group"} <= names


def test_user_and_workdir_change_the_cache_key(tmp_path: Path) -> None:
    out = tmp_path / "i.tar"
    app = fake_binary(tmp_path)
    oci.build_image_tar(None, "x.test/a:1", out, ["/app"], files={"/app": app})
    config, _ = image_config(out)
    assert "User" not in config["config"] and "WorkingDir" not in config["config"]
    oci.build_image_tar(None, "x.test/a:1", out, ["/app"], files={"/app": app}, user="1:2")
    assert image_config(out)[0]["config"]["User"] == "1:2"
    oci.build_image_tar(
        None, "x.test/a:1", out, ["/app"], files={"/app": app}, user="1:2", workdir="/w"
    )
    assert image_config(out)[0]["config"]["WorkingDir"] == "/w"
    with pytest.raises(ValueError, match="absolute"):
        oci.build_image_tar(None, "x.test/a:1", out, ["/app"], workdir="w")


@pytest.mark.containerd
def test_images_import_into_containerd(containerd: Containerd, tmp_path: Path) -> None:
    """Our image layout with a User imports; the real binaries are used when built."""

    def real_or_fake(name: str) -> Path:
        try:
            return gobins.binary(name, build=False)
        except gobins.BuildError:
            return fake_binary(tmp_path)

    out = tmp_path / "images"
    refs = [
        coredns.coredns_image(real_or_fake("coredns"), out),
        knative.ko_image(real_or_fake("queue-proxy"), knative.QUEUE, out),
    ]
    for _ref, tar in refs:
        oci.import_image(containerd.socket, tar, containerd.namespace)
    listed = subprocess.run(
        ["ctr", "-a", str(containerd.socket), "-n", containerd.namespace, "images", "ls", "-q"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()  # fmt: skip
    assert {ref for ref, _ in refs} <= set(listed)
