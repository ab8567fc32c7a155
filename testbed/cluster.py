"""A real single-node Kubernetes with Knative Serving on this machine, for tests and the demo.

``Cluster`` starts, on a bridge, a cgroup root and a containerd of its own:
etcd + kube-apiserver (:mod:`testbed.apiserver`, bound to the bridge's address so pods reach it
through the ``kubernetes`` Service), kube-controller-manager, kube-scheduler, a kubelet on a
private containerd (:mod:`testbed.containerd`) with CNI networking (Debian's ``bridge`` +
``host-local`` + ``portmap`` plugins, so ``hostPort`` works), kube-proxy (iptables mode),
CoreDNS (:mod:`testbed.coredns`) and Knative Serving (:mod:`testbed.knative`), each Knative and
CoreDNS binary imported as an image (no registry is reachable). It then is a cluster a Knative
operator would recognise: ``kubectl apply -k config/`` and ``kubectl apply -f`` a Knative
Service work as they do on minikube.

What it changes on the host (sysctls the kubelet and the CNI plugins set, nftables tables of
kube-proxy and portmap, nfacct counters, a few host paths, the bridge and the cgroup root) is
captured before the start and restored by ``stop()`` (:mod:`testbed.hostside`), which also ends
every process by PID and removes every pod through CRI. Blocking calls throughout: test set-up.

The numbers (bridge, subnets, node name) are private to this test bed: no other test bed uses
them, so a cluster can run beside the containerd and dockerd test beds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import yaml

from . import coredns, gobins, hostside, knative
from .apiserver import SERVICE_CLUSTER_IP_RANGE, ApiServer, KubectlError, die_with_parent_argv
from .containerd import Containerd, shim_pids
from .mounts import unmount_under
from .oci import import_image
from .processes import free_port
from .processes import stop as stop_process

NODE_NAME: Final = "freeze-node"
BRIDGE: Final = "fzbr0"
POD_SUBNET: Final = "10.244.77.0/24"
NODE_IP: Final = "10.244.77.1"  # the bridge's address: the node's InternalIP and pods' gateway
CGROUP_ROOT: Final = "freeze-node"  # the kubelet's cgroupRoot, in every hierarchy
DNS_IP: Final = "10.0.0.10"
CLUSTER_DOMAIN: Final = "cluster.local"
NODE_BINARIES: Final = (
    "etcd",
    "kube-apiserver",
    "kubectl",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "coredns",
    "queue-proxy",
    *(f"knative-{c}" for c in knative.KNATIVE_COMPONENTS),
)
_WORKDIR_PREFIX: Final = "freeze-cluster-"
#: The host as found, kept while a cluster runs: a run that died is undone by the next one.
HOST_SNAPSHOT: Final = Path("/run/freeze-cluster/host-snapshot.pickle")
#: Held while a cluster runs: its bridge, cgroup root and node name are fixed, so one at a time.
LOCK_FILE: Final = Path("/run/freeze-cluster.lock")


class ClusterError(RuntimeError):
    """A part of the cluster did not come up; the message names it and carries its log's tail."""


def missing_prerequisites() -> str | None:
    """Why a real node cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (kubelet, containerd, CNI, iptables)"
    missing = [b for b in ("nft", "iptables", "ip", "containerd", "runc") if not shutil.which(b)]
    if missing:
        return f"missing binaries: {', '.join(missing)} (make setup installs them)"
    plugins = [
        p for p in ("bridge", "host-local", "portmap") if not Path("/usr/lib/cni", p).exists()
    ]
    if plugins:
        return f"missing CNI plugins in /usr/lib/cni: {plugins} (make setup installs them)"
    return None


def _cni_conflist(work: Path) -> dict[str, Any]:
    """The node's pod network: a bridge of its own, addresses from its subnet, hostPort."""
    return {
        "cniVersion": "0.4.0",
        "name": "freeze-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(work / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def _kubelet_config(
    work: Path, containerd_socket: Path, ca_file: Path, port: int
) -> dict[str, Any]:
    """What worked on these machines (see the notes): cgroup v1, containerd 1.6, own paths."""
    endpoint = f"unix://{containerd_socket}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "protectKernelDefaults": False,
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(work / "pod-logs"),
        "volumePluginDir": str(work / "volume-plugins"),
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "shutdownGracePeriod": "0s",
        "nodeStatusUpdateFrequency": "5s",
    }


