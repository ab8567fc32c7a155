"""A private containerd for tests, demos and benchmarks: started here, cleaned up completely.

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
from pathlib import Path
from types import TracebackType

import grpc

from daemon._proto import cri_pb2, cri_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from .hostside import remove_cgroup_tree
from .mounts import unmount_under
from .oci import BUSYBOX_IMAGE_NAME, busybox_image, import_image

NAMESPACE = "k8s.io"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# kubelet's cgroupfs layout; pod dirs are named after (random) pod UIDs, so they cannot collide
# with a real kubelet's, and stop() removes only the pod dirs of its own sandboxes.
KUBEPODS = "kubepods"
BESTEFFORT = "kubepods/besteffort"
# containerd 1.6 puts shim sockets and ctr fifos here whatever its config says.
RUN_CONTAINERD = Path("/run/containerd")
REQUIRED_BINARIES = ("containerd", "containerd-shim-runc-v2", "runc", "ctr")


class TestbedError(RuntimeError):
    """The private containerd could not be started or cleaned up."""

    __test__ = False  # not a pytest class


def missing_prerequisites() -> str | None:
    """Why a private containerd cannot run here (None when it can): root and binaries."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and cgroups)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (apt-get install containerd runc)"
    if not (CGROUP_ROOT / "freezer").is_dir():
        return "no cgroup v1 freezer at /sys/fs/cgroup/freezer"
    return None


def _config(base: Path, sandbox_image: str) -> str:
    """containerd v2 config; every setting here was needed on these machines (see notes)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
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


def shim_pids(address: Path | str) -> list[int]:
    """PIDs of containerd-shim processes serving the containerd at ``address``."""
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
        if args and b"containerd-shim" in args[0] and needle in args:
            pids.append(int(entry.name))
    return pids


def _shared_dirs_in_use() -> bool:
    """Whether another containerd or a kubelet runs: then the shared dirs (kubepods cgroups,
    /run/containerd) stay, even empty, since it may be about to create something in them."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("containerd", "kubelet"):
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
    ) -> None:
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
        why = missing_prerequisites()
        if why:
            raise TestbedError(why)
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        self.log_root.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(_config(self.base, self.sandbox_image))
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
            if self.sandbox_image == BUSYBOX_IMAGE_NAME:
                _, tar = busybox_image(self.image_cache)
                import_image(self.socket, tar, self.namespace)
        except BaseException:
            self.stop()
            raise
        return self

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
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
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
