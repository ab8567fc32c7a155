"""Build OCI image layout tars offline and import them into a containerd.

There is no registry on the test machines, so test images are made here from a root filesystem
directory (or a few host files such as a static busybox) and imported with ``ctr images import``.
Tars are deterministic (sorted entries, fixed times for loose files) and cached by a content key,
so a second build with the same inputs costs a directory walk, not a rewrite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

# Applets a test container may call; each becomes a symlink to /bin/busybox.
BUSYBOX_APPLETS = tuple(
    "sh sleep usleep echo date cat ls true false env ps kill seq wc head tail printf test [ "
    "mkdir rm touch nc wget grep sed dd yes id hostname".split()
)
BUSYBOX_IMAGE_NAME = "freeze.test/busybox:1"
# The sandbox ("pause") image must run forever by default.
BUSYBOX_DEFAULT_CMD = ("/bin/sleep", "2147483647")
_SKELETON_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "var/log")

# Bumped whenever the tar layout written below changes, so stale caches are not reused.
_FORMAT_VERSION = "1"


def _oci_arch() -> str:
    """The OCI architecture name of this machine (containerd filters imports by platform)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _norm(path: str) -> str:
    """An image path as a tar member name: relative, no leading './' or '/'."""
    name = os.path.normpath("/" + path).lstrip("/")
    if not name or name == ".":
        raise ValueError(f"image path {path!r} names the root")
    return name


def _loose_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    """A TarInfo for a file we place ourselves: root-owned, time 0 (determinism)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _rootfs_key(rootfs: Path) -> Iterable[str]:
    """Cheap fingerprint of a tree: names, types, sizes, modes and mtimes (no contents)."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            full = os.path.join(dirpath, entry)
            st = os.lstat(full)
            yield f"{os.path.relpath(full, rootfs)}:{st.st_mode}:{st.st_size}:{st.st_mtime_ns}"


def _content_key(
    rootfs: Path | None,
    name: str,
    cmd: list[str],
    env: Mapping[str, str],
    files: Mapping[str, Path],
    symlinks: Mapping[str, str],
    user: str | None = None,
    workdir: str | None = None,
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT_VERSION, name, cmd, sorted(env.items()), _oci_arch()]).encode())
    # Only when set, so the keys (and caches) of images without them stay as they were.
    if user is not None:
        h.update(f"U{user}\n".encode())
    if workdir is not None:
        h.update(f"W{workdir}\n".encode())
    for dest, src in sorted(files.items()):
        st = os.stat(src)
        h.update(f"F{dest}={src}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode}\n".encode())
    for dest, target in sorted(symlinks.items()):
        h.update(f"L{dest}={target}\n".encode())
    if rootfs is not None:
        h.update(f"R{rootfs.resolve()}\n".encode())
        for line in _rootfs_key(rootfs):
            h.update(line.encode() + b"\n")
    return h.hexdigest()


def _write_layer(
    layer: tarfile.TarFile,
    rootfs: Path | None,
    files: Mapping[str, Path],
    symlinks: Mapping[str, str],
) -> None:
    """Write the single layer: the rootfs tree, then loose files and symlinks on top."""
    overlay = {_norm(d) for d in files} | {_norm(d) for d in symlinks}
    written: set[str] = set()
    if rootfs is not None:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for entry in sorted(dirnames + filenames):
                full = os.path.join(dirpath, entry)
                rel = os.path.relpath(full, rootfs)
                if rel in overlay:
                    continue
                info = layer.gettarinfo(full, arcname=rel)
                info.uname = info.gname = ""
                if info.isreg():
                    with open(full, "rb") as fh:
                        layer.addfile(info, fh)
                else:
                    layer.addfile(info)
                written.add(rel)
    else:
        for d in _SKELETON_DIRS:
            layer.addfile(_loose_info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
            written.add(d)
    for dest in sorted(overlay):
        parent = os.path.dirname(dest)
        parts: list[str] = []
        while parent and parent not in written:
            parts.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(parts):
            layer.addfile(_loose_info(p, tarfile.DIRTYPE, 0o755))
            written.add(p)
        src = next((files[k] for k in files if _norm(k) == dest), None)
        if src is not None:
            st = os.stat(src)
            info = _loose_info(dest, tarfile.REGTYPE, stat.S_IMODE(st.st_mode))
            info.size = st.st_size
            with open(src, "rb") as fh:
                layer.addfile(info, fh)
        else:
            target = next(symlinks[k] for k in symlinks if _norm(k) == dest)
            info = _loose_info(dest, tarfile.SYMTYPE, 0o777)
            info.linkname = target
            layer.addfile(info)
        written.add(dest)


def _add_blob(out: tarfile.TarFile, data: bytes) -> str:
    digest = _digest(data)
    info = _loose_info(f"blobs/sha256/{digest.split(':', 1)[1]}", tarfile.REGTYPE, 0o644)
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))
    return digest


def _add_json(out: tarfile.TarFile, name: str, obj: Any) -> None:
    data = json.dumps(obj, sort_keys=True).encode()
    info = _loose_info(name, tarfile.REGTYPE, 0o644)
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))


