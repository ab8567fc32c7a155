"""A real Debian bookworm root filesystem with python3 + python3-aiohttp, built once and cached.

The example app (``examples/sleeptalker/app.py``) has to run on a real containerd with no
registry, so the test bed needs a root filesystem to package into an image. This module builds one
with ``debootstrap --variant=minbase`` from the same Debian mirror apt uses on this machine, slims
it, and caches it outside the repository::

    $FREEZE_CACHE_DIR (default /var/cache/freeze-proxy)/rootfs/<key>/
        rootfs/        the extracted tree (what ``python_rootfs()`` returns)
        rootfs.tar     the same tree as an uncompressed tar (``./``-relative, numeric owners)
        meta.json      suite, packages, mirror, versions, build time, sizes

``<key>`` is derived from the suite, variant, package list, architecture and ``ROOTFS_VERSION``:
bump the constant whenever the build or slimming steps change.

A build happens in a temporary sibling directory and is renamed into place only after a smoke
check passes, so a crash never leaves a half-built cache entry; an ``flock`` on ``<key>.lock``
makes concurrent callers (threads, processes, pytest-xdist workers) wait for one build. A cold
build needs root and takes a few minutes (mostly downloading ~100 packages); a warm call is a
``stat``.

CLI: ``python -m testbed.rootfs`` builds (if needed) and prints the rootfs directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .mounts import mounts_under, unmount_under

__all__ = [
    "BUILD_BASE_PACKAGES",
    "DEFAULT_CACHE_ROOT",
    "PACKAGES",
    "ROOTFS_VERSION",
    "SUITE",
    "VARIANT",
    "RootfsError",
    "cache_key",
    "debian_mirror",
    "python_rootfs",
    "rootfs_meta",
    "rootfs_tar",
]

#: Bump when the build or slimming steps change: it is part of the cache key.
ROOTFS_VERSION = 1
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = ("python3", "python3-aiohttp")
#: The second variant: a local stand-in for ``python:3.11-slim-bookworm`` as the Dockerfiles' base
#: (``PYTHON_IMAGE``; testbed/docker.py imports it). ``python`` on PATH, ``python -m venv`` with its
#: bundled pip, CA certificates; no aiohttp (the proxy image must not contain it).
BUILD_BASE_PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-venv",
    "python-is-python3",
    "ca-certificates",
)
DEFAULT_CACHE_ROOT = Path("/var/cache/freeze-proxy")
FALLBACK_MIRROR = "http://deb.debian.org/debian"

#: Paths (relative to the rootfs) whose *contents* are removed after the build. Nothing here is
#: needed by python3: docs, man/info pages, gettext translations, apt's package lists and caches.
#: ``/usr/lib/locale/C.utf8`` (the C.UTF-8 locale) is kept.
_SLIM_CONTENTS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/common-licenses",
    "var/lib/apt/lists",
    "var/cache/apt",
    "tmp",
    "var/tmp",
)
#: Individual files removed after the build (host-specific leftovers of debootstrap).
_SLIM_FILES = ("var/cache/ldconfig/aux-cache", "etc/machine-id")


class RootfsError(RuntimeError):
    """The root filesystem could not be built (or this process may not build it)."""


def cache_root() -> Path:
    """``$FREEZE_CACHE_DIR`` if set, else ``/var/cache/freeze-proxy``."""
    env = os.environ.get("FREEZE_CACHE_DIR")
    return Path(env) if env else DEFAULT_CACHE_ROOT


def _arch() -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if out:
        return out
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def cache_key(
    suite: str = SUITE,
    packages: tuple[str, ...] = PACKAGES,
    variant: str = VARIANT,
    arch: str | None = None,
) -> str:
    """The cache entry name: readable prefix + a hash of everything that shapes the tree."""
    arch = arch or _arch()
    blob = json.dumps(
        {
            "suite": suite,
            "variant": variant,
            "packages": sorted(packages),
            "arch": arch,
            "version": ROOTFS_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{suite}-{variant}-{arch}-v{ROOTFS_VERSION}-{digest}"


# --- the Debian mirror apt uses on this machine ----------------------------------------------


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    """``deb [opts] URI suite [components...]`` lines → (URI, [suite])."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop "[signed-by=... arch=...]"
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            yield parts[1], [parts[2]]


