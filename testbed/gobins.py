"""Paths of the upstream binaries the test bed runs (built from Go modules, never committed).

``scripts/build_k8s.sh`` pins the versions and owns the cache layout
(``$FREEZE_CACHE_DIR/bin/<name>-<version>``, default ``/var/cache/freeze-proxy``); this module
only asks it. ``binary(name)`` returns the path, running the build script first when the binary
is missing (a cold Kubernetes build takes many minutes on two cores; a warm call costs a few
milliseconds and never starts ``go``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
BUILD_SCRIPT: Final = REPO_ROOT / "scripts" / "build_k8s.sh"
KNOWN: Final = (
    "kube-apiserver",
    "kubectl",
    "etcd",
    "queue-proxy",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "coredns",
    "knative-controller",
    "knative-webhook",
    "knative-activator",
    "knative-autoscaler",
    "containerd2",
    "containerd2-shim-runc-v2",
    "ctr2",
)


class BuildError(RuntimeError):
    """The build script could not produce a binary (no Go, no module proxy, compile error)."""


def pinned_version(variable: str) -> str:
    """A version the build script pins (e.g. ``KNATIVE_SERVING_VERSION``), read from its one
    home so manifests and image tags cannot drift from the binaries."""
    match = re.search(rf"^{re.escape(variable)}=(\S+)", BUILD_SCRIPT.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{BUILD_SCRIPT} pins no {variable}")
    return match.group(1)


def _run_script(args: list[str], timeout: float | None) -> str:
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{BUILD_SCRIPT} {' '.join(args)} timed out after {timeout}s") from exc
    except OSError as exc:
        raise BuildError(f"cannot run {BUILD_SCRIPT}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise BuildError(
            f"{BUILD_SCRIPT} {' '.join(args)} exited {proc.returncode}; last output:\n{tail}"
        )
    return proc.stdout


def _parse_paths(output: str) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and name in KNOWN:
            paths[name] = Path(value.strip())
    return paths


def binary_path(name: str) -> Path:
    """Where ``name`` lives (or will live) in the cache; builds nothing."""
    if name not in KNOWN:
        raise ValueError(f"unknown binary {name!r}; known: {', '.join(KNOWN)}")
    paths = _parse_paths(_run_script(["--paths", name], timeout=30))
    if name not in paths:
        raise BuildError(f"{BUILD_SCRIPT} --paths printed no path for {name}")
    return paths[name]


def _build_timeout() -> float | None:
    raw = os.environ.get("FREEZE_BUILD_TIMEOUT", "")
    return float(raw) if raw else None


def binaries(*names: str, build: bool = True) -> dict[str, Path]:
    """Paths of ``names`` (all known binaries when none given), building missing ones.

    With ``build=False`` a missing binary raises :class:`BuildError` instead of starting a
    build. The build's output is passed through to stderr (pytest shows it on failure).
    """
    wanted = list(names) or list(KNOWN)
    for name in wanted:
        if name not in KNOWN:
            raise ValueError(f"unknown binary {name!r}; known: {', '.join(KNOWN)}")
    paths = _parse_paths(_run_script(["--paths", *wanted], timeout=30))
    missing = [n for n in wanted if not (n in paths and os.access(paths[n], os.X_OK))]
    if missing:
        if not build:
            raise BuildError(f"not built yet: {', '.join(missing)} (run {BUILD_SCRIPT})")
        out = _run_script(missing, timeout=_build_timeout())
        sys.stderr.write(out)
        paths.update(_parse_paths(out))
    for name in wanted:
        if not os.access(paths.get(name, Path("/nonexistent")), os.X_OK):
            raise BuildError(f"{BUILD_SCRIPT} finished but {name} is not at {paths.get(name)}")
    return {n: paths[n] for n in wanted}


def binary(name: str, *, build: bool = True) -> Path:
    """Path of one upstream binary, running the build script when it is missing."""
    return binaries(name, build=build)[name]
