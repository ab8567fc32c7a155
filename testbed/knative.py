"""Knative Serving on the test bed's cluster, offline: ko-like images and the core manifests.

There is no registry and no ``ko`` here, so each component's Go binary (built by
``scripts/build_k8s.sh``) becomes a one-layer image shaped like ko's, imported into the node's
containerd. The manifests are upstream's ``config/core`` of ``knative.dev/serving``, read at
run time from the Go module cache (never copied into this repository) and patched only where a
cluster without a registry, ingress or metrics server needs it.

Apply the CRDs first and wait until each is Established, then the rest in list order (upstream's
file order: the webhook configurations come last, after the objects they would otherwise
intercept). Then wait for :func:`ready_checks`' Deployments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from . import gobins, oci

SERVING_MODULE: Final = "knative.dev/serving"
SERVING_VERSION: Final = gobins.pinned_version("KNATIVE_SERVING_VERSION")
NAMESPACE: Final = "knative-serving"
KNATIVE_COMPONENTS: Final = ("controller", "webhook", "activator", "autoscaler")
QUEUE: Final = "queue"  # the queue-proxy sidecar: an image, but no Deployment of its own
REGISTRY: Final = "freeze.local/knative"
# Registries whose images Knative must not resolve to a digest (there is no registry to ask):
# ours and the test apps' (``freeze.test/...``). Upstream's defaults are kept as well.
LOCAL_REGISTRIES: Final = ("freeze.local", "freeze.test")
_UPSTREAM_SKIP_TAG_RESOLVING: Final = ("kind.local", "ko.local", "dev.local")

HOST_CA_BUNDLE: Final = Path("/etc/ssl/certs/ca-certificates.crt")
KO_APP_DIR: Final = "/ko-app"
KO_DATA_PATH: Final = "/var/run/ko"
_KO_PREFIX: Final = f"ko://{SERVING_MODULE}/cmd/"

# Six files of config/core are symlinks into vendor/ upstream; module zips drop symlinks. Where
# each sits upstream (its place in the apply order) -> the module and file it points to.
_SYMLINKED: Final = {
    "300-imagecache.yaml": ("knative.dev/caching", "config/image.yaml"),
    "300-resources/certificate.yaml": ("knative.dev/networking", "config/certificate.yaml"),
    "300-resources/domain-claim.yaml": ("knative.dev/networking", "config/domain-claim.yaml"),
    "300-resources/ingress.yaml": ("knative.dev/networking", "config/ingress.yaml"),
    "300-resources/serverlessservice.yaml": (
        "knative.dev/networking",
        "config/serverlessservice.yaml",
    ),
    "configmaps/network.yaml": ("knative.dev/networking", "config/config-network.yaml"),
}
# Kinds in config/core this cluster cannot serve: the HPAs scale the webhook and activator on
# CPU, which needs a metrics server we do not run (they would only log FailedGetResourceMetric).
DROPPED_KINDS: Final = frozenset({"HorizontalPodAutoscaler"})

Manifest = dict[str, Any]


class ModuleUnavailable(RuntimeError):
    """A Go module the manifests come from is neither in the module cache nor downloadable."""


def binary_name(component: str) -> str:
    """The gobins name of a component's binary (``queue`` is ``queue-proxy``)."""
    return "queue-proxy" if component == QUEUE else f"knative-{component}"


def image_ref(component: str, registry: str = REGISTRY) -> str:
    return f"{registry}/{component}:{SERVING_VERSION}"


def ko_image(
    binary: Path, component: str, out_dir: Path, registry: str = REGISTRY
) -> tuple[str, Path]:
    """A one-layer image like ko's for one component: ``(ref, tar)``, cached by content.

    ko's base (distroless static) gives a CA bundle and a nonroot user 65532; the manifests
    set ``runAsNonRoot``, which the kubelet checks against a numeric image user.
    """
    if not HOST_CA_BUNDLE.is_file():
        raise FileNotFoundError(
            f"no CA bundle at {HOST_CA_BUNDLE}: apt-get install ca-certificates"
        )
    ref = image_ref(component, registry)
    app = f"{KO_APP_DIR}/{component}"
    files = {
        app: binary,
        str(HOST_CA_BUNDLE): HOST_CA_BUNDLE,
        **oci.nonroot_files(out_dir),
    }
    tar = oci.build_image_tar(
        None,
        ref,
        out_dir / f"knative-{component}.tar",
        [app],
        env={"KO_DATA_PATH": KO_DATA_PATH, "SSL_CERT_FILE": str(HOST_CA_BUNDLE)},
        files=files,
        user=str(oci.NONROOT_UID),
    )
    return ref, tar


