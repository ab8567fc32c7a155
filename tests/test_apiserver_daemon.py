"""The real ``python -m daemon`` against the real kube-apiserver: authentication end to end.

Nothing is minted or faked on the daemon's side: it runs with ``--kubeconfig`` acting as the
``freeze-tokenreview`` ServiceAccount of ``config/200-tokenreview-rbac.yaml`` (applied here, so
its RBAC is exercised for real), fetches the keys and issuer from the API server's
``/openid/v1/jwks`` and ``/.well-known/openid-configuration`` (no ``--jwks-file``), and confirms
every token with a real TokenReview. The tokens are real TokenRequest tokens bound to API pods;
each API pod has a CRI twin with the *same* uid on the test bed's containerd, so the pod a
token proves is the pod whose cgroup freezer the kernel reports.

The one forged token (``test_expired_token_is_refused_locally``) is signed with the API server's
own signing key: the API server cannot issue an already expired token (TokenRequest enforces a
minimum lifetime of 10 minutes), and a real key is what makes "expired" the only thing wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest

from testbed.apiserver import ApiServer
from testbed.containerd import Containerd
from testbed.kubeconfig import service_account_kubeconfig
from testbed.pods import Pod, PodClient, ticker
from testbed.processes import free_port, stop, wait_listening
from testbed.tokens import new_rsa_key
from tests.pod_checks import USER, eventually, log_grows, log_is_quiet

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parent.parent
RBAC = ROOT / "config" / "200-tokenreview-rbac.yaml"
AUDIENCE = "freeze"
APP_SA = "app"
REVIEW_TTL = 1.0  # the daemon's --review-cache-ttl here (default 30 s), so revocation is quick
APISERVER_AUTH_CACHE = 10.0  # kube-apiserver caches a successful token authentication this long


# --------------------------------------------------------------------------- the cluster side


@dataclass
class Cluster:
    api: ApiServer
    namespace: str  # where the test's pods and their ServiceAccount live

    def create_pod(self, name: str) -> str:
        """An API pod (it stays Pending: no kubelet); returns its uid."""
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "serviceAccountName": APP_SA,
                "automountServiceAccountToken": False,
                "containers": [{"name": USER, "image": "registry.invalid/app:1"}],
            },
        }
        out = self.api.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(manifest))
        uid: str = json.loads(out.stdout)["metadata"]["uid"]
        return uid

    def delete_pod(self, name: str) -> None:
        self.api.kubectl(
            "-n", self.namespace, "delete", "pod", name, "--wait=true", "--timeout=30s"
        )

    def pod_token(self, name: str, uid: str, *, audience: str = AUDIENCE) -> str:
        """A TokenRequest token bound to the pod, like the projected token kubelet mounts."""
        return self.api.kubectl(
            "-n", self.namespace, "create", "token", APP_SA,
            "--audience", audience,
            "--bound-object-kind", "Pod",
            "--bound-object-name", name,
            "--bound-object-uid", uid,
            "--duration", "10m",
        ).stdout.strip()  # fmt: skip


def _apply(api: ApiServer, manifest: dict[str, Any]) -> None:
    api.kubectl("apply", "-f", "-", input=json.dumps(manifest))


@pytest.fixture(scope="module")
def cluster(apiserver: ApiServer) -> Cluster:
    """The add-on's TokenReview RBAC applied as shipped, plus a namespace for the test pods."""
    return _prepare(apiserver)


def _prepare(apiserver: ApiServer) -> Cluster:
    # Idempotent: other tests may install (parts of) config/ into the same API server.
    _apply(
        apiserver,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "knative-serving"}},
    )
    apiserver.kubectl("apply", "-f", str(RBAC))
    namespace = f"daemon-{uuid.uuid4().hex[:8]}"
    apiserver.kubectl("create", "namespace", namespace)
    apiserver.kubectl("-n", namespace, "create", "serviceaccount", APP_SA)
    return Cluster(apiserver, namespace)


# --------------------------------------------------------------------------- the daemon process


@dataclass
class Daemon:
    url: str
    log_file: Path

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def _start_daemon(
    kubeconfig: Path, containerd: Containerd, log_file: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Daemon]:
    port = free_port()
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "daemon",
                f"--listen=127.0.0.1:{port}",
                f"--kubeconfig={kubeconfig}",
                "--runtime=containerd",
                f"--containerd-socket={containerd.socket}",
                f"--containerd-namespace={containerd.namespace}",
                *extra,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=log,
        )  # fmt: skip
    daemon = Daemon(f"http://127.0.0.1:{port}", log_file)
    try:
        wait_listening(proc, "127.0.0.1", port, "freeze-daemon", log_file)
    except RuntimeError:
        stop(proc)
        raise
    return proc, daemon