def build_image_tar(
    rootfs: Path | None,
    name: str,
    out: Path,
    cmd: list[str],
    env: dict[str, str] | None = None,
    files: dict[str, Path] | None = None,
    *,
    symlinks: dict[str, str] | None = None,
    user: str | None = None,
    workdir: str | None = None,
) -> Path:
    """Write an OCI image layout tar for ``name`` to ``out`` and return ``out``.

    The single uncompressed layer holds ``rootfs`` (a directory, or a small skeleton when None)
    with ``files`` (image path -> host file, copied) and ``symlinks`` (image path -> target)
    on top. ``user`` ("65532", "65532:65532") and ``workdir`` go into the image config: pods
    with ``runAsNonRoot`` need a numeric user there. Skips the work when ``out`` was built from
    the same inputs before.
    """
    if not name or ":" not in name.rsplit("/", 1)[-1]:
        raise ValueError(f"image name {name!r} needs a tag, e.g. 'freeze.test/app:1'")
    if not cmd:
        raise ValueError("an image needs a default command")
    if rootfs is not None and not rootfs.is_dir():
        raise ValueError(f"rootfs {rootfs} is not a directory")
    env = dict(env or {})
    files = dict(files or {})
    symlinks = dict(symlinks or {})
    for dest, src in files.items():
        if not Path(src).is_file():
            raise ValueError(f"file for {dest!r} does not exist: {src}")
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

    if workdir is not None and not workdir.startswith("/"):
        raise ValueError(f"workdir {workdir!r} must be an absolute image path")

    key = _content_key(rootfs, name, cmd, env, files, symlinks, user, workdir)
    key_file = out.with_name(out.name + ".key")
    if out.is_file() and key_file.is_file() and key_file.read_text() == key:
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci-build-") as tmp:
        layer_path = Path(tmp) / "layer.tar"
        with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as layer:
            _write_layer(layer, rootfs, files, symlinks)
        layer_hash = hashlib.sha256()
        with open(layer_path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                layer_hash.update(chunk)
        layer_digest = "sha256:" + layer_hash.hexdigest()
        layer_size = layer_path.stat().st_size

        image_config: dict[str, Any] = {
            "Cmd": list(cmd),
            "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        }
        if user is not None:
            image_config["User"] = user
        if workdir is not None:
            image_config["WorkingDir"] = workdir
        config = {
            "architecture": _oci_arch(),
            "os": "linux",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},  # uncompressed: same
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "digest": _digest(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": _digest(manifest_bytes),
                    "size": len(manifest_bytes),
                    "platform": {"architecture": _oci_arch(), "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                }
            ],
        }
        partial = Path(tmp) / "image.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as image:
            _add_json(image, "oci-layout", {"imageLayoutVersion": "1.0.0"})
            _add_json(image, "index.json", index)
            _add_blob(image, config_bytes)
            _add_blob(image, manifest_bytes)
            info = _loose_info(
                f"blobs/sha256/{layer_digest.split(':', 1)[1]}", tarfile.REGTYPE, 0o644
            )
            info.size = layer_size
            with open(layer_path, "rb") as fh:
                image.addfile(info, fh)
        os.replace(partial, out)
    key_file.write_text(key)
    return out


NONROOT_UID = 65532  # distroless' and ko's "nonroot" user; Knative's pods set runAsNonRoot
_PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin\n"
)
_GROUP = f"root:x:0:\nnobody:x:65534:\nnonroot:x:{NONROOT_UID}:\n"


def _write_if_changed(path: Path, text: str) -> Path:
    """Rewrite only on a change: the content key includes the file's mtime."""
    if not (path.is_file() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def nonroot_files(out_dir: Path) -> dict[str, Path]:
    """``/etc/passwd`` and ``/etc/group`` naming the nonroot user, as ``files`` for an image.

    A static Go binary needs no more than that (and a CA bundle) to run as user 65532 the way
    ko's distroless base runs it.
    """
    return {
        "/etc/passwd": _write_if_changed(out_dir / "nonroot.passwd", _PASSWD),
        "/etc/group": _write_if_changed(out_dir / "nonroot.group", _GROUP),
    }


def busybox_image(out_dir: Path, name: str = BUSYBOX_IMAGE_NAME) -> tuple[str, Path]:
    """A tiny image from the host's static busybox; its default command sleeps forever.

    Good both as a test container image and as the CRI sandbox ("pause") image.
    """
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        raise FileNotFoundError("busybox not found: apt-get install busybox-static")
    _require_static(Path(busybox))
    links = {f"/bin/{applet}": "busybox" for applet in BUSYBOX_APPLETS}
    tar = build_image_tar(
        None,
        name,
        out_dir / "busybox.tar",
        list(BUSYBOX_DEFAULT_CMD),
        files={"/bin/busybox": Path(busybox)},
        symlinks=links,
    )
    return name, tar


def _require_static(binary: Path) -> None:
    """A dynamically linked busybox would fail inside the image (no libc there).

    Looks for a PT_INTERP program header in the ELF file (64-bit little-endian only).
    """
    with open(binary, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return  # not a 64-bit LE ELF: let the container run tell
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == 3:  # PT_INTERP
            raise RuntimeError(f"{binary} is dynamically linked: install busybox-static")


def import_image(
    socket: Path | str, tar: Path, namespace: str = "k8s.io", ctr: Path | str | None = None
) -> None:
    """Import an image tar into containerd (``ctr images import``); the CRI sees it at once.

    ``ctr`` is the client matching the containerd (default: the one in PATH). Blocking: test-bed
    setup only.
    """
    ctr = ctr or shutil.which("ctr")
    if ctr is None:
        raise FileNotFoundError("ctr not found: apt-get install containerd")
    proc = subprocess.run(
        [ctr, "-a", str(socket), "-n", namespace, "images", "import", str(tar)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"ctr images import {tar} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
