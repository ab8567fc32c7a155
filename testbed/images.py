"""Our four images, built for real by ``scripts/build_images.sh`` (what ``make images`` runs).

On a private dockerd (:mod:`testbed.docker`), from the local Debian bookworm base
(``PYTHON_IMAGE``) and a local wheelhouse (``WHEELHOUSE``: the build itself runs with
``--network none``). Shared by the image tests, the real-node tests and the cluster demo, so all
three run exactly what a user builds.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import rootfs
from .docker import Dockerd, DockerError

ROOT: Final = Path(__file__).resolve().parent.parent
SCRIPT: Final = ROOT / "scripts/build_images.sh"
#: Our name for each image -> its repository name (what config/ and the example reference).
IMAGES: Final = {
    "proxy": "freeze-proxy",
    "daemon": "freeze-daemon",
    "webhook": "freeze-webhook",
    "sleeptalker": "sleeptalker",
}
UPSTREAM_REGISTRY: Final = "ghcr.io/freeze-proxy"


@dataclass(frozen=True)
class Built:
    engine: Dockerd
    refs: dict[str, str]
    seconds: float

    def save(self, names: list[str], tar: Path) -> Path:
        """``docker save`` of these images into one tar a node's containerd imports."""
        self.engine.run("save", "-o", str(tar), *(self.refs[n] for n in names), timeout=600)
        return tar


def wheelhouse_dir() -> Path:
    """Keyed by what decides its contents: pyproject's requirements, the demo app's."""
    digest = hashlib.sha256()
    for path in ("pyproject.toml", "examples/sleeptalker/Dockerfile"):
        digest.update((ROOT / path).read_bytes())
    return rootfs.cache_root() / "wheelhouse" / f"cp311-{digest.hexdigest()[:16]}"


def build(engine: Dockerd, registry: str, tag: str, timeout: float = 1800) -> Built:
    """Build all four as ``<registry>/<repository>:<tag>``; raise DockerError with the output."""
    started = time.monotonic()
    env = engine.env() | {
        "DOCKER": engine.cli,
        "REGISTRY": registry,
        "TAG": tag,
        "PYTHON_IMAGE": engine.base_image(),
        "WHEELHOUSE": str(wheelhouse_dir()),
    }
    proc = subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise DockerError(
            f"scripts/build_images.sh exited with {proc.returncode}:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    refs = {name: f"{registry}/{repo}:{tag}" for name, repo in IMAGES.items()}
    return Built(engine, refs, time.monotonic() - started)