@pytest.fixture(scope="module")
def daemon(
    cluster: Cluster, containerd: Containerd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """freeze-daemon as the ``freeze-tokenreview`` ServiceAccount, keys from the API server."""
    work = tmp_path_factory.mktemp("apiserver-daemon")
    kubeconfig = service_account_kubeconfig(
        cluster.api, "knative-serving", "freeze-tokenreview", work / "kubeconfig"
    )
    proc, running = _start_daemon(
        kubeconfig,
        containerd,
        work / "daemon.log",
        f"--review-cache-ttl={REVIEW_TTL:g}s",
        f"--audience={AUDIENCE}",
    )
    try:
        yield running
        assert stop(proc) == 0, running.log_file.read_text()[-3000:]
    finally:
        stop(proc)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def pods(containerd: Containerd) -> AsyncIterator[PodClient]:
    """CRI pods on the test bed's containerd (removed at teardown)."""
    client = PodClient(containerd)
    try:
        yield client
    finally:
        for pod in list(client.pods):
            await pod.remove()
        await client.close()


async def twin_pod(cluster: Cluster, pods: PodClient, name: str) -> tuple[Pod, str]:
    """An API pod and its CRI twin with the same uid, its user-container ticking; + its token."""
    uid = cluster.create_pod(name)
    pod = await pods.create_pod([ticker()], name=name, namespace=cluster.namespace, uid=uid)
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"
    return pod, cluster.pod_token(name, uid)


async def call(daemon: Daemon, path: str, token: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(daemon.url + path, headers={"Token": token}) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def thawed_and_ticking(pod: Pod) -> bool:
    return pod.freezer_state(USER) == "THAWED" and await log_grows(pod)


def review(api: ApiServer, token: str) -> Any:
    """What the API server itself says about ``token`` (admin TokenReview, audience freeze)."""
    from kubernetes import client

    with api.client() as api_client:
        result = client.AuthenticationV1Api(api_client).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[AUDIENCE]))
        )
    return result.status


# --------------------------------------------------------------------------- tests


@pytest.mark.containerd
async def test_pod_token_freezes_and_thaws_its_own_pod(
    cluster: Cluster, daemon: Daemon, pods: PodClient
) -> None:
    pod, token = await twin_pod(cluster, pods, "own")

    status, body = await call(daemon, "/freeze", token)
    assert status == 200, body
    assert body["pod_uid"] == pod.uid
    assert body["containers"] == [USER]
    assert body["state"] == "frozen"
    assert pod.freezer_state(USER) == "FROZEN"
    assert await pod.task_status(USER) == "PAUSED"
    assert await log_is_quiet(pod)

    status, body = await call(daemon, "/thaw", token)
    assert (status, body["pod_uid"], body["state"]) == (200, pod.uid, "thawed"), body
    assert await thawed_and_ticking(pod)

    # Knative's protocol on the same path, same token.
    async with (
        aiohttp.ClientSession() as http,
        http.post(daemon.url + "/", headers={"Token": token}, json={"action": "pause"}) as r,
    ):
        assert (r.status, (await r.json())["pod_uid"]) == (200, pod.uid)
    assert pod.freezer_state(USER) == "FROZEN"
    status, body = await call(daemon, "/thaw", token)
    assert status == 200, body
    assert await thawed_and_ticking(pod)

    # The daemon loaded exactly the API server's keys (from /openid/v1/jwks, as the SA) and
    # confirmed the token with a TokenReview rather than trusting the signature alone.
    code, raw = cluster.api.get("/openid/v1/jwks")
    assert code == 200
    served = sorted(k["kid"] for k in json.loads(raw)["keys"])
    loaded = [r for r in daemon.log_records() if r.get("msg") == "loaded service-account keys"]
    assert loaded and loaded[-1]["kids"] == served
    assert jwt.get_unverified_header(token)["kid"] in served
    starting = next(r for r in daemon.log_records() if r.get("msg") == "freeze-daemon starting")
    assert starting["keys"] == "api-server" and starting["issuer"] == "discovered"
    assert starting["token_review"] is True