def ko_images(
    out_dir: Path, registry: str = REGISTRY, *, build: bool = False
) -> dict[str, tuple[str, Path]]:
    """Images of the four components and the queue-proxy from the gobins binaries.

    ``build=False`` raises :class:`gobins.BuildError` for a binary not built yet.
    """
    components = (*KNATIVE_COMPONENTS, QUEUE)
    paths = gobins.binaries(*(binary_name(c) for c in components), build=build)
    return {c: ko_image(paths[binary_name(c)], c, out_dir, registry) for c in components}


# ---- the Go module cache ------------------------------------------------------------------


def go_path() -> Path:
    """GOPATH of scripts/build_k8s.sh (its module cache is GOPATH/pkg/mod)."""
    return Path(os.environ.get("FREEZE_CACHE_DIR", "/var/cache/freeze-proxy")) / "go"


def _escaped(module: str) -> str:
    """The module cache's case encoding ('!' before a lower-cased capital)."""
    return "".join(f"!{c.lower()}" if c.isupper() else c for c in module)


def download_module(module: str, version: str) -> Path:
    """``go mod download`` one module into build_k8s.sh's cache; returns its extracted dir.

    Extracts from the cached zip when there is one (no network), else asks the module proxy.
    """
    go = shutil.which("go") or "/usr/local/go/bin/go"
    fix = f"check that the Go module proxy is reachable, or run {gobins.BUILD_SCRIPT}"
    if not Path(go).is_file():
        raise ModuleUnavailable(f"cannot fetch {module}@{version}: no 'go' toolchain ({fix})")
    gopath = go_path()
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "GOMODCACHE": str(gopath / "pkg" / "mod"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
    }
    with tempfile.TemporaryDirectory(prefix="freeze-gomod-") as cwd:  # outside any go.mod
        try:
            proc = subprocess.run(
                [go, "mod", "download", "-json", f"{module}@{version}"],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ModuleUnavailable(
                f"go mod download {module}@{version} timed out ({fix})"
            ) from exc
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or info.get("Error") or not info.get("Dir"):
        why = info.get("Error") or proc.stderr.strip() or f"exit {proc.returncode}"
        raise ModuleUnavailable(f"go mod download {module}@{version} failed: {why} ({fix})")
    return Path(info["Dir"])


def module_dir(module: str, version: str, *, download: bool = True) -> Path:
    """The extracted source of ``module@version`` in the module cache, downloading it when
    missing (``download=False`` raises :class:`ModuleUnavailable` instead)."""
    extracted = go_path() / "pkg" / "mod" / f"{_escaped(module)}@{version}"
    if extracted.is_dir():
        return extracted
    if not download:
        raise ModuleUnavailable(f"{module}@{version} is not in the module cache ({extracted})")
    return download_module(module, version)


def required_version(gomod: Path, module: str) -> str:
    """The version of ``module`` a go.mod requires (honouring a versioned replace)."""
    required: str | None = None
    replaced: str | None = None
    in_block = ""
    for raw in gomod.read_text().splitlines():
        line = raw.split("//", 1)[0].strip()
        if line in ("require (", "replace ("):
            in_block = line.split()[0]
            continue
        if line == ")":
            in_block = ""
            continue
        words = line.split()
        if words and words[0] in ("require", "replace") and not in_block:
            kind, words = words[0], words[1:]
        else:
            kind = in_block
        if kind == "require" and len(words) == 2 and words[0] == module:
            required = words[1]
        elif kind == "replace" and "=>" in words and words[0] == module:
            new = words[words.index("=>") + 1 :]
            if len(new) == 2 and new[0] == module:
                replaced = new[1]
    version = replaced or required
    if version is None:
        raise ValueError(f"{gomod} does not require {module}")
    return version


def _serving_gomod(serving_dir: Path) -> Path:
    """serving's go.mod: the cache/download copy (always present when the zip is)."""
    cached = (
        go_path()
        / "pkg/mod/cache/download"
        / _escaped(SERVING_MODULE)
        / "@v"
        / f"{SERVING_VERSION}.mod"
    )
    return cached if cached.is_file() else serving_dir / "go.mod"


def core_files() -> list[tuple[str, Path]]:
    """``(path under config/core, host file)`` of every core YAML, symlinks resolved to their
    modules, in upstream's walk order (which is the order to apply them in)."""
    serving = module_dir(SERVING_MODULE, SERVING_VERSION)
    core = serving / "config" / "core"
    if not core.is_dir():
        raise ModuleUnavailable(f"{core} is missing: is {serving} a knative.dev/serving module?")
    files = {str(p.relative_to(core)): p for p in core.rglob("*.yaml")}
    gomod = _serving_gomod(serving)
    for rel, (module, path) in _SYMLINKED.items():
        if rel in files:
            continue  # a future module zip may ship the real file
        src = module_dir(module, required_version(gomod, module)) / path
        if not src.is_file():
            raise ModuleUnavailable(f"{src} is missing: {module} no longer ships {path}")
        files[rel] = src
    return sorted(files.items(), key=lambda item: item[0].split("/"))


def _walk(obj: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key, value) of every value in a parsed YAML tree."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for key, value in list(items):
        yield obj, key, value
        yield from _walk(value)


def _replace_ko_refs(obj: Manifest, images: Mapping[str, str]) -> None:
    for container, key, value in _walk(obj):
        if isinstance(value, str) and value.startswith(_KO_PREFIX):
            cmd = value.removeprefix(_KO_PREFIX)
            if cmd not in images:
                raise KeyError(f"no image for {value} (images has {', '.join(sorted(images))})")
            container[key] = images[cmd]


def _pod_spec(obj: Manifest) -> dict[str, Any] | None:
    template = obj.get("spec", {}).get("template", {})
    spec = template.get("spec") if isinstance(template, dict) else None
    return spec if isinstance(spec, dict) else None


def _registry_host(ref: str) -> str:
    return ref.split("/", 1)[0]


def serving_manifests(
    images: Mapping[str, str],
    *,
    quick: bool = True,
    local_registries: Iterable[str] = LOCAL_REGISTRIES,
) -> tuple[list[Manifest], list[Manifest]]:
    """``(CRDs, everything else)`` of Knative Serving core, ready to apply in that order.

    ``images`` maps ``controller``, ``webhook``, ``activator``, ``autoscaler`` and ``queue`` to
    image refs (see :func:`ko_images`). ``quick`` shortens the autoscaler's windows to 6 s so
    tests see scale-to-zero in seconds, not minutes.
    """
    missing = [c for c in (*KNATIVE_COMPONENTS, QUEUE) if c not in images]
    if missing:
        raise KeyError(f"images lacks {', '.join(missing)}")
    skip = [*_UPSTREAM_SKIP_TAG_RESOLVING]
    for host in [*local_registries, *(_registry_host(ref) for ref in images.values())]:
        if host not in skip:
            skip.append(host)

    crds: list[Manifest] = []
    rest: list[Manifest] = []
    for _rel, path in core_files():
        for obj in yaml.safe_load_all(path.read_text()):
            if not obj or obj.get("kind") in DROPPED_KINDS:
                continue
            _replace_ko_refs(obj, images)
            spec = _pod_spec(obj)
            if spec is not None:
                for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                    c["imagePullPolicy"] = "IfNotPresent"
            if obj["kind"] == "ConfigMap" and obj["metadata"].get("namespace") == NAMESPACE:
                data = obj.setdefault("data", {})
                name = obj["metadata"]["name"]
                if name == "config-deployment":
                    data["queue-sidecar-image"] = images[QUEUE]
                    data["registries-skipping-tag-resolving"] = ",".join(skip)
                elif name == "config-autoscaler" and quick:
                    data["stable-window"] = "6s"
                    data["scale-to-zero-grace-period"] = "6s"
            (crds if obj["kind"] == "CustomResourceDefinition" else rest).append(obj)
    return crds, rest


def ready_checks() -> list[tuple[str, str]]:
    """``(namespace, Deployment)`` pairs to wait for (Available) before creating a Service.

    The webhook matters most: until it serves, its failurePolicy=Fail configurations reject
    every Knative object and the ConfigMaps of knative-serving.
    """
    return [(NAMESPACE, name) for name in KNATIVE_COMPONENTS]