def _deb822_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    """deb822 ``.sources`` stanzas → (URI, suites) for each URI of each enabled ``deb`` stanza."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current: str | None = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and current is not None:  # continuation line
                fields[current] += " " + raw.strip()
                continue
            name, sep, value = raw.partition(":")
            if not sep:
                continue
            current = name.strip().lower()
            fields[current] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            yield uri, suites


def debian_mirror(suite: str = SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The mirror URI apt on this machine uses for ``suite`` (not -security/-updates).

    ``$FREEZE_DEBIAN_MIRROR`` overrides. Reads ``sources.list`` and ``sources.list.d/*.list`` /
    ``*.sources`` the way apt does (other file names there are ignored by apt, and here too).
    """
    env = os.environ.get("FREEZE_DEBIAN_MIRROR")
    if env:
        return env
    candidates: list[tuple[str, list[str]]] = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        candidates += _one_line_sources(main_list.read_text(errors="replace"))
    parts_dir = apt_dir / "sources.list.d"
    if parts_dir.is_dir():
        for path in sorted(parts_dir.iterdir()):
            if path.suffix == ".list":
                candidates += _one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                candidates += _deb822_sources(path.read_text(errors="replace"))
    for uri, suites in candidates:
        if suite in suites and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    return FALLBACK_MIRROR


# --- mounts left behind by a crashed debootstrap ---------------------------------------------


def _safe_rmtree(path: Path) -> None:
    """Remove a (possibly half-built) tree; first unmount whatever debootstrap left mounted in
    it (it bind-mounts host /dev nodes inside containers, and mounts /proc and /sys)."""
    if not path.exists() and not path.is_symlink():
        return
    left = unmount_under(path)
    if left:
        raise RootfsError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


# --- building --------------------------------------------------------------------------------