@pytest.mark.containerd
async def test_token_for_another_audience_is_refused(
    cluster: Cluster, daemon: Daemon, pods: PodClient
) -> None:
    pod, _ = await twin_pod(cluster, pods, "audience")
    other = cluster.pod_token(pod.name, pod.uid, audience="someone-else")
    assert review(cluster.api, cluster.pod_token(pod.name, pod.uid)).authenticated is True

    status, body = await call(daemon, "/freeze", other)
    assert status == 403, body
    assert "wrong audience" in body["error"], body
    assert "'freeze'" in body["error"]
    assert await thawed_and_ticking(pod)


def _forge(api: ApiServer, template: str, **claims: Any) -> str:
    """``template``'s claims with ``claims`` replaced, signed with the API server's own key."""
    original = jwt.decode(template, options={"verify_signature": False})
    header = jwt.get_unverified_header(template)
    key = api.service_account_signing_key_file.read_bytes()
    return jwt.encode(
        {**original, **claims}, key, algorithm=header["alg"], headers={"kid": header["kid"]}
    )


@pytest.mark.containerd
async def test_expired_token_is_refused_locally(
    cluster: Cluster, daemon: Daemon, pods: PodClient
) -> None:
    pod, token = await twin_pod(cluster, pods, "expiry")
    now = int(time.time())

    # Control: re-signed with the server's key and still valid, it is as good as the real one —
    # for the API server and for the daemon. So in the next token only `exp` is wrong.
    fresh = _forge(cluster.api, token, iat=now - 60, nbf=now - 60, exp=now + 600)
    assert review(cluster.api, fresh).authenticated is True
    status, body = await call(daemon, "/freeze", fresh)
    assert (status, body.get("pod_uid")) == (200, pod.uid), body
    status, body = await call(daemon, "/thaw", fresh)
    assert status == 200, body

    expired = _forge(cluster.api, token, iat=now - 700, nbf=now - 700, exp=now - 60)
    assert review(cluster.api, expired).authenticated is not True
    status, body = await call(daemon, "/freeze", expired)
    assert status == 403, body
    # The local check's words (daemon.auth.JwtVerifier), not a TokenReview's denial.
    assert body["error"].startswith("token refused: token expired"), body
    assert "TokenReview" not in body["error"]

    # Signed by another key under the server's kid: the daemon verifies with the fetched keys.
    alien = new_rsa_key(kid=jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, alien.private_key, algorithm="RS256", headers={"kid": alien.kid})
    status, body = await call(daemon, "/freeze", forged)
    assert status == 403, body
    assert "bad signature" in body["error"], body
    assert await thawed_and_ticking(pod)


@pytest.mark.containerd
async def test_another_pods_token_acts_only_on_its_own_pod(
    cluster: Cluster, daemon: Daemon, pods: PodClient
) -> None:
    victim, _ = await twin_pod(cluster, pods, "victim")
    # An API pod with no containers on this node: its token is valid, but proves only itself.
    intruder_uid = cluster.create_pod("intruder")
    intruder = cluster.pod_token("intruder", intruder_uid)

    for path in ("/freeze", f"/freeze?container={USER}"):
        status, body = await call(daemon, path, intruder)
        assert status == 404, body
        assert body["pod_uid"] == intruder_uid != victim.uid
    assert await thawed_and_ticking(victim)
    assert await victim.task_status(USER) == "RUNNING"


@pytest.mark.containerd
async def test_token_of_a_deleted_pod_is_refused(
    cluster: Cluster, daemon: Daemon, pods: PodClient
) -> None:
    pod, token = await twin_pod(cluster, pods, "deleted")
    status, body = await call(daemon, "/freeze", token)
    assert status == 200, body
    status, body = await call(daemon, "/thaw", token)
    assert status == 200, body  # the positive review is now cached (REVIEW_TTL)

    cluster.delete_pod(pod.name)
    deleted_at = time.monotonic()
    # The CRI pod is still there: only the API object is gone, so a refusal is authentication.
    # Poll with /thaw so a call that still passes in the window leaves the pod running.
    limit = APISERVER_AUTH_CACHE + REVIEW_TTL + 8.0
    while True:
        status, body = await call(daemon, "/thaw", token)
        if status != 200 or time.monotonic() - deleted_at > limit:
            break
        await asyncio.sleep(0.25)
    assert status == 403, f"still {status} {body} {time.monotonic() - deleted_at:.1f} s after"
    assert "TokenReview denied the token" in body["error"], body
    # Not only at once: a refusal is cached too, and the next call is refused the same way.
    status, body = await call(daemon, "/freeze", token)
    assert status == 403, body
    assert await thawed_and_ticking(pod)


