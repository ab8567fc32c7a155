"""A private Docker engine (dockerd) for building and running our images; torn down completely.

Debian's ``docker.io`` (20.10) runs with no networking of its own (no bridge, no iptables, no
forwarding: ``--network none`` and ``--network host`` containers only), its own socket, pidfile,
config file and exec root under a temp dir, and a cgroup parent of its own. Its data root (images
and the build cache) is kept under ``$FREEZE_CACHE_DIR/docker/<key>`` so warm runs reuse both;
an ``flock`` makes a second engine on the same data root wait.

``stop()`` removes every container, stops dockerd (it stops the containerd it manages), waits for
the shims, unmounts whatever is left under its directories, removes the exec root and the
volatile parts of the data root, its cgroups, and what dockerd writes outside its directories:
``/run/docker`` and ``/run/containerd`` (if they did not exist before) and ``/etc/docker/key.json``
(restored to what was there). Untagged images older than a week are pruned first. Blocking calls
throughout: this is test setup.

The images' base: ``base_image()`` imports the cached Debian bookworm rootfs of
``testbed.rootfs.BUILD_BASE_PACKAGES`` (``python``, ``venv``, CA certificates) as a local stand-in
for ``python:3.11-slim-bookworm`` (the build args' ``PYTHON_IMAGE``): no registry needed.

CLI: ``python -m testbed.docker [--keep]`` starts one, prints ``DOCKER_HOST=...``, imports the base.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from . import rootfs
from .containerd import CGROUP_ROOT, release_run_containerd, shim_pids
from .hostside import remove_cgroup_tree
from .mounts import unmount_under

#: Bump when the engine's flags or storage layout change: part of the data root's key.
DOCKER_CACHE_VERSION = 1
RUN_DOCKER = Path("/run/docker")
RUN_CONTAINERD = Path("/run/containerd")
KEY_JSON = Path("/etc/docker/key.json")
#: Parts of the data root that hold nothing a later run needs (everything else is the cache).
VOLATILE = ("containers", "tmp", "runtimes", "containerd", "network", "volumes", "swarm")
BASE_REPOSITORY = "freeze-local/python"


class DockerError(RuntimeError):
    """The private dockerd could not be started, used or cleaned up."""


def _binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")


def missing_prerequisites() -> str | None:
    """Why a private dockerd cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (dockerd)"
    dockerd = _binary("dockerd")
    if dockerd is None:
        return "dockerd is not installed (apt-get install docker.io)"
    if not (Path(dockerd).parent.parent / "bin" / "docker").exists() and _binary("docker") is None:
        return "the docker CLI is not installed (apt-get install docker.io)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap): the images' base"
    return None


def docker_cli() -> str:
    """The CLI that ships with dockerd (``/usr/bin/docker`` of docker.io): the same version, so
    the classic builder works without a buildx plugin (a newer CLI elsewhere on PATH wants one)."""
    dockerd = _binary("dockerd")
    if dockerd is not None:
        sibling = Path(dockerd).resolve().parent.parent / "bin" / "docker"
        if sibling.exists():
            return str(sibling)
    cli = _binary("docker")
    if cli is None:
        raise DockerError("the docker CLI is not installed (apt-get install docker.io)")
    return cli


def _dockerd_version(dockerd: str) -> str:
    out = subprocess.run([dockerd, "--version"], capture_output=True, text=True, check=False)
    # "Docker version 20.10.24+dfsg1, build 297e128"
    words = out.stdout.replace(",", " ").split()
    return words[2] if len(words) > 2 else "unknown"


def pids_with_arg(needle: str) -> list[int]:
    """PIDs of processes whose command line has an argument containing ``needle``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in args):
            found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()]
        if alive:
            time.sleep(0.05)
    return alive


def default_data_root(dockerd: str | None = None) -> Path:
    """Where a private dockerd keeps its images unless told otherwise (keyed by its version)."""
    version = _dockerd_version(dockerd or _binary("dockerd") or "dockerd")
    return (rootfs.cache_root() / "docker" / f"v{DOCKER_CACHE_VERSION}-{version}").resolve()


def data_root_busy(data_root: Path | None = None) -> bool:
    """Whether a private dockerd runs on that data root now (a second one would wait for it)."""
    root = data_root or default_data_root()
    lock_path = root.parent / f"{root.name}.lock"
    if not lock_path.exists():
        return False
    fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if it was taken
    return False


class Dockerd:
    """A private dockerd child process; use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: Path | None = None, *, data_root: Path | None = None) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="freeze-docker-")).resolve()
        self.dockerd = _binary("dockerd") or "dockerd"
        self.data_root = (data_root or default_data_root(self.dockerd)).resolve()
        self.exec_root = self.base / "exec"
        self.socket = self.base / "docker.sock"
        self.log_file = self.base / "dockerd.log"
        self.cgroup_parent = f"freeze-docker-{os.getpid()}-{self.base.name}"
        self.cli = docker_cli()
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._had_run_docker = RUN_DOCKER.exists()
        self._had_run_containerd = RUN_CONTAINERD.exists()
        self._key_json: bytes | None = KEY_JSON.read_bytes() if KEY_JSON.exists() else None
        self._had_etc_docker = KEY_JSON.parent.exists()

    @property
    def host(self) -> str:
        """``DOCKER_HOST`` for this engine."""
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for a docker CLI talking to this engine (its own client config dir; the
        classic builder: BuildKit would fetch the ``# syntax=`` frontend image from Docker Hub)."""
        return dict(
            os.environ,
            DOCKER_HOST=self.host,
            DOCKER_CONFIG=str(self.base / "cli-config"),
            DOCKER_BUILDKIT="0",
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Dockerd:
        """Start dockerd; ready = ``GET /_ping`` answers OK on its socket."""
        why = missing_prerequisites()
        if why:
            raise DockerError(why)
        self.base.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock(timeout=600.0)
        config = self.base / "daemon.json"
        config.write_text("{}\n")  # never the host's /etc/docker/daemon.json
        cmd = [
            self.dockerd,
            "--config-file", str(config),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "dockerd.pid"),
            "-H", self.host,
            "--cgroup-parent", self.cgroup_parent,
            "--storage-driver", "overlay2",
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false",
            "--log-level", "warn",
        ]  # fmt: skip
        try:
            with open(self.log_file, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _lock(self, timeout: float) -> None:
        lock_path = self.data_root.parent / f"{self.data_root.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise DockerError(
                        f"another private dockerd holds {lock_path} for over {timeout:g} s"
                    ) from None
                time.sleep(0.2)

    def _ping(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = s.recv(4096)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] + b" "

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.socket.exists():
                with contextlib.suppress(OSError):
                    if self._ping():
                        return
            time.sleep(0.05)
        raise DockerError(f"dockerd not ready after {timeout:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The end of dockerd's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- using it ----------------------------------------------------------------------------

    def run(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``docker <args>`` against this engine; raise DockerError (with its output) on failure
        when ``check``."""
        proc = subprocess.run(
            [self.cli, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} exited with {proc.returncode}: "
                f"{(proc.stderr or proc.stdout)[-3000:]}"
            )
        return proc

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, timeout=30).returncode == 0

    def image_size(self, ref: str) -> int:
        """The image's size in bytes (all its layers, as ``docker images`` counts)."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())

    def base_image(self) -> str:
        """The images' local base (see the module doc), imported once per data root."""
        tar = rootfs.rootfs_tar(packages=rootfs.BUILD_BASE_PACKAGES)
        key = tar.parent.name.rsplit("-", 1)[-1]
        ref = f"{BASE_REPOSITORY}:3.11-bookworm-{key}"
        if not self.has_image(ref):
            # What the official python image sets and a bare rootfs lacks: the Dockerfiles extend
            # PATH ("/opt/venv/bin:$PATH") and expect the usual directories after it.
            self.run(
                "import",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", "ENV LANG=C.UTF-8",
                "--change", 'CMD ["python3"]',
                str(tar), ref,
                timeout=300,
            )  # fmt: skip
        return ref

    # -- teardown ----------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """Remove every container, stop dockerd and what it started, leave nothing behind but
        the image cache. Idempotent."""
        errors: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                ids = self.run("ps", "-aq", timeout=30).stdout.split()
                if ids:
                    self.run("rm", "-f", "-v", *ids, timeout=60)
                # Untagged images older than a week: what rebuilds superseded, so the cache does
                # not grow forever. Not younger ones: a build stage's last layer is untagged too,
                # and pruning it would drop that stage's whole build cache (a cold rebuild).
                self.run("image", "prune", "-f", "--filter", "until=168h", timeout=120)
            except (DockerError, subprocess.TimeoutExpired) as err:
                errors.append(f"removing containers: {err}")
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    errors.append(f"dockerd ignored SIGTERM for {timeout:g} s: killed")
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        errors.extend(self._reap_children(timeout))
        errors.extend(self._remove_cgroups())
        errors.extend(self._remove_dirs())
        self._restore_host_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise DockerError("private dockerd cleanup incomplete: " + "; ".join(errors))

    def _reap_children(self, timeout: float) -> list[str]:
        """dockerd stops its containerd; shims exit with their containers. Kill stragglers."""
        address = self.exec_root / "containerd" / "containerd.sock"
        pids = sorted(set(pids_with_arg(str(self.exec_root)) + shim_pids(address)))
        alive = _wait_gone(pids, timeout)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        alive = _wait_gone(alive, 5)
        errors = [f"killed leftover processes {alive}"] if alive else []
        return errors

    def _remove_cgroups(self) -> list[str]:
        errors: list[str] = []
        for controller in sorted(CGROUP_ROOT.iterdir()):
            if not controller.is_dir() or controller.is_symlink():
                continue
            path = controller / self.cgroup_parent
            try:
                remove_cgroup_tree(path)
            except OSError as err:
                errors.append(f"could not remove cgroup {path}: {err}")
        return errors

    def _remove_dirs(self) -> list[str]:
        errors: list[str] = []
        watched = [self.base, self.data_root]
        if not self._had_run_docker:
            watched.append(RUN_DOCKER)
        for top in watched:
            left = unmount_under(top)
            if left:
                errors.append(f"still mounted under {top}: {left}")
        if errors:
            return errors  # never delete below a mount
        shutil.rmtree(self.base, ignore_errors=True)
        for name in VOLATILE:
            shutil.rmtree(self.data_root / name, ignore_errors=True)
        if not self._had_run_docker:
            shutil.rmtree(RUN_DOCKER, ignore_errors=True)
        if not self._had_run_containerd:
            release_run_containerd()
        for path in (self.base, *(() if self._had_run_docker else (RUN_DOCKER,))):
            if path.exists():
                errors.append(f"could not remove {path}")
        return errors

    def _restore_host_files(self) -> None:
        if self._key_json is None:
            with contextlib.suppress(FileNotFoundError):
                KEY_JSON.unlink()
            if not self._had_etc_docker:
                with contextlib.suppress(OSError):
                    KEY_JSON.parent.rmdir()
        elif not KEY_JSON.exists() or KEY_JSON.read_bytes() != self._key_json:
            KEY_JSON.write_bytes(self._key_json)

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.docker",
        description="Start a private dockerd, import the images' local base, print how to use "
        "it; Ctrl-C or SIGTERM (without --keep: at once) stops it and cleans up.",
    )
    parser.add_argument("--keep", action="store_true", help="keep it running until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        with Dockerd() as engine:
            base = engine.base_image()
            print(
                json.dumps({"DOCKER_HOST": engine.host, "DOCKER": engine.cli, "PYTHON_IMAGE": base})
            )
            if args.keep:
                stop = threading.Event()
                for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT is ignored in `cmd &`
                    signal.signal(signum, lambda *_: stop.set())
                while not stop.wait(1):
                    pass
    except (DockerError, rootfs.RootfsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
