"""Certificate bootstrap: pure cert logic, the reconciler on a fake Cluster, and the adapter."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from testbed.processes import free_port
from webhook import certs
from webhook.cluster import ConflictError, KubeCluster, StoredSecret, ca_bundle_patch
from webhook.tls import CertReconciler, LiveTLS

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
SVC, NS = "freezer-webhook", "knative-serving"


def test_sans_cover_every_service_dns_form() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    assert sorted(certs.server_sans(bundle.server_cert)) == sorted(
        [
            "freezer-webhook",
            "freezer-webhook.knative-serving",
            "freezer-webhook.knative-serving.svc",
            "freezer-webhook.knative-serving.svc.cluster.local",
        ]
    )


def test_chain_verifies_with_ssl() -> None:
    """The CA in caBundle verifies the served cert for the Service name, as the API server does."""
    bundle = certs.generate(SVC, NS, dt.datetime.now(dt.UTC))
    ca = x509.load_pem_x509_certificate(bundle.ca_bundle)
    server = x509.load_pem_x509_certificate(bundle.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    # And a real TLS stack accepts it.
    assert _handshake(bundle, f"{SVC}.{NS}.svc") is not None


def test_fresh_bundle_is_kept() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    assert certs.needs_rotation(bundle, SVC, NS, NOW)[0] == "keep"
    assert certs.needs_rotation(bundle, SVC, NS, NOW + dt.timedelta(days=5))[0] == "keep"


def test_rotation_threshold_for_server_cert() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    just_before = NOW + certs.SERVER_VALIDITY - certs.SERVER_RENEW_BEFORE - dt.timedelta(seconds=1)
    just_after = just_before + dt.timedelta(seconds=2)
    assert certs.needs_rotation(bundle, SVC, NS, just_before)[0] == "keep"
    decision, why = certs.needs_rotation(bundle, SVC, NS, just_after)
    assert decision == "server" and "expires" in why


def test_server_renewal_keeps_ca() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    later = NOW + dt.timedelta(days=6, hours=12)
    renewed, changed, _ = certs.ensure(bundle.to_secret_data(), SVC, NS, later)
    assert changed
    assert renewed.ca_bundle == bundle.ca_bundle  # caBundle untouched: no webhook patch
    assert renewed.server_cert != bundle.server_cert
    assert certs.needs_rotation(renewed, SVC, NS, later)[0] == "keep"


def test_ca_rotation_keeps_previous_ca_in_bundle() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    late = NOW + certs.CA_VALIDITY - dt.timedelta(days=10)
    assert certs.needs_rotation(bundle, SVC, NS, late)[0] == "all"
    renewed, changed, _ = certs.ensure(bundle.to_secret_data(), SVC, NS, late)
    assert changed
    cas = x509.load_pem_x509_certificates(renewed.ca_bundle)
    assert len(cas) == 2
    assert cas[1] == x509.load_pem_x509_certificate(bundle.ca_bundle)
    x509.load_pem_x509_certificate(renewed.server_cert).verify_directly_issued_by(cas[0])


def test_wrong_names_or_foreign_signature_rotate() -> None:
    other = certs.generate("other", NS, NOW)
    assert certs.needs_rotation(other, SVC, NS, NOW)[0] == "server"
    mine = certs.generate(SVC, NS, NOW)
    mixed = certs.CertBundle(mine.ca_bundle, mine.ca_key, other.server_cert, other.server_key)
    assert certs.needs_rotation(mixed, SVC, NS, NOW) == (
        "server",
        "server certificate is not signed by the current CA",
    )
    mismatched = certs.CertBundle(mine.ca_bundle, mine.ca_key, mine.server_cert, other.server_key)
    assert certs.needs_rotation(mismatched, SVC, NS, NOW)[0] == "server"


def test_empty_or_garbage_secret_starts_over() -> None:
    assert certs.CertBundle.from_secret_data({}) is None
    assert certs.needs_rotation(None, SVC, NS, NOW)[0] == "all"
    junk = certs.CertBundle(b"junk", b"junk", b"junk", b"junk")
    assert certs.needs_rotation(junk, SVC, NS, NOW)[0] == "all"
    bundle, changed, _ = certs.ensure({k: b"junk" for k in certs.SECRET_KEYS}, SVC, NS, NOW)
    assert changed and certs.needs_rotation(bundle, SVC, NS, NOW)[0] == "keep"


def _handshake(bundle: certs.CertBundle, server_hostname: str) -> Any:
    """A TLS handshake in memory, the client verifying against the bundle's CA; the peer cert."""
    client = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
    tls = LiveTLS()
    assert tls.load_pem(bundle.server_cert, bundle.server_key)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(client_in, client_out, server_hostname=server_hostname)
    s = tls.context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    c.do_handshake()
    return c.getpeercert()


def test_extra_sans_add_ip_addresses_and_dns_names() -> None:
    """--extra-san: the API server reaching the webhook by clientConfig.url (an IP, another
    name) verifies it; the Service names stay, and the subject stays the Service's name."""
    bundle = certs.generate(
        SVC, NS, dt.datetime.now(dt.UTC), extra_sans=["127.0.0.1", "Hook.Example.COM", "::1"]
    )
    assert certs.server_sans(bundle.server_cert) == [
        *certs.dns_names(SVC, NS),
        "hook.example.com",
        "127.0.0.1",
        "::1",
    ]
    server = x509.load_pem_x509_certificate(bundle.server_cert)
    cn = server.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == f"{SVC}.{NS}.svc.cluster.local"
    _handshake(bundle, "127.0.0.1")  # Python checks an IP server_hostname against IP SANs
    _handshake(bundle, "hook.example.com")
    _handshake(bundle, f"{SVC}.{NS}.svc")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(bundle, "127.0.0.2")


def test_adding_an_extra_san_re_signs_with_the_same_ca() -> None:
    bundle = certs.generate(SVC, NS, NOW)
    decision, why = certs.needs_rotation(bundle, SVC, NS, NOW, extra_sans=["127.0.0.1"])
    assert decision == "server" and "127.0.0.1" in why
    renewed, changed, _ = certs.ensure(
        bundle.to_secret_data(), SVC, NS, NOW, extra_sans=["127.0.0.1"]
    )
    assert changed and renewed.ca_bundle == bundle.ca_bundle  # the caBundle is not touched
    assert "127.0.0.1" in certs.server_sans(renewed.server_cert)
    assert certs.needs_rotation(renewed, SVC, NS, NOW, extra_sans=["127.0.0.1"])[0] == "keep"
    # Dropping the flag later causes no churn: a superset of the names is still fine.
    assert certs.needs_rotation(renewed, SVC, NS, NOW)[0] == "keep"
    # The spelling of an address does not matter (it is compared as an address).
    v6 = certs.generate(SVC, NS, NOW, extra_sans=["::1"])
    assert certs.needs_rotation(v6, SVC, NS, NOW, extra_sans=["0:0:0:0:0:0:0:1"])[0] == "keep"


@pytest.mark.parametrize("bad", ["", "-bad.example", "under_score.example", "a..b", "sp ace"])
def test_san_entry_refuses_what_is_no_name(bad: str) -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        certs.san_entry(bad)


def test_extra_san_flag() -> None:
    from webhook.__main__ import parse_args

    settings = parse_args(
        ["--proxy-image", "img", "--extra-san", "127.0.0.1", "--extra-san", "hook.example.com"]
    )
    assert settings.extra_sans == ("127.0.0.1", "hook.example.com")
    assert parse_args(["--proxy-image", "img"]).extra_sans == ()
    with pytest.raises(SystemExit):
        parse_args(["--proxy-image", "img", "--extra-san", "not a name"])
    with pytest.raises(SystemExit):  # only the bootstrapped certificate gets extra names
        parse_args(
            [
                *("--proxy-image", "img", "--extra-san", "127.0.0.1"),
                *("--tls-cert-file", "c.pem", "--tls-private-key-file", "k.pem"),
            ]
        )


# --- the reconciler against an in-memory Cluster -------------------------------------------------