async def test_jwks_from_the_api_server_verifies_a_token_locally(
    cluster: Cluster, tmp_path: Path
) -> None:
    """In process, with the daemon's own classes and the daemon's ServiceAccount: the keys and
    issuer it discovers verify a real token without any TokenReview."""
    from daemon.auth import ApiServerJwks, JwtVerifier, KeyCache, connect_kubernetes
    from daemon.claims import TokenRefused, identity_from_claims

    uid = cluster.create_pod("jwks")
    token = cluster.pod_token("jwks", uid)
    kubeconfig = service_account_kubeconfig(
        cluster.api, "knative-serving", "freeze-tokenreview", tmp_path / "kubeconfig"
    )
    kube = await connect_kubernetes(str(kubeconfig))
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=kube.ssl_context)
        ) as session:
            keys = KeyCache(ApiServerJwks(session, kube.server, kube.headers))
            verifier = JwtVerifier(keys, audience=AUDIENCE)
            claims = await verifier.verify(token)
            assert await keys.issuer() == cluster.api.issuer
            identity = identity_from_claims(claims)
            assert identity.pod_uid == uid
            assert identity.pod_name == "jwks"
            assert identity.namespace == cluster.namespace
            assert keys.fetches == 1

            other = cluster.pod_token("jwks", uid, audience="someone-else")
            with pytest.raises(TokenRefused, match="wrong audience"):
                await JwtVerifier(keys, audience=AUDIENCE).verify(other)
    finally:
        await kube.close()


@pytest.mark.containerd
async def test_token_review_needs_the_auth_delegator_binding(
    cluster: Cluster, containerd: Containerd, pods: PodClient, tmp_path: Path
) -> None:
    """A daemon acting as a ServiceAccount without the tokenreview binding can load the keys
    (issuer discovery is open to every account) but not review: 503 naming the fix. The
    shipped binding is what makes the module's daemon work."""
    unbound = "no-tokenreview-binding"
    cluster.api.kubectl("-n", cluster.namespace, "create", "serviceaccount", unbound)
    kubeconfig = service_account_kubeconfig(
        cluster.api, cluster.namespace, unbound, tmp_path / "kubeconfig"
    )
    proc, daemon = _start_daemon(kubeconfig, containerd, tmp_path / "daemon.log")
    try:
        pod, token = await twin_pod(cluster, pods, "unbound")
        status, body = await call(daemon, "/freeze", token)
        assert status == 503, body
        assert "create tokenreviews" in body["error"], body
        assert "answered 403" not in body["error"]  # the API server's words stay in the log
        logged = [r for r in daemon.log_records() if r.get("msg") == "cannot check token"]
        assert logged and "TokenReview answered 403" in logged[-1]["error"], logged
        assert await thawed_and_ticking(pod)
        loaded = [r for r in daemon.log_records() if r.get("msg") == "loaded service-account keys"]
        assert loaded, daemon.log_file.read_text()[-2000:]
    finally:
        assert stop(proc) == 0

    # The shipped RBAC: may create TokenReviews (and nothing like reading pods).
    sa = "system:serviceaccount:knative-serving:freeze-tokenreview"
    can = cluster.api.kubectl(
        "auth", "can-i", "create", "tokenreviews.authentication.k8s.io", "--as", sa, check=False
    )
    assert can.stdout.strip() == "yes", can.stderr
    cannot = cluster.api.kubectl("auth", "can-i", "list", "pods", "--as", sa, check=False)
    assert cannot.stdout.strip() == "no", cannot.stderr


