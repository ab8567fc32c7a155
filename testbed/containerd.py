"""A private containerd for tests, demos and benchmarks: started here, cleaned up completely.

Two flavors: ``"1.6"`` runs Debian's containerd, shim and ctr from PATH; ``"2.x"`` runs the
containerd 2.x that ``scripts/build_k8s.sh`` builds from its Go module (``testbed.gobins``), with
the runc shim of the same build (users run 2.x today, and kubelet 1.38 requires it).

Each instance has its own root, state, gRPC and ttrpc sockets under one temp dir, so it never
touches a system containerd. ``stop()`` removes every pod through CRI (shims outlive containerd
otherwise), stops containerd, waits for the shims, removes the pod cgroups it made, unmounts
whatever is left under its dir and deletes it. Blocking calls throughout: this is test setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

import grpc

from daemon._proto import cri_pb2, cri_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from . import gobins
from .hostside import remove_cgroup_tree
from .mounts import unmount_under
from .oci import BUSYBOX_IMAGE_NAME, busybox_image, import_image
from .processes import stop

NAMESPACE = "k8s.io"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# kubelet's cgroupfs layout; pod dirs are named after (random) pod UIDs, so they cannot collide
# with a real kubelet's, and stop() removes only the pod dirs of its own sandboxes.
KUBEPODS = "kubepods"
BESTEFFORT = "kubepods/besteffort"
# containerd 1.6 puts shim sockets and ctr fifos here whatever its config says.
RUN_CONTAINERD = Path("/run/containerd")
REQUIRED_BINARIES = ("containerd", "containerd-shim-runc-v2", "runc", "ctr")

Flavor = Literal["1.6", "2.x"]
FLAVORS: Final[tuple[Flavor, ...]] = ("1.6", "2.x")
DEFAULT_FLAVOR: Final[Flavor] = "1.6"
# The 2.x flavor's programs, as testbed.gobins names them (one build of one module).
GO_BINARIES: Final = ("containerd2", "containerd2-shim-runc-v2", "ctr2")
# containerd 2.4 refuses a shim socket_dir longer than this (107-byte sun_path minus the hash).
MAX_SOCKET_DIR = 42


class TestbedError(RuntimeError):
    """The private containerd could not be started or cleaned up."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class Binaries:
    """The programs of one flavor. ``shim`` None: containerd finds ``containerd-shim-runc-v2``
    in PATH (1.6); else the CRI runtime's ``runtime_path`` points at it (2.x)."""

    containerd: str
    ctr: str
    shim: str | None = None


def flavor_binaries(flavor: Flavor, *, build: bool = False) -> Binaries:
    """Where one flavor's programs are; 2.x's are built first when ``build`` (minutes, once).

    Raises TestbedError naming what is missing and how to get it.
    """
    if flavor == "1.6":
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
        if missing:
            raise TestbedError(
                f"missing binaries: {', '.join(missing)} (apt-get install containerd runc)"
            )
        return Binaries(containerd="containerd", ctr="ctr")
    if shutil.which("runc") is None:
        raise TestbedError("missing binary: runc (apt-get install runc)")
    try:
        paths = gobins.binaries(*GO_BINARIES, build=build)
    except gobins.BuildError as err:
        raise TestbedError(f"containerd 2.x not available: {err}") from err
    return Binaries(
        containerd=str(paths["containerd2"]),
        ctr=str(paths["ctr2"]),
        shim=str(paths["containerd2-shim-runc-v2"]),
    )


def missing_prerequisites(flavor: Flavor = DEFAULT_FLAVOR, *, build: bool = False) -> str | None:
    """Why a private containerd of ``flavor`` cannot run here (None when it can): root, the
    v1 freezer and the binaries (2.x's are built first when ``build``)."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and cgroups)"
    if not (CGROUP_ROOT / "freezer").is_dir():
        return "no cgroup v1 freezer at /sys/fs/cgroup/freezer"
    try:
        flavor_binaries(flavor, build=build)
    except TestbedError as err:
        return str(err)
    return None


def _config(base: Path, sandbox_image: str, flavor: Flavor, shim: str | None) -> str:
    """The config file of one flavor: 1.6 reads version 2, 2.x version 3 (the first 2.x
    format; 2.4 migrates it in memory to its own version 4 at start-up)."""
    if flavor == "1.6":
        return _config_v2(base, sandbox_image)
    if shim is None:
        raise ValueError("containerd 2.x needs the shim of its own build (Binaries.shim)")
    return _config_v3(base, sandbox_image, shim)


def _common(base: Path, version: int) -> str:
    """Top-level settings both formats share: everything under ``base``."""
    return f"""version = {version}
root = "{base}/root"
state = "{base}/state"
oom_score = 0

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd-ttrpc.sock"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
"""


def _config_v2(base: Path, sandbox_image: str) -> str:
    """containerd 1.6's config; every setting here was needed on these machines (see notes)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""{_common(base, 2)}
