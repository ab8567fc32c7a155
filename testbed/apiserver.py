"""A real control plane for tests: etcd + kube-apiserver on loopback, built from Go modules.

``ApiServer`` starts etcd and kube-apiserver on free loopback ports with certificates of its
own (a CA, a serving certificate for 127.0.0.1/localhost, an admin client certificate in group
``system:masters``), a service-account signing key pair and issuer (so TokenRequest,
TokenReview and the OIDC discovery endpoints work), the ``MutatingAdmissionWebhook`` admission
plugin and ``Node,RBAC`` authorization. It writes a kubeconfig, waits for ``/readyz`` and, on
``stop()``, ends both processes and removes its directory.

There is no kubelet and no controller manager: pods stay ``Pending``, a namespace's
``default`` ServiceAccount is not created for you (create the ServiceAccount a pod names
before the pod: the ServiceAccount admission plugin refuses pods whose account is missing),
and deleted namespaces stay ``Terminating``.

Usage::

    with ApiServer() as api:            # binaries from testbed.gobins (built when missing)
        api.kubectl("create", "namespace", "demo")
        client = api.client()           # a kubernetes.client.ApiClient
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime as dt
import importlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed import gobins
from webhook import certs

from .processes import free_port

SERVICE_CLUSTER_IP_RANGE: Final = "10.0.0.0/24"
_PR_SET_PDEATHSIG: Final = 1
_T = TypeVar("_T")
_WORKDIR_PREFIX: Final = "freeze-apiserver-"


class ApiServerError(RuntimeError):
    """etcd or kube-apiserver did not come up; the message carries the tail of their logs."""


class KubectlError(subprocess.CalledProcessError):
    """A ``kubectl`` call failed; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else ""
        return f"{super().__str__()}\nstderr:\n{err.strip()}"


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL the child when the test process dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent_argv(
    argv: Sequence[str],
) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` and the ``preexec_fn`` for a child that dies with the test process.

    With util-linux's ``setpriv`` the death signal is set by it, and Popen needs no
    ``preexec_fn``: a ``preexec_fn`` makes Python fork() instead of vfork(), which runs gRPC's
    fork handlers in the child; with grpc.aio channels open in the test process (containerd's
    CRI client) the child then sometimes aborts before exec ("epoll_wait error: Bad file
    descriptor"). ``die_with_parent`` is the fallback when ``setpriv`` is missing.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], None
    return list(argv), die_with_parent


class _Pki:
    """CA, serving certificate, admin client certificate and service-account keys, on disk."""

    def __init__(self, directory: Path, address: str = "127.0.0.1") -> None:
        self.dir = directory
        self.address = address
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self.ca_file = directory / "ca.crt"
        self.serving_cert = directory / "apiserver.crt"
        self.serving_key = directory / "apiserver.key"
        self.admin_cert = directory / "admin.crt"
        self.admin_key = directory / "admin.key"
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"

    def write(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        validity = dt.timedelta(days=2)
        # The same certificate code the webhook bootstraps its TLS with.
        ca, ca_key = certs.make_ca("freeze-proxy test bed CA", now, validity)
        self._ca = (ca, ca_key)
        self.ca_file.write_bytes(certs.cert_pem(ca))
        serving, serving_key = certs.issue_leaf(
            ca,
            ca_key,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            now,
            validity,
            ExtendedKeyUsageOID.SERVER_AUTH,
            [
                *dict.fromkeys(["127.0.0.1", self.address]),
                "10.0.0.1",  # the `kubernetes` Service
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
        )
        self.serving_cert.write_bytes(certs.cert_pem(serving))
        self.serving_key.write_bytes(certs.key_pem(serving_key))
        admin, admin_key = certs.issue_leaf(
            ca,
            ca_key,
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "freeze-proxy-admin"),
                ]
            ),
            now,
            validity,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        self.admin_cert.write_bytes(certs.cert_pem(admin))
        self.admin_key.write_bytes(certs.key_pem(admin_key))

        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key.write_bytes(certs.key_pem(sa))
        self.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        for path in (self.serving_key, self.admin_key, self.sa_key):
            path.chmod(0o600)

    def issue_client(self, name: str, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate for ``user`` in ``groups`` (e.g. a kubelet's
        ``system:node:<node>`` in ``system:nodes``), written as ``<name>.crt``/``.key``."""
        if self._ca is None:
            raise RuntimeError("the PKI is not written yet")
        ca, ca_key = self._ca
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
            + [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        )
        cert, key = certs.issue_leaf(
            ca, ca_key, subject, now, dt.timedelta(days=2), ExtendedKeyUsageOID.CLIENT_AUTH
        )
        cert_file, key_file = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_file.write_bytes(certs.cert_pem(cert))
        key_file.write_bytes(certs.key_pem(key))
        key_file.chmod(0o600)
        return cert_file, key_file


class ApiServer:
    """etcd + kube-apiserver on loopback; a context manager.

    Binaries default to the ones :mod:`testbed.gobins` builds. ``extra_args`` are appended to
    kube-apiserver's command line (later flags win), e.g. ``["--v=4"]``. ``address`` is where it
    binds and what it advertises: loopback by default; a real node's pods need an address they
    can reach through the ``kubernetes`` Service (:mod:`testbed.cluster` passes its bridge's).
    """

    def __init__(
        self,
        *,
        apiserver_bin: Path | None = None,
        etcd_bin: Path | None = None,
        kubectl_bin: Path | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 90.0,
        workdir_parent: Path | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self._address = address
        self._apiserver_bin = apiserver_bin
        self._etcd_bin = etcd_bin
        self._kubectl_bin = kubectl_bin
        self._extra_args = list(extra_args)
        self._start_timeout = start_timeout
        self._workdir_parent = workdir_parent
        self._workdir: Path | None = None
        self._pki: _Pki | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []
        self._port = 0
        self._etcd_url = ""

    # ---- public surface ---------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._need(self._workdir)

    @property
    def url(self) -> str:
        """``https://ADDRESS:PORT`` (the serving certificate also covers ``localhost``)."""
        self._need(self._workdir)
        return f"https://{self._address}:{self._port}"

    @property
    def port(self) -> int:
        self._need(self._workdir)
        return self._port

    def issue_client(self, name: str, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate (and key) signed by this server's client CA."""
        return self._need(self._pki).issue_client(name, user, groups)

    def write_kubeconfig(self, path: Path, cert: Path, key: Path) -> Path:
        """A kubeconfig for another client identity (a kubelet, kube-proxy) at ``path``."""
        path.write_text(json.dumps(self._kubeconfig(cert, key), indent=2))
        path.chmod(0o600)
        return path

    @property
    def issuer(self) -> str:
        """The service-account token issuer (``iss`` claim); also the default API audience."""
        return self.url

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self._need(self._pki).ca_file

    @property
    def client_cert_file(self) -> Path:
        """Admin client certificate (group ``system:masters``)."""
        return self._need(self._pki).admin_cert

    @property
    def client_key_file(self) -> Path:
        return self._need(self._pki).admin_key

    @property
    def service_account_public_key_file(self) -> Path:
        """PEM public key that verifies the service-account tokens this server issues."""
        return self._need(self._pki).sa_pub

    @property
    def service_account_signing_key_file(self) -> Path:
        """PEM private key the server signs service-account tokens with (tests forge with it)."""
        return self._need(self._pki).sa_key

    @property
    def etcd_url(self) -> str:
        self._need(self._workdir)
        return self._etcd_url

    @property
    def kubectl_bin(self) -> Path:
        if self._kubectl_bin is None:
            self._kubectl_bin = gobins.binary("kubectl")
        return self._kubectl_bin

    @property
    def running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """kube-apiserver stopped (SIGSTOP) and continued at exit: its port takes connections
        and answers nothing, as a hung or partitioned API server (etcd runs on)."""
        proc = self._need(self._apiserver)
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGCONT)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this server; raises :class:`KubectlError` on failure
        when ``check`` (the default)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["HOME"] = str(self.workdir)  # kubectl's discovery cache goes under the workdir
        cmd = [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin user (needs the ``kubernetes``
        package; untyped, hence ``Any``)."""
        config: Any = importlib.import_module("kubernetes.config")
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def ssl_context(self) -> ssl.SSLContext:
        """Client TLS context trusting the CA and presenting the admin certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return ctx

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET ``path`` as admin; returns (status, body) without raising on HTTP errors."""
        req = urllib.request.Request(self.url + path)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as err:
            return int(err.code), bytes(err.read())

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ApiServer:
        if self._workdir is not None:
            raise RuntimeError("ApiServer already started")
        if self._apiserver_bin is None or self._etcd_bin is None:
            found = gobins.binaries("etcd", "kube-apiserver")
            self._etcd_bin = self._etcd_bin or found["etcd"]
            self._apiserver_bin = self._apiserver_bin or found["kube-apiserver"]
        _remove_stale_workdirs(self._workdir_parent)
        self._workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=self._workdir_parent))
        (self._workdir / "owner.pid").write_text(str(os.getpid()))
        atexit.register(self.stop)
        try:
            self._pki = _Pki(self._workdir / "pki", self._address)
            self._pki.write()
            self._retry_on_port_clash("etcd", self._start_etcd)
            self._retry_on_port_clash("kube-apiserver", self._start_apiserver)
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End kube-apiserver, then etcd, and remove the work directory. Idempotent."""
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                _terminate(proc)
        self._apiserver = self._etcd = None
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._pki = None
        atexit.unregister(self.stop)

    # ---- internals ----------------------------------------------------------------------------

    @staticmethod
    def _need(value: _T | None) -> _T:
        if value is None:
            raise RuntimeError("ApiServer is not started")
        return value

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        self._logs.append(log)
        argv, preexec = die_with_parent_argv(argv)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=preexec,
        )

    def _log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return f"(no {name}.log)"
        return "\n".join(text.splitlines()[-lines:])

    def _retry_on_port_clash(self, name: str, start: Callable[[], None], tries: int = 3) -> None:
        """Free ports are picked before the process binds them: retry if one got taken."""
        for attempt in range(tries):
            try:
                start()
                return
            except ApiServerError:
                if attempt + 1 == tries or "address already in use" not in self._log_tail(name):
                    raise

    def _start_etcd(self) -> None:
        if self._etcd is not None:  # a retry
            _terminate(self._etcd)
        client_port, peer_port = free_port(), free_port()
        self._etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._etcd = self._spawn(
            "etcd",
            [
                str(self._etcd_bin),
                "--name=freeze-testbed",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={self._etcd_url}",
                f"--advertise-client-urls={self._etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=freeze-testbed={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",  # a throw-away store: speed over durability
                "--log-level=warn",
            ],
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._etcd.poll() is not None:
                raise ApiServerError(
                    f"etcd exited with {self._etcd.returncode}:\n{self._log_tail('etcd')}"
                )
            try:
                with urllib.request.urlopen(self._etcd_url + "/health", timeout=2) as r:
                    if b'"health":"true"' in r.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ApiServerError(f"etcd not healthy in time:\n{self._log_tail('etcd')}")
            time.sleep(0.1)

    def _start_apiserver(self) -> None:
        if self._apiserver is not None:  # a retry
            _terminate(self._apiserver)
        pki = self._need(self._pki)
        self._port = free_port(self._address)
        loopback = self._address.startswith("127.")
        argv = [
            str(self._apiserver_bin),
            f"--etcd-servers={self._etcd_url}",
            f"--bind-address={self._address}",
            f"--advertise-address={self._address}",
            f"--secure-port={self._port}",
            f"--cert-dir={self.workdir / 'cert-dir'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_file}",
            f"--service-account-issuer={self.issuer}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--api-audiences={self.issuer}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # What it presents to kubelets (logs, exec): the admin identity.
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--enable-admission-plugins=MutatingAdmissionWebhook",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # A loopback address is no valid Endpoints address for the `kubernetes` Service.
            *(["--endpoint-reconciler-type=none"] if loopback else []),
            "--profiling=false",
            "--v=1",
            *self._extra_args,
        ]
        self._apiserver = self._spawn("kube-apiserver", argv)
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        deadline = time.monotonic() + self._start_timeout
        last = ""
        while True:
            if self._apiserver.poll() is not None:
                raise ApiServerError(
                    f"kube-apiserver exited with {self._apiserver.returncode}:\n"
                    f"{self._log_tail('kube-apiserver')}"
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as err:
                last = f"/readyz {err.code}: {err.read()[-2000:].decode(errors='replace')}"
            except (OSError, urllib.error.URLError) as err:
                last = f"/readyz: {err}"
            if time.monotonic() > deadline:
                raise ApiServerError(
                    f"kube-apiserver not ready in {self._start_timeout}s ({last}):\n"
                    f"{self._log_tail('kube-apiserver')}"
                )
            time.sleep(0.25)

    def _write_kubeconfig(self) -> None:
        pki = self._need(self._pki)
        self.write_kubeconfig(self.kubeconfig, pki.admin_cert, pki.admin_key)

    def _kubeconfig(self, cert: Path, key: Path) -> dict[str, Any]:
        pki = self._need(self._pki)
        # JSON is valid YAML; kubectl and the Python client both read it.
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "testbed",
                    "cluster": {"server": self.url, "certificate-authority": str(pki.ca_file)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(cert), "client-key": str(key)},
                }
            ],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
            "current-context": "testbed",
            "preferences": {},
        }


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap it."""
    if proc.poll() is not None:
        return
    # The group id is the leader's pid, valid while the leader is not yet reaped.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _remove_stale_workdirs(parent: Path | None) -> None:
    """Remove work directories left by test processes that were killed (SIGKILL skips
    ``stop()``; their etcd and kube-apiserver died with them through PDEATHSIG)."""
    base = parent or Path(tempfile.gettempdir())
    for old in base.glob(_WORKDIR_PREFIX + "*"):
        try:
            pid = int((old / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass
