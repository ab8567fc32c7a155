"""config/ and freeze-webhook against a real kube-apiserver (etcd + kube-apiserver v1.37 on
loopback, see testbed.apiserver; no kubelet, no controller manager).

What is proven here, that the fake-based tests (test_certs, test_admission, test_manifests) cannot:

* ``kubectl apply -f config/`` and ``kubectl apply -k config/`` are accepted by the API server's
  own validation, into a fresh server and as re-applies, client-side and server-side.
* ``python -m webhook`` bootstraps its TLS for real: it fills the Secret config/ ships empty,
  writes its CA into the shipped MutatingWebhookConfiguration's caBundle, and a restart changes
  nothing. It runs with the token of its own ServiceAccount, so the RBAC config/ ships is proven
  sufficient for what the webhook really does, not only by ``kubectl auth can-i``.
* The API server calls it, with that caBundle, and stores exactly the pod the pure mutation
  computes; warnings reach the client; already-mutated, opted-out and non-Knative pods pass
  untouched; with the webhook down the shipped failurePolicy decides.
* The two ServiceAccounts can do what they need and nothing more.

There is no Service DNS and no kube-proxy here, so after the bootstrap the test re-points the
shipped webhook from ``clientConfig.service`` to ``clientConfig.url: https://127.0.0.1:PORT/...``
(keeping the caBundle the webhook wrote); the webhook runs with ``--extra-san 127.0.0.1`` so its
bootstrapped certificate is valid for that address.

config/ does not ship the Namespace ``knative-serving``: Knative Serving's own install creates it
(a requirement of the add-on), so the tests create it, and prove the install needs it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import difflib
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from testbed.apiserver import ApiServer, die_with_parent_argv
from testbed.processes import free_port
from tests.knative_pods import knative_pod, queue_proxy, user_container
from tests.test_mutation import apply_patch
from webhook import certs
from webhook.cluster import ConflictError, KubeCluster
from webhook.mutation import (
    ANNOTATION_ENABLED,
    ANNOTATION_GRACE,
    LABEL_ADDED,
    LABEL_VERSION,
    MUTATION_VERSION,
    PROXY_CONTAINER_NAME,
    STATE_VOLUME_NAME,
    VOLUME_NAME,
    MutationSettings,
    mutate,
    projected_volume,
    proxy_container,
)

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
SYSTEM_NS = "knative-serving"
PROXY_IMAGE = "registry.invalid/freeze-proxy:apiserver-test"
SETTINGS = MutationSettings(proxy_image=PROXY_IMAGE)
KNATIVE_LABEL = "serving.knative.dev/configuration"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SA_TOKEN_PREFIX = "kube-api-access-"  # the ServiceAccount admission plugin's token volume


# --- what config/ ships ---------------------------------------------------------------------------


def shipped_objects() -> list[dict[str, Any]]:
    """The objects ``kubectl apply -f config/`` reads (top-level *.yaml only)."""
    return [
        doc
        for path in sorted(CONFIG.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def shipped(kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [
        o
        for o in shipped_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    return obj


MWC = shipped("MutatingWebhookConfiguration")
MWC_NAME: str = MWC["metadata"]["name"]
HOOK: dict[str, Any] = MWC["webhooks"][0]
HOOK_PATH: str = HOOK["clientConfig"]["service"]["path"]
SECRET_NAME: str = shipped("Secret")["metadata"]["name"]
CONFIG_MAP: str = shipped("ConfigMap")["metadata"]["name"]
WEBHOOK_SA: str = shipped("Deployment", "freezer-webhook")["spec"]["template"]["spec"][
    "serviceAccountName"
]
# Every runtime's DaemonSet runs as the same ServiceAccount (tests/test_manifests.py checks it).
DAEMON_SA: str = shipped("DaemonSet", "freeze-daemon-containerd")["spec"]["template"]["spec"][
    "serviceAccountName"
]
SERVICE_NAME: str = HOOK["clientConfig"]["service"]["name"]
EXPECTED_OBJECTS = {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in shipped_objects()}


# --- kubectl helpers ------------------------------------------------------------------------------


def kjson(api: ApiServer, *args: str, input: str | None = None) -> Any:
    return json.loads(api.kubectl(*args, "-o", "json", input=input).stdout)


def outcomes(stdout: str) -> dict[str, str]:
    """``kubectl apply`` output -> {"kind/name": "created" | "unchanged" | ...}."""
    result = {}
    for line in stdout.splitlines():
        ref, _, outcome = line.strip().partition(" ")
        resource, _, name = ref.partition("/")
        result[f"{resource.split('.')[0]}/{name}"] = outcome
    return result


# A PodDisruptionBudget's selector has patchStrategy "replace": kubectl's client-side patch for it
# is never empty, so a re-apply says "configured" though nothing changes (its resourceVersion
# stays; test_config_installs_with_apply_f_and_apply_k checks that).
ALWAYS_PATCHED = {f"poddisruptionbudget/{o['metadata']['name']}" for o in shipped_objects()
                  if o["kind"] == "PodDisruptionBudget"}  # fmt: skip


def assert_applied(proc: subprocess.CompletedProcess[str], outcome: str) -> None:
    """Every shipped object, each with ``outcome``, and no warning at all."""
    assert proc.returncode == 0, proc.stderr
    expected = dict.fromkeys(EXPECTED_OBJECTS, outcome)
    for ref in ALWAYS_PATCHED:
        expected[ref] = outcome.replace("unchanged", "configured")
    assert outcomes(proc.stdout) == expected, proc.stdout
    assert proc.stderr == "", proc.stderr


def resource_versions(api: ApiServer) -> dict[str, str]:
    listed = kjson(api, "get", "-f", str(CONFIG))
    return {
        f"{o['kind'].lower()}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
        for o in listed["items"]
    }


def assert_installed(api: ApiServer) -> None:
    listed = kjson(api, "get", "-f", str(CONFIG))
    got = {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in listed["items"]}
    assert got == EXPECTED_OBJECTS
    for obj in listed["items"]:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "freeze-proxy"


def ensure_system_namespace(api: ApiServer) -> None:
    if api.kubectl("get", "namespace", SYSTEM_NS, check=False).returncode != 0:
        api.kubectl("create", "namespace", SYSTEM_NS)


def create_namespace(api: ApiServer, prefix: str) -> str:
    """A namespace with the ``default`` ServiceAccount (no controller manager makes it here)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    items = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": name},
        },
    ]
    api.kubectl(
        "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    return name


def read_secret(api: ApiServer) -> dict[str, Any]:
    return kjson(api, "-n", SYSTEM_NS, "get", "secret", SECRET_NAME)  # type: ignore[no-any-return]


def secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def read_mwc(api: ApiServer) -> dict[str, Any]:
    return kjson(api, "get", "mutatingwebhookconfiguration", MWC_NAME)  # type: ignore[no-any-return]


def ca_bundle(mwc: dict[str, Any]) -> bytes:
    return base64.b64decode(mwc["webhooks"][0]["clientConfig"].get("caBundle", ""))


# --- the webhook process --------------------------------------------------------------------------


def served_certificate(port: int, ca_pem: bytes) -> bytes:
    """Connect as the API server does (trusting only ``ca_pem``, checking the name 127.0.0.1),
    GET /healthz, and return the DER certificate served."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response
    assert der is not None
    return der


@dataclass
class Webhook:
    """``python -m webhook`` as its own ServiceAccount, on a fixed loopback port."""

    api: ApiServer
    kubeconfig: Path
    log_file: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Recorded by the fixture for the tests to assert on:
    secret_before: dict[str, Any] = field(default_factory=dict)
    mwc_before: dict[str, Any] = field(default_factory=dict)
    secret_bootstrapped: dict[str, Any] = field(default_factory=dict)
    mwc_bootstrapped: dict[str, Any] = field(default_factory=dict)
    reapply: subprocess.CompletedProcess[str] | None = None
    served_der: bytes = b""
    args: tuple[str, ...] = ()  # more flags
    namespace: str = SYSTEM_NS
    secret_name: str = SECRET_NAME

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{HOOK_PATH}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log_file.open("ab") as log:
            # Not a preexec_fn: a fork() beside the test process's gRPC channels can abort the
            # child (die_with_parent_argv says why).
            argv, preexec = die_with_parent_argv(
                [
                    sys.executable, "-m", "webhook",
                    "--kubeconfig", str(self.kubeconfig),
                    "--listen", f"127.0.0.1:{self.port}",
                    "--proxy-image", PROXY_IMAGE,
                    "--extra-san", "127.0.0.1",
                    "--drain-delay", "0.5s",
                    "--config-refresh", "0.2s",
                    *self.args,
                ]
            )  # fmt: skip
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=preexec,
            )

    def stop(self) -> int:
        """SIGTERM, as kubelet does; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_serving(self, timeout: float = 30.0) -> bytes:
        """Until the Secret holds a CA and the process serves a certificate it verifies for
        127.0.0.1; returns that certificate (DER)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"webhook exited with {self.proc.returncode}:\n{self.log_tail()}")
            secret = kjson(self.api, "-n", self.namespace, "get", "secret", self.secret_name)
            ca = secret_data(secret).get(certs.CA_CERT_KEY)
            if ca:
                try:
                    self.served_der = served_certificate(self.port, ca)
                    return self.served_der
                except (OSError, ssl.SSLError) as err:
                    last = err
            time.sleep(0.1)
        pytest.fail(f"webhook not serving after {timeout}s ({last}):\n{self.log_tail()}")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        out = []
        for line in self.log_file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_tail(self) -> str:
        return "\n".join(self.log_file.read_text().splitlines()[-30:])

    def reviews_in(self, namespace: str) -> list[dict[str, Any]]:
        """Log lines of the reviews the webhook answered for pods of ``namespace``."""
        return [r for r in self.records() if str(r.get("pod", "")).startswith(f"{namespace}/")]


def sa_kubeconfig(api: ApiServer, path: Path) -> Path:
    """A kubeconfig with a TokenRequest token of the webhook's ServiceAccount."""
    token = api.kubectl(
        "-n", SYSTEM_NS, "create", "token", WEBHOOK_SA, "--duration", "1h"
    ).stdout.strip()
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "testbed",
                        "cluster": {"server": api.url, "certificate-authority": str(api.ca_file)},
                    }
                ],
                "users": [{"name": WEBHOOK_SA, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": WEBHOOK_SA}}],
                "current-context": "sa",
            }
        )
    )
    path.chmod(0o600)
    return path


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(apiserver: ApiServer) -> Iterator[ApiServer]:
    """config/ as shipped on the session's API server: the Secret empty, no caBundle (whatever
    an earlier module left is reset). At the end the webhook configuration is removed, so no
    other module's pods are sent to a webhook that is gone."""
    ensure_system_namespace(apiserver)
    apiserver.kubectl("-n", SYSTEM_NS, "delete", "secret", SECRET_NAME, "--ignore-not-found")
    apiserver.kubectl("delete", "mutatingwebhookconfiguration", MWC_NAME, "--ignore-not-found")
    apiserver.kubectl("apply", "-f", str(CONFIG))
    try:
        yield apiserver
    finally:
        apiserver.kubectl(
            "delete", "mutatingwebhookconfiguration", MWC_NAME, "--ignore-not-found", check=False
        )


@pytest.fixture(scope="module")
def webhook(installed: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    """The real webhook bootstrapped against the shipped objects, then registered by URL."""
    api = installed
    tmp = tmp_path_factory.mktemp("webhook")
    wh = Webhook(api, sa_kubeconfig(api, tmp / "kubeconfig"), tmp / "webhook.log")
    wh.secret_before = read_secret(api)
    wh.mwc_before = read_mwc(api)
    wh.start()
    try:
        wh.wait_serving()
        # The caBundle is patched right after the Secret is written; wait for it too.
        deadline = time.monotonic() + 10
        while not ca_bundle(mwc := read_mwc(api)) and time.monotonic() < deadline:
            time.sleep(0.1)
        wh.mwc_bootstrapped = mwc
        wh.secret_bootstrapped = read_secret(api)
        # Re-applying config/ must keep what the webhook wrote (README's promise).
        wh.reapply = api.kubectl("apply", "-f", str(CONFIG), check=False)
        # No Service DNS here: point the shipped webhook at the process by URL, keeping the
        # caBundle the webhook wrote (the test op guards against patching another webhook).
        api.kubectl(
            "patch", "mutatingwebhookconfiguration", MWC_NAME, "--type=json", "-p",
            json.dumps(
                [
                    {"op": "test", "path": "/webhooks/0/name", "value": HOOK["name"]},
                    {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
                    {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": wh.url},
                ]
            ),
        )  # fmt: skip
        wait_until_called(api, wh)
        yield wh
    finally:
        wh.stop()


def wait_until_called(api: ApiServer, wh: Webhook, timeout: float = 15.0) -> None:
    """The API server picks webhook configurations up asynchronously: dry-run a Knative pod
    until it comes back mutated."""
    ns = create_namespace(api, "fp-wh-probe")
    pod = knative_pod()
    pod["metadata"]["namespace"] = ns
    deadline = time.monotonic() + timeout
    while True:
        out = kjson(api, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        if LABEL_ADDED in out["metadata"].get("labels", {}):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the API server never called the webhook:\n{wh.log_tail()}")
        time.sleep(0.2)


@pytest.fixture
def ns(installed: ApiServer) -> str:
    return create_namespace(installed, "fp-wh")


# --- pod helpers ----------------------------------------------------------------------------------


def create_pod(
    api: ApiServer, pod: dict[str, Any], *, dry_run: bool = False
) -> tuple[dict[str, Any], str]:
    """Create through the API with kubectl: (the stored pod, kubectl's stderr)."""
    args = ["create", "-f", "-", "-o", "json", *(["--dry-run=server"] if dry_run else [])]
    proc = api.kubectl(*args, input=json.dumps(pod))
    return json.loads(proc.stdout), proc.stderr


def pod_in(namespace: str, **kwargs: Any) -> dict[str, Any]:
    pod = knative_pod(**kwargs)
    pod["metadata"]["namespace"] = namespace
    return pod


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{len(found)} containers named {name}"
    return found[0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def contains(actual: Any, expected: Any, path: str = "") -> None:
    """``expected`` is in ``actual`` (the API server only adds defaults): dicts by key, lists
    element by element, everything else equal."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} missing"
            contains(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            contains(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def normalized(pod: dict[str, Any]) -> dict[str, Any]:
    """Labels, annotations and spec, with the ServiceAccount plugin's randomly named token
    volume given one name and the volumes in name order (the order of admission steps decides
    theirs), so two admissions of the same pod compare equal."""
    spec = copy.deepcopy(pod["spec"])
    spec["volumes"] = sorted(spec.get("volumes", []), key=lambda v: str(v["name"]))
    text = json.dumps(
        {
            "labels": pod["metadata"].get("labels"),
            "annotations": pod["metadata"].get("annotations"),
            "spec": spec,
        }
    )
    return json.loads(re.sub(SA_TOKEN_PREFIX + r"[a-z0-9]{5}", SA_TOKEN_PREFIX + "x", text))  # type: ignore[no-any-return]


def assert_same_pod(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    a, e = normalized(actual), normalized(expected)
    if a != e:
        diff = difflib.unified_diff(
            json.dumps(e, indent=1, sort_keys=True).splitlines(),
            json.dumps(a, indent=1, sort_keys=True).splitlines(),
            "expected",
            "actual",
            lineterm="",
        )
        pytest.fail("\n".join(diff))


def assert_untouched(pod: dict[str, Any]) -> None:
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["user-container", "queue-proxy"]
    assert env(container(pod, "queue-proxy"))["USER_PORT"] == "8080"
    labels = pod["metadata"]["labels"]
    assert LABEL_ADDED not in labels and LABEL_VERSION not in labels
    assert not any(v["name"].startswith(VOLUME_NAME) for v in pod["spec"].get("volumes", []))


# --- 1. config/ installs ----------------------------------------------------------------------


def test_config_installs_with_apply_f_and_apply_k(k8s_binaries: dict[str, Path]) -> None:
    """On a private, fresh API server (the install must not depend on earlier state): dry-run
    (the server's validation of every object), apply -f, re-apply -k, server-side apply over
    client-side apply and back, delete, apply -k fresh, server-side apply fresh."""
    assert not [o for o in shipped_objects() if o["kind"] == "Namespace"], (
        "config/ relies on Knative Serving's install for the namespace knative-serving"
    )
    with ApiServer(
        etcd_bin=k8s_binaries["etcd"],
        apiserver_bin=k8s_binaries["kube-apiserver"],
        kubectl_bin=k8s_binaries["kubectl"],
    ) as api:
        # Without Knative Serving (its namespace) the install is refused, and says why.
        refused = api.kubectl("apply", "--dry-run=server", "-f", str(CONFIG), check=False)
        assert refused.returncode != 0
        assert f'namespaces "{SYSTEM_NS}" not found' in refused.stderr
        api.kubectl("create", "namespace", SYSTEM_NS)

        assert_applied(
            api.kubectl("apply", "--dry-run=server", "-f", str(CONFIG), check=False),
            "created (server dry run)",
        )
        assert_applied(api.kubectl("apply", "-f", str(CONFIG), check=False), "created")
        assert_installed(api)
        assert secret_data(read_secret(api)) == {}
        assert "caBundle" not in read_mwc(api)["webhooks"][0]["clientConfig"]
        versions = resource_versions(api)
        assert_applied(api.kubectl("apply", "-k", str(CONFIG), check=False), "unchanged")
        assert_applied(api.kubectl("apply", "-f", str(CONFIG), check=False), "unchanged")
        assert resource_versions(api) == versions  # nothing changed, whatever kubectl says
        assert_applied(
            api.kubectl("apply", "--dry-run=server", "-k", str(CONFIG), check=False),
            "unchanged (server dry run)",
        )
        # An operator (or a GitOps tool) moving to server-side apply: no field conflicts.
        assert_applied(
            api.kubectl("apply", "--server-side", "-f", str(CONFIG), check=False),
            "serverside-applied",
        )
        assert_applied(
            api.kubectl("apply", "--server-side", "-k", str(CONFIG), check=False),
            "serverside-applied",
        )
        back = api.kubectl("apply", "-f", str(CONFIG), check=False)
        assert back.returncode == 0, back.stderr

        # A fresh install with -k.
        api.kubectl("delete", "-k", str(CONFIG), "--wait=true")
        gone = api.kubectl("get", "-f", str(CONFIG), "--ignore-not-found", "-o", "name")
        assert gone.stdout.strip() == ""
        assert_applied(api.kubectl("apply", "-k", str(CONFIG), check=False), "created")
        assert_installed(api)
        assert_applied(api.kubectl("apply", "-f", str(CONFIG), check=False), "unchanged")

        # A fresh server-side install.
        api.kubectl("delete", "-f", str(CONFIG), "--wait=true")
        assert_applied(
            api.kubectl("apply", "--server-side", "-f", str(CONFIG), check=False),
            "serverside-applied",
        )
        assert_installed(api)


# --- 2. TLS bootstrap -----------------------------------------------------------------------------


def test_webhook_bootstraps_secret_and_ca_bundle(webhook: Webhook) -> None:
    api = webhook.api
    # What config/ shipped: an empty Secret, no caBundle.
    assert secret_data(webhook.secret_before) == {}
    assert "caBundle" not in webhook.mwc_before["webhooks"][0]["clientConfig"]

    secret = webhook.secret_bootstrapped
    data = secret_data(secret)
    assert set(data) == set(certs.SECRET_KEYS)
    assert secret["type"] == "Opaque"
    # The webhook wrote only the data: the Secret's labels and kubectl's annotation are intact
    # (a replace used to drop them, so every later `kubectl apply` warned and re-patched).
    before = webhook.secret_before["metadata"]
    assert secret["metadata"].get("labels") == before["labels"]
    annotations = secret["metadata"].get("annotations") or {}
    assert annotations.get(LAST_APPLIED) == before["annotations"][LAST_APPLIED]

    # The caBundle the webhook patched into the shipped configuration is the CA in the Secret.
    assert ca_bundle(webhook.mwc_bootstrapped) == data[certs.CA_CERT_KEY]
    assert (
        webhook.mwc_bootstrapped["webhooks"][0]["clientConfig"]["service"]
        == (HOOK["clientConfig"]["service"])
    )
    assert ca_bundle(read_mwc(api)) == data[certs.CA_CERT_KEY]

    # The serving certificate: the Service's names plus --extra-san, signed by that CA, and the
    # one the process serves.
    server = x509.load_pem_x509_certificate(data[certs.SERVER_CERT_KEY])
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(data[certs.CA_CERT_KEY]))
    assert certs.server_sans(data[certs.SERVER_CERT_KEY]) == [
        *certs.dns_names(SERVICE_NAME, SYSTEM_NS),
        "127.0.0.1",
    ]
    assert webhook.served_der == server.public_bytes(Encoding.DER)

    msgs = [r["msg"] for r in webhook.records()]
    assert msgs.count("stored new webhook certificates") == 1
    assert msgs.count("patched caBundle") == 1

    # Re-applying config/ afterwards changes nothing and keeps the certificates and caBundle.
    assert webhook.reapply is not None
    assert_applied(webhook.reapply, "unchanged")
    assert read_secret(api)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]


async def test_concurrent_secret_write_is_a_conflict(webhook: Webhook) -> None:
    """The webhook's Secret write is guarded by resourceVersion on the real server too (so
    replicas starting together settle on one CA), with the ServiceAccount's own rights."""
    cluster = KubeCluster.from_config(str(webhook.kubeconfig))
    stored = await cluster.read_secret(SYSTEM_NS, SECRET_NAME)
    assert stored is not None and set(stored.data) == set(certs.SECRET_KEYS)
    stale = str(int(stored.resource_version) - 1)
    with pytest.raises(ConflictError):
        await cluster.write_secret(SYSTEM_NS, SECRET_NAME, {"ca-cert.pem": b"x"}, stale)
    after = read_secret(webhook.api)
    assert after["metadata"]["resourceVersion"] == stored.resource_version
    assert secret_data(after) == stored.data


def test_restart_causes_no_churn(webhook: Webhook, ns: str) -> None:
    api = webhook.api
    secret, mwc = read_secret(api), read_mwc(api)
    served = webhook.served_der
    seen = len(webhook.records())

    assert webhook.stop() == 0  # SIGTERM: a clean exit
    webhook.start()
    assert webhook.wait_serving() == served  # the same certificate, from the Secret

    after_secret, after_mwc = read_secret(api), read_mwc(api)
    assert after_secret["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    assert after_mwc["metadata"]["resourceVersion"] == mwc["metadata"]["resourceVersion"]
    assert ca_bundle(after_mwc) == ca_bundle(mwc)
    new_msgs = [r["msg"] for r in webhook.records()[seen:]]
    assert "freeze-webhook serving" in new_msgs
    assert "stored new webhook certificates" not in new_msgs
    assert "patched caBundle" not in new_msgs
    # And the API server keeps calling it with the caBundle it already had.
    created, _ = create_pod(api, pod_in(ns))
    assert container(created, PROXY_CONTAINER_NAME)


def test_two_replicas_starting_at_once_settle_on_one_ca(
    installed: ApiServer, tmp_path: Path
) -> None:
    """config/ runs two replicas, which a fresh install starts at the same moment: both find
    the Secret empty, one write wins (resourceVersion), the other adopts it, and both serve
    certificates of the one CA in the caBundle. (Own Secret and webhook configuration, so the
    module's webhook is undisturbed; the admin's credentials, RBAC is tested above.)"""
    api = installed
    ns = create_namespace(api, "fp-two")
    secret, config = "two-replicas-certs", f"two-replicas-{ns}.freeze.test"
    hook = {
        "name": "two-replicas.freeze.test",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"url": "https://127.0.0.1:1/defaulting"},
        "rules": [copy.deepcopy(HOOK["rules"][0])],
        "objectSelector": {"matchLabels": {"freeze-test/never": "true"}},
        "sideEffects": "None",
        "failurePolicy": "Ignore",
    }
    objects = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": ns}},
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": config},
            "webhooks": [hook],
        },
    ]
    api.kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )
    flags = ("--namespace", ns, "--secret-name", secret, "--webhook-config-name", config)
    replicas = [
        Webhook(api, api.kubeconfig, tmp_path / f"replica{i}.log", args=flags, namespace=ns,
                secret_name=secret)
        for i in range(2)
    ]  # fmt: skip
    try:
        for replica in replicas:
            replica.start()
        served = [replica.wait_serving() for replica in replicas]
        data = secret_data(kjson(api, "-n", ns, "get", "secret", secret))
        ca = x509.load_pem_x509_certificate(data[certs.CA_CERT_KEY])
        for der in served:
            x509.load_der_x509_certificate(der).verify_directly_issued_by(ca)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mwc = kjson(api, "get", "mutatingwebhookconfiguration", config)
            if ca_bundle(mwc):
                break
            time.sleep(0.1)
        assert ca_bundle(mwc) == data[certs.CA_CERT_KEY]
        msgs = [r["msg"] for replica in replicas for r in replica.records()]
        assert msgs.count("stored new webhook certificates") == 1, msgs
    finally:
        for replica in replicas:
            if replica.proc is not None:
                replica.stop()
        api.kubectl("delete", "mutatingwebhookconfiguration", config, check=False)


# --- 3. the API server calls it -------------------------------------------------------------------


def test_knative_pod_is_mutated_exactly_as_intended(webhook: Webhook, ns: str) -> None:
    api = webhook.api
    pod = pod_in(ns)
    created, stderr = create_pod(api, pod)
    assert "Warning" not in stderr, stderr
    assert created["metadata"]["uid"]  # stored: it passed the API server's own validation
    assert created["status"]["phase"] == "Pending"

    labels = created["metadata"]["labels"]
    assert labels[LABEL_ADDED] == "true"
    assert labels[LABEL_VERSION] == MUTATION_VERSION
    assert labels.items() >= pod["metadata"]["labels"].items()
    assert [c["name"] for c in created["spec"]["containers"]] == [
        "user-container",
        "queue-proxy",
        PROXY_CONTAINER_NAME,
    ]

    # The projected token the daemon reviews.
    (volume,) = [v for v in created["spec"]["volumes"] if v["name"] == VOLUME_NAME]
    contains(volume, projected_volume(VOLUME_NAME))
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "audience": "freeze",
        "expirationSeconds": 600,
        "path": "token",
    }

    # queue-proxy now sends to freeze-proxy, and asks freeze-proxy's /ready/tcp/8080 whether
    # the path to the app works (instead of a TCP connect to the app); nothing else changed.
    queue, original_queue = container(created, "queue-proxy"), container(pod, "queue-proxy")
    assert env(queue)["USER_PORT"] == str(SETTINGS.proxy_port) == "9999"
    ready = {
        "path": "/ready/tcp/8080",
        "port": 9998,
        "host": "127.0.0.1",
        "scheme": "HTTP",
        "httpHeaders": [{"name": "Freeze-Probe-Timeout", "value": "1"}],
    }
    assert json.loads(env(queue)["SERVING_READINESS_PROBE"]) == {
        "httpGet": ready,
        "successThreshold": 1,
    }
    expected_env = copy.deepcopy(original_queue["env"])
    for entry in expected_env:
        if entry["name"] == "USER_PORT":
            entry["value"] = "9999"
        if entry["name"] == "SERVING_READINESS_PROBE":
            entry["value"] = env(queue)["SERVING_READINESS_PROBE"]
        if entry.get("value") == "":
            del entry["value"]  # the API server stores an empty value as none
    contains(queue["env"], expected_env)

    # freeze-proxy exactly as the pure mutation builds it (plus the API server's defaults).
    user = container(pod, "user-container")
    proxy = container(created, PROXY_CONTAINER_NAME)
    intended = proxy_container(
        SETTINGS, "user-container", 8080, VOLUME_NAME, pre_stop=user["lifecycle"]["preStop"]
    )
    contains(
        {k: v for k, v in proxy.items() if k != "volumeMounts"},
        {k: v for k, v in intended.items() if k != "volumeMounts"},
    )
    assert proxy["image"] == PROXY_IMAGE
    assert proxy["args"] == [
        "--listen", "0.0.0.0:9999",
        "--health-listen", "0.0.0.0:9998",
        "--upstream", "http://127.0.0.1:8080",
        "--container", "user-container",
    ]  # fmt: skip
    assert env(proxy) == {
        "HOST_IP": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}},
    }
    assert proxy["readinessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": 9998,
        "scheme": "HTTP",
    }
    assert proxy["securityContext"] == intended["securityContext"]
    # Its token, read-only; after the webhook the ServiceAccount admission plugin mounts the
    # pod's API token into the new container too, as into every other one (nothing more).
    sa_mounts = [
        m for m in container(created, "user-container")["volumeMounts"]
        if m["name"].startswith(SA_TOKEN_PREFIX)
    ]  # fmt: skip
    assert proxy["volumeMounts"] == [
        {"name": VOLUME_NAME, "mountPath": "/var/run/projected", "readOnly": True},
        {"name": STATE_VOLUME_NAME, "mountPath": "/var/run/freeze-proxy"},
        *sa_mounts,
    ]
    # Where a restarted freeze-proxy learns that the app may have been left frozen.
    (state,) = [v for v in created["spec"]["volumes"] if v["name"] == STATE_VOLUME_NAME]
    assert state["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert proxy["lifecycle"] == user["lifecycle"]

    # Exactly the pure mutation: the locally computed result, admitted by the same server (the
    # webhook skips it as already mutated), is the same pod.
    result = mutate(pod, SETTINGS)
    local, _ = create_pod(api, apply_patch(pod, result.patch), dry_run=True)
    assert_same_pod(created, local)

    (review,) = [r for r in webhook.reviews_in(ns) if r.get("action") == "mutated"]
    assert review["reason"] == result.reason


def test_invalid_grace_is_admitted_with_the_default_and_a_warning(
    webhook: Webhook, ns: str
) -> None:
    annotations = {ANNOTATION_GRACE: "soon"}
    (warning,) = mutate(pod_in(ns, annotations=annotations), SETTINGS).warnings
    created, stderr = create_pod(webhook.api, pod_in(ns, annotations=annotations))
    assert f"Warning: {warning}" in stderr  # the admission warning reached the client
    proxy = container(created, PROXY_CONTAINER_NAME)
    assert "FREEZE_GRACE" not in env(proxy)  # freeze-proxy's default grace applies

    created, stderr = create_pod(webhook.api, pod_in(ns, annotations={ANNOTATION_GRACE: "2s"}))
    assert "Warning" not in stderr, stderr
    assert env(container(created, PROXY_CONTAINER_NAME))["FREEZE_GRACE"] == "2s"


def with_resources(c: dict[str, Any], cpu: str, memory: str, *, equal: bool = True) -> None:
    c["resources"] = {
        "requests": {"cpu": cpu if equal else "10m", "memory": memory},
        "limits": {"cpu": cpu, "memory": memory},
    }


def test_namespace_with_a_limits_cpu_quota_accepts_the_mutated_pod(
    webhook: Webhook, ns: str
) -> None:
    """The ResourceQuota admission plugin refuses a pod with any container lacking limits.cpu
    in a namespace whose quota has limits.cpu: the sidecar must bring its own."""
    api = webhook.api
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "cpu", "namespace": ns},
        "spec": {"hard": {"limits.cpu": "10", "limits.memory": "10Gi"}},
    }
    api.kubectl("create", "-f", "-", input=json.dumps(quota))
    # No controller manager here: record the quota's status as its controller would.
    used = {"limits.cpu": "0", "limits.memory": "0"}
    status = {"status": {"hard": quota["spec"]["hard"], "used": used}}
    api.kubectl(
        "-n", ns, "patch", "resourcequota", "cpu", "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    pod = pod_in(ns)
    for c in pod["spec"]["containers"]:
        with_resources(c, "500m", "256Mi", equal=False)
    created, stderr = create_pod(api, pod)
    assert "Warning" not in stderr, stderr
    proxy = container(created, PROXY_CONTAINER_NAME)
    assert "cpu" in proxy["resources"]["limits"]
    used = kjson(api, "-n", ns, "get", "resourcequota", "cpu")["status"]["used"]
    assert used["limits.cpu"] == "2"  # 500m + 500m + the sidecar's 1


def test_guaranteed_pod_stays_guaranteed(webhook: Webhook, ns: str) -> None:
    """status.qosClass is computed by the API server when it stores the pod."""
    pod = pod_in(ns)
    with_resources(container(pod, "user-container"), "500m", "256Mi")
    with_resources(container(pod, "queue-proxy"), "100m", "64Mi")
    created, stderr = create_pod(webhook.api, pod)
    assert "Warning" not in stderr, stderr
    assert PROXY_CONTAINER_NAME in [c["name"] for c in created["spec"]["containers"]]
    assert created["status"]["qosClass"] == "Guaranteed"
    # And a Burstable one stays Burstable, with small requests for the sidecar.
    pod = pod_in(ns)
    with_resources(container(pod, "user-container"), "500m", "256Mi", equal=False)
    created, _ = create_pod(webhook.api, pod)
    assert created["status"]["qosClass"] == "Burstable"
    proxy = container(created, PROXY_CONTAINER_NAME)
    assert proxy["resources"]["requests"] == {"cpu": "10m", "memory": "32Mi"}


def test_cluster_defaults_come_from_the_configmap(webhook: Webhook, ns: str) -> None:
    """An operator edits config-freeze-proxy; pods created from then on get its values (the
    webhook reads it with its own ServiceAccount), a bad value is refused with a log line and
    the built-in default applies, and an annotation still wins for its Service."""
    api = webhook.api
    shipped_data = shipped("ConfigMap")["data"]

    def set_data(data: dict[str, str]) -> None:
        patch = [{"op": "replace", "path": "/data", "value": data}]
        api.kubectl("-n", SYSTEM_NS, "patch", "configmap", CONFIG_MAP, "--type=json",
                    "-p", json.dumps(patch))  # fmt: skip

    def proxy_of(pod: dict[str, Any]) -> dict[str, Any]:
        created, _ = create_pod(api, pod, dry_run=True)
        return container(created, PROXY_CONTAINER_NAME)

    def until(check: Any, pod: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while not check(proxy := proxy_of(pod)):
            if time.monotonic() > deadline:
                pytest.fail(f"ConfigMap change never applied: {proxy['resources']}")
            time.sleep(0.1)
        return proxy

    try:
        set_data({**shipped_data, "cpu-limit": "2", "memory-limit": "256Mi", "grace": "3s",
                  "cpu-request": "lots"})  # fmt: skip
        proxy = until(lambda p: p["resources"]["limits"]["cpu"] == "2", pod_in(ns))
        assert proxy["resources"] == {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "2", "memory": "256Mi"},
        }
        assert env(proxy)["FREEZE_GRACE"] == "3s"
        (loaded,) = [r for r in webhook.records() if r.get("settings", {}).get("cpu_limit") == "2"]
        assert loaded["level"] == "warning"
        (warning,) = loaded["warnings"]
        assert f"ConfigMap {CONFIG_MAP} key cpu-request='lots' refused" in warning
        annotated = pod_in(ns, annotations={"freeze-proxy.knative.dev/cpu-limit": "3"})
        assert proxy_of(annotated)["resources"]["limits"]["cpu"] == "3"
    finally:
        set_data(shipped_data)
    until(lambda p: p["resources"]["limits"]["cpu"] == "1", pod_in(ns))


def test_second_admission_is_a_no_op(webhook: Webhook, ns: str) -> None:
    api = webhook.api
    first, _ = create_pod(api, pod_in(ns))
    again = copy.deepcopy(first)
    meta = again["metadata"]
    for key in ("name", "uid", "resourceVersion", "creationTimestamp", "managedFields"):
        meta.pop(key, None)
    again.pop("status", None)
    before = len(webhook.reviews_in(ns))
    second, stderr = create_pod(api, again, dry_run=True)
    assert "Warning" not in stderr, stderr
    assert_same_pod(second, first)
    (review,) = webhook.reviews_in(ns)[before:]  # it was asked, and declined
    assert review["action"] == "skipped"
    assert LABEL_ADDED in review["reason"]


def test_opted_out_pod_is_untouched(webhook: Webhook, ns: str) -> None:
    created, stderr = create_pod(webhook.api, pod_in(ns, annotations={ANNOTATION_ENABLED: "false"}))
    assert "Warning" not in stderr, stderr
    assert_untouched(created)
    (review,) = webhook.reviews_in(ns)
    assert review["action"] == "skipped" and "opted out" in review["reason"]


def test_non_knative_pod_is_not_even_sent_to_the_webhook(webhook: Webhook, ns: str) -> None:
    pod = pod_in(ns)
    del pod["metadata"]["labels"][KNATIVE_LABEL]  # a queue-proxy shape, but no Knative label
    created, stderr = create_pod(webhook.api, pod)
    assert stderr == ""
    assert_untouched(created)
    assert webhook.reviews_in(ns) == []  # objectSelector: the API server never called it


def test_h2c_revision_is_admitted_unchanged_with_a_warning(webhook: Webhook, ns: str) -> None:
    """An h2c (gRPC) revision as Knative makes it: only queue-proxy's serving port says so."""
    pod = pod_in(ns, containers=[user_container(), queue_proxy(h2c=True)])
    created, stderr = create_pod(webhook.api, pod)
    assert "Warning: freeze-proxy not injected" in stderr and "h2c" in stderr, stderr
    assert_untouched(created)
    (review,) = webhook.reviews_in(ns)
    assert review["action"] == "skipped" and "h2c" in review["reason"]


def test_exec_probes_on_the_app_are_admitted_unchanged_with_a_warning(
    webhook: Webhook, ns: str
) -> None:
    """Exec probes Knative leaves on the user container would fail once it is frozen."""
    user = user_container()
    user["livenessProbe"] = {"exec": {"command": ["/bin/true"]}, "periodSeconds": 10}
    user["readinessProbe"] = {"exec": {"command": ["/bin/true"]}}
    created, stderr = create_pod(webhook.api, pod_in(ns, containers=[user, queue_proxy()]))
    assert "Warning: freeze-proxy not injected" in stderr, stderr
    assert "exec readinessProbe, exec livenessProbe" in stderr, stderr
    assert_untouched(created)
    assert container(created, "user-container")["livenessProbe"]["exec"] == {
        "command": ["/bin/true"]
    }


# --- 4. the webhook down --------------------------------------------------------------------------


def test_webhook_down_follows_the_shipped_failure_policy(webhook: Webhook, ns: str) -> None:
    policy = HOOK["failurePolicy"]
    assert read_mwc(webhook.api)["webhooks"][0]["failurePolicy"] == policy
    assert webhook.stop() == 0
    try:
        started = time.monotonic()
        proc = webhook.api.kubectl(
            "create", "-f", "-", "-o", "json", input=json.dumps(pod_in(ns)), check=False
        )
        elapsed = time.monotonic() - started
        if policy == "Ignore":
            assert proc.returncode == 0, proc.stderr
            assert_untouched(json.loads(proc.stdout))  # admitted, simply without freeze-proxy
        else:
            assert proc.returncode != 0
            assert f'failed calling webhook "{HOOK["name"]}"' in proc.stderr
        # Nothing listens: refused at once, not after timeoutSeconds.
        assert elapsed < HOOK["timeoutSeconds"], elapsed
    finally:
        webhook.start()
        webhook.wait_serving()


# --- 5. RBAC --------------------------------------------------------------------------------------


def can_i(api: ApiServer, account: str, *args: str, namespace: str = SYSTEM_NS) -> bool:
    proc = api.kubectl(
        "auth", "can-i", *args, "-n", namespace,
        f"--as=system:serviceaccount:{SYSTEM_NS}:{account}",
        check=False,
    )  # fmt: skip
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    return proc.stdout.strip() == "yes"


def resource_rules(api: ApiServer, user: str) -> set[tuple[str, str, str, str]]:
    """Every (verb, apiGroup, resource, resourceName) ``user`` may use in knative-serving."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": SYSTEM_NS},
    }
    out = kjson(
        api, "create", "--validate=false", "-f", "-", f"--as={user}", input=json.dumps(review)
    )
    assert not out["status"].get("incomplete"), out["status"]
    return {
        (verb, group, resource, name)
        for rule in out["status"]["resourceRules"]
        for verb in rule["verbs"]
        for group in rule.get("apiGroups", [""])
        for resource in rule["resources"]
        for name in rule.get("resourceNames") or ["*"]
    }


def granted(api: ApiServer, account: str) -> set[tuple[str, str, str, str]]:
    """What config/ grants ``account`` beyond what every ServiceAccount may do."""
    baseline = resource_rules(api, f"system:serviceaccount:{SYSTEM_NS}:freeze-test-nobody")
    return resource_rules(api, f"system:serviceaccount:{SYSTEM_NS}:{account}") - baseline


def test_webhook_service_account_can_do_its_job_and_nothing_more(installed: ApiServer) -> None:
    api = installed
    for verb in ("get", "update", "patch"):
        assert can_i(api, WEBHOOK_SA, verb, f"secrets/{SECRET_NAME}")
        assert can_i(api, WEBHOOK_SA, verb, f"mutatingwebhookconfigurations/{MWC_NAME}")
    denied = [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("get", "secrets/some-other-secret"),
        ("create", "secrets"),
        ("delete", f"secrets/{SECRET_NAME}"),
        ("list", "mutatingwebhookconfigurations"),
        ("patch", "mutatingwebhookconfigurations/someone-elses-webhook"),
        ("delete", f"mutatingwebhookconfigurations/{MWC_NAME}"),
        ("patch", f"validatingwebhookconfigurations/{MWC_NAME}"),
        ("create", "pods"),
        ("get", "pods"),
    ]
    for verb, resource in denied:
        assert not can_i(api, WEBHOOK_SA, verb, resource), (verb, resource)
    assert not can_i(api, WEBHOOK_SA, "get", f"secrets/{SECRET_NAME}", namespace="default")
    assert can_i(api, WEBHOOK_SA, "get", f"configmaps/{CONFIG_MAP}")
    assert not can_i(api, WEBHOOK_SA, "update", f"configmaps/{CONFIG_MAP}")
    assert not can_i(api, WEBHOOK_SA, "get", "configmaps/config-network")
    assert granted(api, WEBHOOK_SA) == {
        ("get", "", "configmaps", CONFIG_MAP),
        *((v, "", "secrets", SECRET_NAME) for v in ("get", "update", "patch")),
        *(
            (v, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", MWC_NAME)
            for v in ("get", "update", "patch")
        ),
    }


def test_daemon_service_account_may_only_review_tokens(installed: ApiServer) -> None:
    """freeze-tokenreview may create TokenReviews and nothing else: no pods, secrets, tokens,
    not even the SubjectAccessReviews system:auth-delegator would have bundled."""
    api = installed
    assert can_i(api, DAEMON_SA, "create", "tokenreviews.authentication.k8s.io")
    denied = [
        ("get", "pods"),
        ("list", "pods"),
        ("list", "secrets"),
        ("get", f"secrets/{SECRET_NAME}"),
        ("create", "serviceaccounts", "--subresource=token"),
        ("get", "nodes"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
    ]
    for args in denied:
        assert not can_i(api, DAEMON_SA, *args), args
    assert granted(api, DAEMON_SA) == {
        ("create", "authentication.k8s.io", "tokenreviews", "*"),
    }