[{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{base}/runc-root"

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{base}/cni/net.d"
"""


def _config_v3(base: Path, sandbox_image: str, shim: str) -> str:
    """containerd 2.x's config: the same settings as 1.6's, under 2.x's split CRI plugins
    (checked against ``containerd config default`` and the 2.4.2 source). Beyond 1.6: NRI is
    off (it would listen on /var/run/nri/nri.sock, outside ``base``) and shim sockets go under
    ``base`` when the path is short enough (else 2.x too uses /run/containerd/s)."""
    rt = "plugins.'io.containerd.cri.v1.runtime'"
    images = "plugins.'io.containerd.cri.v1.images'"
    socket_dir = base / "s"
    shim_manager = (
        f"""[plugins.'io.containerd.shim.v1.manager']
  socket_dir = "{socket_dir}"
"""
        if len(str(socket_dir)) <= MAX_SOCKET_DIR
        else ""
    )
    return f"""{_common(base, 3)}
[plugins.'io.containerd.nri.v1.nri']
  disable = true

{shim_manager}
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{images}]
  snapshotter = "overlayfs"

[{images}.pinned_images]
  sandbox = "{sandbox_image}"

[{rt}]
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  enable_selinux = false

[{rt}.containerd]
  default_runtime_name = "runc"

[{rt}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  runtime_path = "{shim}"

[{rt}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{base}/runc-root"

[{rt}.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "{base}/cni/net.d"
"""


def shim_pids(address: Path | str) -> list[int]:
    """PIDs of containerd-shim processes serving the containerd at ``address`` (Debian's
    ``containerd-shim-runc-v2`` or the cached ``containerd2-shim-runc-v2-<version>``)."""
    needle = str(address).encode()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        args = cmdline.split(b"\0")
        if args and b"-shim-" in os.path.basename(args[0]) and needle in args:
            pids.append(int(entry.name))
    return pids


def holds_shared_dirs(proc_stat: str) -> bool:
    """Whether the process of one ``/proc/<pid>/stat`` line may use the shared dirs: a live
    containerd (Debian's ``containerd`` or the cached ``containerd2-v<version>``, cut to 15
    characters by the kernel) or kubelet. Shims and zombies (a 2.x shim lingers as one for a
    moment after its exit, named ``containerd2-shi``) do not count."""
    # "pid (comm) state ...": comm may hold spaces and parentheses, so cut at the last ")".
    start, end = proc_stat.find("("), proc_stat.rfind(")")
    if start < 0 or end < start:
        return False
    comm, state = proc_stat[start + 1 : end], proc_stat[end + 2 : end + 3]
    if state in ("Z", "X", ""):
        return False
    return comm in ("containerd", "kubelet") or comm.startswith("containerd2-v")


def _shared_dirs_in_use() -> bool:
    """Whether another containerd or a kubelet runs: then the shared dirs (kubepods cgroups,
    /run/containerd) stay, even empty, since it may be about to create something in them."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                proc_stat = (entry / "stat").read_text()
            except OSError:
                continue
            if holds_shared_dirs(proc_stat):
                return True
    return False


def release_run_containerd() -> None:
    """Remove /run/containerd's shared dirs if empty and no containerd or kubelet runs."""
    if not _shared_dirs_in_use():
        for d in (RUN_CONTAINERD / "fifo", RUN_CONTAINERD / "s", RUN_CONTAINERD):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty


def pod_cgroup_dirs(pod_uid: str) -> list[Path]:
    """Every controller's cgroup dir of one pod (cgroupfs layout), existing or not."""
    return [
        d / BESTEFFORT / f"pod{pod_uid}"
        for d in sorted(CGROUP_ROOT.iterdir())
        if d.is_dir() and not d.is_symlink()
    ]


class Containerd:
    """A private containerd child process; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        sandbox_image: str = BUSYBOX_IMAGE_NAME,
        image_cache: Path | None = None,
        namespace: str = NAMESPACE,
        flavor: Flavor = DEFAULT_FLAVOR,
    ) -> None:
        self.flavor = flavor
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="freeze-containerd-")).resolve()
        self.sandbox_image = sandbox_image
        self.namespace = namespace
        self.image_cache = image_cache or Path(tempfile.gettempdir()) / "freeze-testbed-images"
        self.socket = self.base / "containerd.sock"
        self.log_root = self.base / "pods"
        self.log_file = self.base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pod_uids: set[str] = set()  # every pod seen in stop(), for cgroup cleanup
        self._channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        """gRPC target for the socket."""
        return f"unix://{self.socket}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Containerd:
        """Start containerd and import the busybox (sandbox) image; ready = CRI Version works."""
        why = missing_prerequisites(self.flavor)
        if why:
            raise TestbedError(why)
        bins = flavor_binaries(self.flavor)
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        self.log_root.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(_config(self.base, self.sandbox_image, self.flavor, bins.shim))
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [bins.containerd, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
            if self.sandbox_image == BUSYBOX_IMAGE_NAME:
                _, tar = busybox_image(self.image_cache)
                import_image(self.socket, tar, self.namespace, ctr=bins.ctr)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, timeout: float = 20.0) -> None:
        """Stop only the containerd process (SIGTERM) and start it again on the same dirs and
        config, pods left running: what ``systemctl restart containerd`` does on a node. The
        shims (and so the containers, paused or not) outlive it; containerd reconnects to them
        at start. Returns once CRI answers again."""
        if self.proc is None or self.proc.poll() is not None:
            raise TestbedError("containerd is not running: nothing to restart")
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        stop(self.proc, timeout)
        bins = flavor_binaries(self.flavor)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [bins.containerd, "--config", str(self.base / "config.toml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "socket not there yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise TestbedError(
                    f"containerd exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if self.socket.exists():
                try:
                    self.cri.Version(cri_pb2.VersionRequest(version="v1"), timeout=2)
                    return
                except grpc.RpcError as err:
                    last = f"{err.code().name}: {err.details()}"
            time.sleep(0.01)
        raise TestbedError(f"containerd not ready after {timeout}s ({last}): {self.log_tail()}")

    def runtime_version(self) -> str:
        """What the running containerd says it is (CRI Version's ``runtime_version``)."""
        reply = self.cri.Version(cri_pb2.VersionRequest(version="v1"), timeout=5)
        return str(reply.runtime_version)

    def log_tail(self, lines: int = 20) -> str:
        """The end of containerd's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def channel(self) -> grpc.Channel:
        """A blocking gRPC channel to this containerd (test-side setup and cleanup)."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def cri(self) -> cri_pb2_grpc.RuntimeServiceStub:
        return cri_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def tasks(self) -> tasks_pb2_grpc.TasksStub:
        return tasks_pb2_grpc.TasksStub(self.channel)

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        """Per-call metadata the Tasks API needs."""
        return (("containerd-namespace", self.namespace),)

    def remove_all_pods(self) -> None:
        """Remove every pod through CRI, thawing paused containers first (kubelet's order)."""
        sandboxes = self.cri.ListPodSandbox(cri_pb2.ListPodSandboxRequest(), timeout=10).items
        for sb in sandboxes:
            self.pod_uids.add(sb.metadata.uid)
            containers = self.cri.ListContainers(
                cri_pb2.ListContainersRequest(filter=cri_pb2.ContainerFilter(pod_sandbox_id=sb.id)),
                timeout=10,
            ).containers
            for c in containers:
                self._thaw(c.id)
                with contextlib.suppress(grpc.RpcError):
                    self.cri.StopContainer(
                        cri_pb2.StopContainerRequest(container_id=c.id, timeout=0), timeout=30
                    )
                self.cri.RemoveContainer(
                    cri_pb2.RemoveContainerRequest(container_id=c.id), timeout=30
                )
            self.cri.StopPodSandbox(cri_pb2.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=30)
            self.cri.RemovePodSandbox(
                cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=30
            )

    def _thaw(self, container_id: str) -> None:
        """Resume a paused task so that it can be stopped at once."""
        try:
            got = self.tasks.Get(
                tasks_pb2.GetRequest(container_id=container_id), metadata=self.metadata, timeout=5
            )
            if got.process.status in (tasks_pb2.PAUSED, tasks_pb2.PAUSING):
                self.tasks.Resume(
                    tasks_pb2.ResumeTaskRequest(container_id=container_id),
                    metadata=self.metadata,
                    timeout=10,
                )
        except grpc.RpcError:
            pass  # no task (created or exited container): nothing to thaw

    def stop(self, timeout: float = 20.0) -> None:
        """Remove all pods, stop containerd and its shims, leave nothing behind. Idempotent."""
        errors: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remove_all_pods()
            except grpc.RpcError as err:
                errors.append(f"removing pods: {err.code().name}: {err.details()}")
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None:
            stop(self.proc, timeout)
            self.proc = None
        errors.extend(self._reap_shims(timeout))
        errors.extend(self._remove_cgroups())
        errors.extend(self._remove_dirs())
        if errors:
            raise TestbedError("testbed cleanup incomplete: " + "; ".join(errors))

    def _reap_shims(self, timeout: float) -> list[str]:
        """Shims exit once their tasks are deleted; kill any still there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (pids := shim_pids(self.socket)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"killed shims left running: {pids}"]

    def _remove_cgroups(self) -> list[str]:
        errors: list[str] = []
        for uid in sorted(self.pod_uids):
            for d in pod_cgroup_dirs(uid):
                try:
                    remove_cgroup_tree(d)
                except OSError as err:
                    errors.append(f"cgroup {d}: {err}")
        if not _shared_dirs_in_use():
            for rel in (BESTEFFORT, KUBEPODS):
                for ctl in CGROUP_ROOT.iterdir():
                    with contextlib.suppress(OSError):
                        (ctl / rel).rmdir()  # only if empty
        return errors

    def _remove_dirs(self) -> list[str]:
        errors: list[str] = []
        unmount_under(self.base)
        if self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)
            if self.base.exists():
                errors.append(f"could not remove {self.base}")
        release_run_containerd()
        return errors

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