class Cluster:
    """A started single-node cluster with Knative Serving; a context manager.

    ``images`` are image tars (OCI layout or ``docker save``) imported into the node's
    containerd before anything runs, e.g. our own images built by :mod:`testbed.docker`.
    """

    def __init__(
        self,
        *,
        images: Sequence[Path] = (),
        workdir_parent: Path | None = None,
        knative_serving: bool = True,
        skip_tag_resolution: Sequence[str] = (),
        log: IO[str] | None = None,
    ) -> None:
        self._skip_registries = list(skip_tag_resolution)
        self._lock_timeout = 600.0
        self._lock_fd: int | None = None
        self._extra_images = list(images)
        self._workdir_parent = workdir_parent
        self._knative = knative_serving
        self._say = log or sys.stderr
        self.work: Path = Path()
        self.api: ApiServer | None = None
        self.containerd: Containerd | None = None
        self._host: hostside.HostSnapshot | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._kubeconfigs: dict[str, Path] = {}
        self._logs: list[IO[bytes]] = []
        self.timings: dict[str, float] = {}
        self.images: dict[str, str] = {}

    # ---- public surface -------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self._need_api().kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self._need_api().kubectl(*args, input=input, check=check, timeout=timeout)

    def apply(self, objects: Iterable[Mapping[str, Any]], timeout: float = 120.0) -> None:
        """Server-side apply (Knative's CRDs are too big for the last-applied annotation)."""
        docs = list(objects)
        if docs:
            self.kubectl(
                "apply", "--server-side", "--force-conflicts", "-f", "-",
                input=yaml.safe_dump_all(docs), timeout=timeout,
            )  # fmt: skip

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.work / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {name}.log)"

    def import_images(self, tars: Iterable[Path]) -> None:
        cd = self._need_containerd()
        for tar in tars:
            import_image(cd.socket, tar)

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Cluster:
        why = missing_prerequisites()
        if why:
            raise ClusterError(why)
        bins = gobins.binaries(*NODE_BINARIES)
        self._lock(timeout=self._lock_timeout)
        self._recover()
        self.work = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=self._workdir_parent))
        (self.work / "owner.pid").write_text(str(os.getpid()))
        try:
            self._host = hostside.HostSnapshot.capture(bridge=BRIDGE, cgroup_root=CGROUP_ROOT)
            self._host.save(HOST_SNAPSHOT)
            hostside.create_bridge(BRIDGE, f"{NODE_IP}/24")
            hostside.make_cgroup_root(CGROUP_ROOT)
            self._step("control plane", lambda: self._start_control_plane(bins))
            self._step("containerd + images", lambda: self._start_containerd(bins))
            self._step("kubelet Ready", lambda: self._start_kubelet(bins))
            self._step("kube-proxy", lambda: self._start_kube_proxy(bins))
            self._step("CoreDNS", self._start_dns)
            if self._knative:
                self._step("Knative Serving", self._start_knative)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the node and the control plane, remove every pod, restore the host."""
        errors: list[str] = []
        # The kubelet first, or it recreates what containerd's clean-up removes.
        for name in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                stop_process(proc, within=15)
        if self.containerd is not None:
            try:
                self.containerd.stop()
            except Exception as exc:  # clean up the rest before reporting it
                errors.append(f"containerd: {exc}")
            self.containerd = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._host is not None:
            errors.extend(self._host.restore())
            self._host = None
            _forget_snapshot()
        if self.work != Path() and self.work.exists():
            # The kubelet bind-mounts its root dir onto itself and mounts pods' volumes in it.
            unmount_under(self.work)
            shutil.rmtree(self.work, ignore_errors=True)
            if self.work.exists():
                errors.append(f"could not remove {self.work}")
        if self._lock_fd is not None:
            LOCK_FILE.unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if errors:
            raise ClusterError("cluster cleanup incomplete: " + "; ".join(errors))

    def _lock(self, timeout: float) -> None:
        """Wait (bounded) for another cluster on this machine to stop."""
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"another test cluster runs on this machine (it holds {LOCK_FILE}) for "
                        f"over {timeout:g} s; stop it first"
                    ) from None
                time.sleep(1)
                continue
            if os.fstat(fd).st_ino != _inode(LOCK_FILE):  # unlinked by its stopping owner
                os.close(fd)
                continue
            self._lock_fd = fd
            return

    def _recover(self) -> None:
        """Undo what a cluster whose test process was killed left: its shims and containers
        (they outlive containerd), its mounts and work dir, and the host as it found it."""
        parent = self._workdir_parent or Path(tempfile.gettempdir())
        for old in parent.glob(_WORKDIR_PREFIX + "*"):
            try:
                owner = int((old / "owner.pid").read_text())
            except (OSError, ValueError):
                continue  # not a cluster's (or not yet): leave it
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner, 0)
                continue  # its owner still runs
            for pid in shim_pids(old / "containerd" / "containerd.sock"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            unmount_under(old)
            shutil.rmtree(old, ignore_errors=True)
            print(f"cluster: removed {old}, left by a run that died", file=self._say)
        left = hostside.HostSnapshot.load(HOST_SNAPSHOT)
        if left is not None:
            errors = left.restore()
            _forget_snapshot()
            print(
                f"cluster: restored the host as a run that died found it {errors}", file=self._say
            )

    # ---- the parts ------------------------------------------------------------------------

    def _step(self, name: str, run: Any) -> None:
        started = time.monotonic()
        run()
        self.timings[name] = round(time.monotonic() - started, 1)
        print(f"cluster: {name} in {self.timings[name]} s", file=self._say, flush=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.work / f"{name}.log").open("wb")
        self._logs.append(log)
        argv, preexec = die_with_parent_argv(argv)
        self._procs[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
            start_new_session=True,
            preexec_fn=preexec,
        )

    def _alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _start_control_plane(self, bins: Mapping[str, Path]) -> None:
        self.api = ApiServer(
            apiserver_bin=bins["kube-apiserver"],
            etcd_bin=bins["etcd"],
            kubectl_bin=bins["kubectl"],
            address=NODE_IP,
            workdir_parent=self.work,
            extra_args=[
                "--enable-admission-plugins=MutatingAdmissionWebhook,NodeRestriction",
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        self.api.start()
        api = self.api
        self._kubeconfigs = {
            "node": api.write_kubeconfig(
                self.work / "kubelet.kubeconfig",
                *api.issue_client("node", f"system:node:{NODE_NAME}", ["system:nodes"]),
            ),
            "kube-proxy": api.write_kubeconfig(
                self.work / "kube-proxy.kubeconfig",
                *api.issue_client("kube-proxy", "system:kube-proxy"),
            ),
            "kube-controller-manager": api.write_kubeconfig(
                self.work / "kcm.kubeconfig",
                *api.issue_client("kcm", "system:kube-controller-manager"),
            ),
            "kube-scheduler": api.write_kubeconfig(
                self.work / "scheduler.kubeconfig",
                *api.issue_client("scheduler", "system:kube-scheduler"),
            ),
        }
        self._spawn(
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                f"--kubeconfig={self._kubeconfigs['kube-controller-manager']}",
                f"--authentication-kubeconfig={self._kubeconfigs['kube-controller-manager']}",
                f"--authorization-kubeconfig={self._kubeconfigs['kube-controller-manager']}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--root-ca-file={api.ca_file}",
                f"--service-account-private-key-file={api.service_account_signing_key_file}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.work / 'kcm-certs'}",
                f"--flex-volume-plugin-dir={self.work / 'flex-volume'}",
                # One node that is ours: evict nothing, and never wait long to notice it.
                "--node-monitor-grace-period=40s",
                "--terminated-pod-gc-threshold=50",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins["kube-scheduler"]),
                f"--kubeconfig={self._kubeconfigs['kube-scheduler']}",
                f"--authentication-kubeconfig={self._kubeconfigs['kube-scheduler']}",
                f"--authorization-kubeconfig={self._kubeconfigs['kube-scheduler']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.work / 'scheduler-certs'}",
            ],
        )

    def _start_containerd(self, bins: Mapping[str, Path]) -> None:
        base = self.work / "containerd"
        (base / "cni" / "net.d").mkdir(parents=True)
        (base / "cni" / "net.d" / "10-freeze-node.conflist").write_text(
            json.dumps(_cni_conflist(self.work), indent=2)
        )
        self.containerd = Containerd(base_dir=base)
        self.containerd.start()
        images = self.work / "images"
        tars: list[Path] = []
        ref, tar = coredns.coredns_image(bins["coredns"], images)
        self.images["coredns"] = ref
        tars.append(tar)
        if self._knative:
            for component in (*knative.KNATIVE_COMPONENTS, "queue"):
                binary = bins["queue-proxy" if component == "queue" else f"knative-{component}"]
                ref, tar = knative.ko_image(binary, component, images)
                self.images[component] = ref
                tars.append(tar)
        self.import_images([*tars, *self._extra_images])

    def _start_kubelet(self, bins: Mapping[str, Path]) -> None:
        api = self._need_api()
        cd = self._need_containerd()
        config = self.work / "kubelet-config.yaml"
        config.write_text(
            json.dumps(_kubelet_config(self.work, cd.socket, api.ca_file, free_port(NODE_IP)))
        )
        self._spawn(
            "kubelet",
            [
                str(bins["kubelet"]),
                f"--config={config}",
                f"--kubeconfig={self._kubeconfigs['node']}",
                f"--root-dir={self.work / 'kubelet'}",
                f"--cert-dir={self.work / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._wait(
            "the node to turn Ready",
            lambda: self._node_ready(),
            timeout=90,
            alive="kubelet",
        )

    def _node_ready(self) -> bool:
        proc = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        conditions = json.loads(proc.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _start_kube_proxy(self, bins: Mapping[str, Path]) -> None:
        self._spawn(
            "kube-proxy",
            [
                str(bins["kube-proxy"]),
                f"--kubeconfig={self._kubeconfigs['kube-proxy']}",
                f"--hostname-override={NODE_NAME}",
                f"--cluster-cidr={POD_SUBNET}",
                "--proxy-mode=iptables",
                # Change no sysctl (see the notes): the defaults raise conntrack limits.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--iptables-localhost-nodeports=false",
                "--nodeport-addresses=primary",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
            ],
        )
        # Ready once it has written the `kubernetes` Service's rules.
        self._wait(
            "kube-proxy's rules for the kubernetes Service",
            lambda: b"KUBE-SERVICES" in _nft_ruleset() and b"10.0.0.1" in _nft_ruleset(),
            timeout=60,
            alive="kube-proxy",
        )

    def _start_dns(self) -> None:
        self.apply(coredns.coredns_manifests(self.images["coredns"], DNS_IP, CLUSTER_DOMAIN))
        self.wait_available("kube-system", "coredns", timeout=120)

    def _start_knative(self) -> None:
        crds, rest = knative.serving_manifests(
            self.images, local_registries=[*knative.LOCAL_REGISTRIES, *self._skip_registries]
        )
        self.apply(crds)
        names = [c["metadata"]["name"] for c in crds]
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            *(f"crd/{n}" for n in names), timeout=90,
        )  # fmt: skip
        self.apply(rest)
        for namespace, deployment in knative.ready_checks():
            self.wait_available(namespace, deployment, timeout=180)

    # ---- waiting --------------------------------------------------------------------------

    def wait_available(self, namespace: str, deployment: str, timeout: float = 120) -> None:
        try:
            self.kubectl(
                "-n", namespace, "wait", "--for=condition=Available", f"--timeout={int(timeout)}s",
                f"deployment/{deployment}", timeout=timeout + 30,
            )  # fmt: skip
        except KubectlError as err:
            pods = self.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
            events = self.kubectl(
                "-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False
            ).stdout
            raise ClusterError(
                f"deployment {namespace}/{deployment} not available in {timeout} s: {err}\n"
                f"pods:\n{pods}\nevents:\n{events[-4000:]}\nkubelet:\n{self.log_tail('kubelet')}"
            ) from err

    def _wait(self, what: str, ready: Any, timeout: float, alive: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._alive(alive)
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout} s waiting for {what}:\n{self.log_tail(alive)}"
                )
            time.sleep(0.5)

    def _need_api(self) -> ApiServer:
        if self.api is None:
            raise RuntimeError("the cluster is not started")
        return self.api

    def _need_containerd(self) -> Containerd:
        if self.containerd is None:
            raise RuntimeError("the cluster is not started")
        return self.containerd


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _forget_snapshot() -> None:
    HOST_SNAPSHOT.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        HOST_SNAPSHOT.parent.rmdir()


def _nft_ruleset() -> bytes:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["nft", "list", "ruleset"], capture_output=True, timeout=10, check=False
        ).stdout
    return b""