def _du_bytes(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _empty_dir(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _slim(root: Path) -> None:
    for rel in _SLIM_CONTENTS:
        _empty_dir(root / rel)
    for rel in _SLIM_FILES:
        with contextlib.suppress(FileNotFoundError):
            (root / rel).unlink()
    for old in (root / "var/cache/debconf").glob("*-old"):
        old.unlink()
    # Logs: drop the files (debootstrap's dpkg/apt logs), keep the directories.
    for dirpath, _dirnames, filenames in os.walk(root / "var/log"):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
    # Keep the directories apt expects so the tree stays a usable Debian (apt-get update works).
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    # The tree becomes an image: no host name or host resolver baked in.
    for rel in ("etc/hostname", "etc/resolv.conf"):
        p = root / rel
        if p.is_file() and not p.is_symlink():
            p.write_text("")


def _chroot_python(root: Path, code: str, timeout: float = 60) -> str:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.run(
        [chroot, str(root), "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=False,
    )
    if proc.returncode != 0:
        raise RootfsError(
            f"chroot {root} python3 -c {code!r} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout.strip()


def _build(
    target: Path, mirror: str, log_path: Path, lock_fd: int, packages: tuple[str, ...]
) -> None:
    cmd = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        SUITE,
        str(target),
        mirror,
    ]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # debootstrap inherits the lock fd: if this process dies, the lock stays held until
        # debootstrap (and the dpkg it runs) exit too, so no other caller deletes the tree they
        # are still writing into.
        proc = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
            pass_fds=(lock_fd,),
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        inner = target / "debootstrap/debootstrap.log"
        if inner.is_file():
            tail += "\n--- debootstrap.log ---\n" + inner.read_text(errors="replace")[-3000:]
        raise RootfsError(f"debootstrap failed ({proc.returncode}):\n{tail}")
    leftover = mounts_under(target)
    if leftover:
        raise RootfsError(f"debootstrap left mounts in {target}: {leftover}")


def _make_tar(root: Path, tar_path: Path) -> None:
    subprocess.run(
        ["tar", "--sort=name", "--numeric-owner", "-C", str(root), "-cf", str(tar_path), "."],
        check=True,
        capture_output=True,
    )


def _build_entry(
    entry: Path, cache_dir: Path, key: str, lock_fd: int, packages: tuple[str, ...]
) -> None:
    if os.geteuid() != 0:
        raise RootfsError("building the rootfs needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed (apt-get install debootstrap)")
    mirror = debian_mirror()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        tmp.chmod(0o755)
        root = tmp / "rootfs"
        root.mkdir()
        _build(root, mirror, tmp / "build.log", lock_fd, packages)
        debootstrap_seconds = time.monotonic() - started
        size_before = _du_bytes(root)
        _slim(root)
        python_version = _chroot_python(root, "import sys; print(sys.version.split()[0])")
        aiohttp_version = (
            _chroot_python(root, "import aiohttp; print(aiohttp.__version__)")
            if "python3-aiohttp" in packages
            else None
        )
        if "python3-venv" in packages:
            _chroot_python(root, "import ensurepip, venv")
        size_after = _du_bytes(root)
        _make_tar(root, tmp / "rootfs.tar")
        meta: dict[str, Any] = {
            "key": key,
            "rootfs_version": ROOTFS_VERSION,
            "suite": SUITE,
            "variant": VARIANT,
            "packages": list(packages),
            "arch": _arch(),
            "mirror": mirror,
            "python_version": python_version,
            "aiohttp_version": aiohttp_version,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "debootstrap_seconds": round(debootstrap_seconds, 1),
            "build_seconds": round(time.monotonic() - started, 1),
            "size_bytes_unslimmed": size_before,
            "size_bytes": size_after,
            "tar_bytes": (tmp / "rootfs.tar").stat().st_size,
        }
        # meta.json is written last: an entry without it is never treated as complete.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, entry)  # atomic on one filesystem; entry does not exist (we hold the lock)
    except BaseException:
        _safe_rmtree(tmp)
        raise


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[int]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _complete(entry: Path) -> bool:
    return (entry / "meta.json").is_file() and (entry / "rootfs/usr/bin/python3").exists()


def _entry(cache_dir: Path | None, packages: tuple[str, ...]) -> tuple[Path, str]:
    base = cache_dir if cache_dir is not None else cache_root() / "rootfs"
    key = cache_key(packages=packages)
    return base / key, key


def python_rootfs(cache_dir: Path | None = None, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Return the extracted Debian bookworm rootfs (python3 + python3-aiohttp), building it once.

    ``cache_dir`` holds the keyed entries (default ``$FREEZE_CACHE_DIR/rootfs``, i.e.
    ``/var/cache/freeze-proxy/rootfs``). The returned directory is ``<cache_dir>/<key>/rootfs``;
    ``rootfs_tar()`` / ``rootfs_meta()`` give its tar and metadata. Treat it as read-only: it is
    shared by every caller. Raises ``RootfsError`` if it is missing and cannot be built here.
    ``packages`` picks the variant (``PACKAGES``, or ``BUILD_BASE_PACKAGES`` for the images' base);
    each has its own key.
    """
    entry, key = _entry(cache_dir, packages)
    if _complete(entry):
        return entry / "rootfs"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / f"{key}.lock") as lock_fd:
        if _complete(entry):  # another caller built it while we waited
            return entry / "rootfs"
        # We hold the lock, so anything else for this key is debris from a crashed build.
        if entry.exists():
            _safe_rmtree(entry)
        for stale in entry.parent.glob(f".tmp-{key}-*"):
            _safe_rmtree(stale)
        _build_entry(entry, entry.parent, key, lock_fd, packages)
    return entry / "rootfs"


def rootfs_tar(cache_dir: Path | None = None, packages: tuple[str, ...] = PACKAGES) -> Path:
    """The rootfs as an uncompressed tar (building it if needed)."""
    return python_rootfs(cache_dir, packages).parent / "rootfs.tar"


def rootfs_meta(cache_dir: Path | None = None) -> dict[str, Any]:
    """The build metadata (versions, build time, sizes), building the rootfs if needed."""
    meta: dict[str, Any] = json.loads((python_rootfs(cache_dir).parent / "meta.json").read_text())
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.rootfs",
        description="Build (once) the cached Debian bookworm python3 + aiohttp rootfs and print "
        "its directory.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where keyed entries live (default: $FREEZE_CACHE_DIR/rootfs, else "
        "/var/cache/freeze-proxy/rootfs)",
    )
    parser.add_argument("--tar", action="store_true", help="print the rootfs.tar path instead")
    parser.add_argument(
        "--images-base",
        action="store_true",
        help="the images' local base variant (python3, python3-venv, python-is-python3, "
        "ca-certificates) instead of the sleeptalker rootfs",
    )
    parser.add_argument("--info", action="store_true", help="also print meta.json to stderr")
    args = parser.parse_args(argv)
    try:
        packages = BUILD_BASE_PACKAGES if args.images_base else PACKAGES
        root = python_rootfs(args.cache_dir, packages)
    except RootfsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.info:
        print((root.parent / "meta.json").read_text(), file=sys.stderr, end="")
    print(root.parent / "rootfs.tar" if args.tar else root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