class FakeCluster:
    """The Cluster protocol in memory, counting writes so tests can assert "no churn"."""

    def __init__(self, hooks: int = 1) -> None:
        self.secret: StoredSecret | None = StoredSecret({}, "1")  # config/ ships it empty
        self.hooks: list[tuple[str, bytes]] = [(f"hook{i}.freeze", b"") for i in range(hooks)]
        self.secret_writes = 0
        self.bundle_patches = 0
        self.conflicts_to_inject = 0

    async def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        return self.secret

    async def write_secret(
        self, namespace: str, name: str, data: dict[str, bytes], resource_version: str | None
    ) -> None:
        if self.conflicts_to_inject:
            self.conflicts_to_inject -= 1
            raise ConflictError("someone else wrote")
        current = self.secret.resource_version if self.secret else None
        if resource_version != current:
            raise ConflictError("stale resourceVersion")
        self.secret_writes += 1
        self.secret = StoredSecret(dict(data), str(int(current or "0") + 1))

    async def read_ca_bundles(self, webhook_config: str) -> list[tuple[str, bytes]]:
        return list(self.hooks)

    async def patch_ca_bundles(
        self, webhook_config: str, bundles: dict[int, tuple[str, bytes]]
    ) -> None:
        self.bundle_patches += 1
        for index, (name, bundle) in bundles.items():
            assert self.hooks[index][0] == name
            self.hooks[index] = (name, bundle)


def reconciler(cluster: FakeCluster, now: dt.datetime = NOW) -> CertReconciler:
    return CertReconciler(
        cluster,
        LiveTLS(),
        NS,
        SVC,
        "freezer-webhook-certs",
        "webhook.freeze.extensions.knative.dev",
        clock=lambda: now,
    )


async def test_bootstrap_fills_empty_secret_and_ca_bundle() -> None:
    cluster = FakeCluster(hooks=2)
    rec = reconciler(cluster)
    bundle = await rec.reconcile()
    assert cluster.secret is not None
    assert cluster.secret.data == bundle.to_secret_data()
    assert [b for _, b in cluster.hooks] == [bundle.ca_bundle, bundle.ca_bundle]
    assert rec.tls.loaded and rec.served == bundle.server_cert
    assert (cluster.secret_writes, cluster.bundle_patches) == (1, 1)


async def test_restart_reuses_valid_secret_without_churn() -> None:
    cluster = FakeCluster()
    first = await reconciler(cluster).reconcile()
    # A new process (restart), a day later: same Secret, no writes, no patch.
    second = await reconciler(cluster, NOW + dt.timedelta(days=1)).reconcile()
    assert second == first
    assert (cluster.secret_writes, cluster.bundle_patches) == (1, 1)


async def test_ca_bundle_patched_only_when_different() -> None:
    cluster = FakeCluster()
    bundle = await reconciler(cluster).reconcile()
    cluster.hooks[0] = (cluster.hooks[0][0], b"stale")  # someone re-applied config/
    await reconciler(cluster).reconcile()
    assert cluster.bundle_patches == 2 and cluster.hooks[0][1] == bundle.ca_bundle
    await reconciler(cluster).reconcile()
    assert cluster.bundle_patches == 2


async def test_rotation_before_expiry_keeps_ca_bundle() -> None:
    cluster = FakeCluster()
    first = await reconciler(cluster).reconcile()
    later = NOW + certs.SERVER_VALIDITY - dt.timedelta(hours=12)
    rec = reconciler(cluster, later)
    second = await rec.reconcile()
    assert second.server_cert != first.server_cert
    assert cluster.secret_writes == 2
    assert cluster.bundle_patches == 1  # same CA: the webhook configuration is untouched
    assert rec.served == second.server_cert


async def test_reconciler_with_extra_sans_re_signs_but_keeps_the_ca_bundle() -> None:
    cluster = FakeCluster()
    first = await reconciler(cluster).reconcile()
    rec = reconciler(cluster)
    rec.extra_sans = ("127.0.0.1",)
    second = await rec.reconcile()
    assert "127.0.0.1" in certs.server_sans(second.server_cert)
    assert second.ca_bundle == first.ca_bundle
    assert (cluster.secret_writes, cluster.bundle_patches) == (2, 1)
    assert rec.served == second.server_cert
    await rec.reconcile()  # and from then on, no churn
    assert (cluster.secret_writes, cluster.bundle_patches) == (2, 1)


async def test_conflict_rereads_and_adopts_the_winner() -> None:
    cluster = FakeCluster()
    cluster.conflicts_to_inject = 1
    winner = certs.generate(SVC, NS, NOW)

    original_read = cluster.read_secret
    reads = 0

    async def read_then_someone_writes(namespace: str, name: str) -> StoredSecret | None:
        nonlocal reads
        reads += 1
        if reads == 2:  # the other replica's write landed between our attempts
            cluster.secret = StoredSecret(winner.to_secret_data(), "7")
        return await original_read(namespace, name)

    cluster.read_secret = read_then_someone_writes  # type: ignore[method-assign]
    bundle = await reconciler(cluster).reconcile()
    assert bundle == winner
    assert cluster.secret_writes == 0


class InterleavingCluster(FakeCluster):
    """Every API call yields to the event loop first, so concurrent replicas interleave."""

    async def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        await asyncio.sleep(0)
        return await super().read_secret(namespace, name)

    async def write_secret(
        self, namespace: str, name: str, data: dict[str, bytes], resource_version: str | None
    ) -> None:
        await asyncio.sleep(0)
        await super().write_secret(namespace, name, data, resource_version)


async def test_replicas_starting_together_settle_on_one_ca() -> None:
    """config/ runs two replicas: both read the empty Secret, both mint a CA, one write wins
    and the other adopts it, so both serve certificates of the CA in the caBundle."""
    cluster = InterleavingCluster()
    replicas = [reconciler(cluster), reconciler(cluster)]
    bundles = await asyncio.gather(*(r.reconcile() for r in replicas))
    assert cluster.secret is not None
    assert cluster.secret_writes == 1
    assert bundles[0] == bundles[1]
    assert cluster.secret.data == bundles[0].to_secret_data()
    assert cluster.hooks[0][1] == bundles[0].ca_bundle
    assert replicas[0].served == replicas[1].served == bundles[0].server_cert


# --- the KubeCluster adapter against a fake API server (HTTP, just the four endpoints) -----------


class FakeApiServer:
    def __init__(self) -> None:
        self.secret: dict[str, Any] | None = None
        self.mwc: dict[str, Any] = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "webhook.freeze.extensions.knative.dev"},
            "webhooks": [
                {
                    "name": "webhook.freeze.extensions.knative.dev",
                    "clientConfig": {"service": {"name": SVC, "namespace": NS}},
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                }
            ],
        }
        self.patches: list[tuple[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        base = "/api/v1/namespaces/{ns}/secrets"
        app.router.add_get(base + "/{name}", self.get_secret)
        app.router.add_post(base, self.create_secret)
        app.router.add_patch(base + "/{name}", self.patch_secret)
        mwc = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        app.router.add_get(mwc, self.get_mwc)
        app.router.add_patch(mwc, self.patch_mwc)
        return app

    async def get_secret(self, request: web.Request) -> web.Response:
        if self.secret is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        return web.json_response(self.secret)

    async def create_secret(self, request: web.Request) -> web.Response:
        if self.secret is not None:
            return web.json_response({"kind": "Status", "code": 409}, status=409)
        self.secret = await request.json()
        self.secret["metadata"]["resourceVersion"] = "1"
        return web.json_response(self.secret, status=201)

    async def patch_secret(self, request: web.Request) -> web.Response:
        """JSON Patch as the API server applies it: a resourceVersion set by the patch is a
        precondition (409 when stale); everything the patch does not name is kept."""
        assert request.content_type == "application/json-patch+json"
        assert self.secret is not None
        patched = copy.deepcopy(self.secret)
        for op in await request.json():
            assert op["op"] in ("add", "replace"), op
            _, *parents, key = op["path"].split("/")
            node = patched
            for parent in parents:
                node = node[parent]
            node[key] = op["value"]
        current = self.secret["metadata"]["resourceVersion"]
        if patched["metadata"]["resourceVersion"] != current:
            return web.json_response({"kind": "Status", "code": 409}, status=409)
        patched["metadata"]["resourceVersion"] = str(int(current) + 1)
        self.secret = patched
        return web.json_response(patched)

    async def get_mwc(self, request: web.Request) -> web.Response:
        return web.json_response(self.mwc)

    async def patch_mwc(self, request: web.Request) -> web.Response:
        ops = await request.json()
        self.patches.append((request.content_type, ops))
        for op in ops:
            index = int(op["path"].split("/")[2])
            if op["op"] == "test":
                assert self.mwc["webhooks"][index]["name"] == op["value"]
            else:
                self.mwc["webhooks"][index]["clientConfig"]["caBundle"] = op["value"]
        return web.json_response(self.mwc)


async def test_kube_cluster_adapter_speaks_the_api() -> None:
    from kubernetes import client

    fake = FakeApiServer()
    server = TestServer(fake.app())
    await server.start_server()
    try:
        configuration = client.Configuration()
        configuration.host = str(server.make_url("")).rstrip("/")
        cluster = KubeCluster(client.ApiClient(configuration))
        assert await cluster.read_secret(NS, "freezer-webhook-certs") is None
        await cluster.write_secret(NS, "freezer-webhook-certs", {"a": b"\x00\x01"}, None)
        stored = await cluster.read_secret(NS, "freezer-webhook-certs")
        assert stored == StoredSecret({"a": b"\x00\x01"}, "1")
        assert fake.secret is not None
        fake.secret["metadata"]["labels"] = {"app.kubernetes.io/part-of": "freeze-proxy"}
        applied = {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
        fake.secret["metadata"]["annotations"] = applied
        await cluster.write_secret(NS, "freezer-webhook-certs", {"a": b"2"}, "1")
        assert fake.secret["data"] == {"a": base64.b64encode(b"2").decode()}
        # Only the data changed: labels and kubectl's annotation are what config/ installed.
        assert fake.secret["metadata"]["labels"] == {"app.kubernetes.io/part-of": "freeze-proxy"}
        assert fake.secret["metadata"]["annotations"] == applied
        assert fake.secret["metadata"]["resourceVersion"] == "2"
        with pytest.raises(ConflictError):
            await cluster.write_secret(NS, "freezer-webhook-certs", {"a": b"3"}, "1")
        assert fake.secret["data"] == {"a": base64.b64encode(b"2").decode()}
        assert await cluster.read_ca_bundles("webhook.freeze.extensions.knative.dev") == [
            ("webhook.freeze.extensions.knative.dev", b"")
        ]
        await cluster.patch_ca_bundles(
            "webhook.freeze.extensions.knative.dev",
            {0: ("webhook.freeze.extensions.knative.dev", b"PEM")},
        )
        content_type, ops = fake.patches[0]
        assert content_type == "application/json-patch+json"
        assert ops == ca_bundle_patch({0: ("webhook.freeze.extensions.knative.dev", b"PEM")})
        assert (
            fake.mwc["webhooks"][0]["clientConfig"]["caBundle"] == base64.b64encode(b"PEM").decode()
        )
        assert await cluster.read_ca_bundles("webhook.freeze.extensions.knative.dev") == [
            ("webhook.freeze.extensions.knative.dev", b"PEM")
        ]
        json.dumps(fake.secret)  # what the adapter sent is plain JSON
    finally:
        await server.close()


async def test_webhook_process_bootstraps_tls_from_the_api(tmp_path: Path) -> None:
    """`python -m webhook` without cert files: fills the shipped empty Secret, patches caBundle,
    serves HTTPS that verifies with that caBundle for the Service name; a restart reuses it all."""
    fake = FakeApiServer()
    fake.secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "freezer-webhook-certs", "namespace": NS, "resourceVersion": "1"},
        "type": "Opaque",
    }
    server = TestServer(fake.app())
    await server.start_server()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "f", "cluster": {"server": str(server.make_url("/"))[:-1]}}],
                "contexts": [{"name": "f", "context": {"cluster": "f", "user": "u"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "current-context": "f",
            }
        )
    )

    async def run_once() -> bytes:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "webhook", "--kubeconfig", str(kubeconfig),
            "--listen", f"127.0.0.1:{port}", "--proxy-image", "img",
            cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            for _ in range(100):
                bundle = fake.mwc["webhooks"][0]["clientConfig"].get("caBundle")
                if bundle:
                    ctx = ssl.create_default_context(cadata=base64.b64decode(bundle).decode())
                    try:
                        async with (
                            aiohttp.ClientSession() as s,
                            s.get(
                                f"https://127.0.0.1:{port}/healthz",
                                ssl=ctx,
                                server_hostname=f"{SVC}.{NS}.svc",
                            ) as r,
                        ):
                            assert r.status == 200
                            return base64.b64decode(bundle)
                    except aiohttp.ClientConnectionError:
                        pass
                await asyncio.sleep(0.1)
            pytest.fail("webhook never served with its bootstrapped certificate")
        finally:
            proc.terminate()
            await proc.wait()

    try:
        first = await run_once()
        assert fake.secret is not None and fake.secret["metadata"]["resourceVersion"] == "2"
        stored = base64.b64decode(fake.secret["data"][certs.CA_CERT_KEY])
        assert stored == first
        patches = len(fake.patches)
        second = await run_once()  # a restart: nothing rewritten, nothing patched
        assert second == first
        assert fake.secret["metadata"]["resourceVersion"] == "2"
        assert len(fake.patches) == patches == 1
    finally:
        await server.close()