class Forwarder:
    """A real TCP hop between the daemon and the API server that the test can cut: while it is
    stopped, connecting to its port is refused, as when the API server is unreachable. It runs
    its own event loop in a thread, so the test's blocking kubectl calls never stall it."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        assert parts.hostname and parts.port
        self._target = (parts.hostname, parts.port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"https://{self._target[0]}:{self.port}"

    def _run(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> None:
        self._run(self._start())

    def stop(self) -> None:
        self._run(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._pipe, "127.0.0.1", self.port, reuse_address=True
        )

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


@pytest.mark.containerd
async def test_thaw_survives_an_api_server_outage_freeze_does_not(
    cluster: Cluster, containerd: Containerd, pods: PodClient, tmp_path: Path
) -> None:
    """The API server becomes unreachable after the review cache expired: thawing (the safe
    direction) proceeds on the locally verified token for --outage-thaw-grace, freezing gets a
    503 that does not echo the API server's error; reviews resume when it is back."""
    forwarder = Forwarder(cluster.api.url)
    forwarder.start()
    token_file = service_account_kubeconfig(
        cluster.api, "knative-serving", "freeze-tokenreview", tmp_path / "direct"
    )
    config = json.loads(token_file.read_text())
    config["clusters"][0]["cluster"]["server"] = forwarder.url
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    grace = 4.0
    proc, daemon = _start_daemon(
        kubeconfig,
        containerd,
        tmp_path / "daemon.log",
        f"--review-cache-ttl={REVIEW_TTL:g}s",
        f"--outage-thaw-grace={grace:g}s",
    )
    try:
        pod, token = await twin_pod(cluster, pods, "outage")
        status, body = await call(daemon, "/freeze", token)
        assert status == 200, body
        assert pod.freezer_state(USER) == "FROZEN"

        forwarder.stop()
        await asyncio.sleep(REVIEW_TTL + 0.2)  # the review cached by the freeze has expired
        outage_began = time.monotonic()
        status, body = await call(daemon, "/thaw", token)
        assert (status, body.get("state")) == (200, "thawed"), body
        assert await thawed_and_ticking(pod)
        warned = [
            r
            for r in daemon.log_records()
            if r.get("msg") == "thawing on a locally verified token: TokenReview unavailable"
        ]
        assert warned and warned[-1]["pod_uid"] == pod.uid, daemon.log_file.read_text()[-3000:]

        status, body = await call(daemon, "/freeze", token)
        assert status == 503, body
        assert "TokenReview is unavailable" in body["error"], body
        assert str(forwarder.port) not in body["error"] and "onnect" not in body["error"], body
        assert pod.freezer_state(USER) == "THAWED"

        # A thaw needs no review only for the first `grace` of the outage.
        await asyncio.sleep(max(0.0, grace + 0.5 - (time.monotonic() - outage_began)))
        status, body = await call(daemon, "/thaw", token)
        assert status == 503, body

        forwarder.start()  # the API server is reachable again: reviews, freezes work
        status, body = await call(daemon, "/freeze", token)
        assert status == 200, body
        assert pod.freezer_state(USER) == "FROZEN"
        status, body = await call(daemon, "/thaw", token)
        assert status == 200, body
        assert await thawed_and_ticking(pod)
    finally:
        forwarder.close()
        assert stop(proc) == 0, daemon.log_file.read_text()[-3000:]


@pytest.fixture(scope="module")
def es384_cluster(
    k8s_binaries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A second kube-apiserver whose service-account signing key is an EC P-384 key: it signs
    every token with ES384 (the shared one uses RSA, RS256)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = tmp_path_factory.mktemp("es384-keys")
    private = ec.generate_private_key(ec.SECP384R1())
    (keys / "sa.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (keys / "sa.pub").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    api = ApiServer(
        etcd_bin=k8s_binaries["etcd"],
        apiserver_bin=k8s_binaries["kube-apiserver"],
        kubectl_bin=k8s_binaries["kubectl"],
        extra_args=[
            f"--service-account-signing-key-file={keys / 'sa.key'}",
            f"--service-account-key-file={keys / 'sa.pub'}",
        ],
    )
    api.start()
    try:
        yield _prepare(api)
    finally:
        api.stop()


async def test_es384_tokens_of_a_real_api_server_are_accepted(
    es384_cluster: Cluster, tmp_path: Path
) -> None:
    """The real daemon, keys from a real API server that signs with ES384, a real TokenReview:
    the token proves its pod (404: that pod runs nowhere on this node). Before, every call of
    such a cluster was refused ('algorithm ES384 not allowed')."""
    uid = es384_cluster.create_pod("es384")
    token = es384_cluster.pod_token("es384", uid)
    assert jwt.get_unverified_header(token)["alg"] == "ES384"
    kubeconfig = service_account_kubeconfig(
        es384_cluster.api, "knative-serving", "freeze-tokenreview", tmp_path / "kubeconfig"
    )
    nowhere: Any = SimpleNamespace(socket=tmp_path / "no-containerd.sock", namespace="k8s.io")
    proc, daemon = _start_daemon(kubeconfig, nowhere, tmp_path / "daemon.log")
    try:
        status, body = await call(daemon, "/thaw", token)
        assert body.get("pod_uid") == uid, body
        assert status in (404, 502), body
        loaded = [r for r in daemon.log_records() if r.get("msg") == "loaded service-account keys"]
        assert loaded and "ES384" in json.dumps(loaded[-1]["algorithms"]), loaded
    finally:
        assert stop(proc) == 0, daemon.log_file.read_text()[-3000:]
