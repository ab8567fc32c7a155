"""AdmissionReview round trips over real HTTPS to a running ``python -m webhook`` process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpClient

from testbed.processes import free_port
from tests.knative_pods import knative_pod
from tests.test_mutation import apply_patch
from webhook import certs
from webhook.app import create_app
from webhook.mutation import MutationResult, MutationSettings

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ghcr.io/freeze-proxy/freeze-proxy:e2e"
SERVICE_DNS = "freezer-webhook.knative-serving.svc"


def review(obj: Any, api_version: str = "admission.k8s.io/v1", **request: Any) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a Pod CREATE."""
    body: dict[str, Any] = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "default",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": obj,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    body.update(request)
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": body}


def write_certs(directory: Path, now: dt.datetime) -> certs.CertBundle:
    bundle = certs.generate("freezer-webhook", "knative-serving", now)
    (directory / "tls.crt.tmp").write_bytes(bundle.server_cert)
    (directory / "tls.key.tmp").write_bytes(bundle.server_key)
    os.replace(directory / "tls.key.tmp", directory / "tls.key")
    os.replace(directory / "tls.crt.tmp", directory / "tls.crt")
    return bundle


@dataclass
class Webhook:
    url: str
    proc: subprocess.Popen[bytes]
    ca: bytes
    tmp: Path

    def ssl_for(self, ca: bytes) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=ca.decode())


def start_webhook(tmp_path: Path, *args: str) -> Webhook:
    bundle = write_certs(tmp_path, dt.datetime.now(dt.UTC))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "webhook",
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert-file",
            str(tmp_path / "tls.crt"),
            "--tls-private-key-file",
            str(tmp_path / "tls.key"),
            "--reload-interval",
            "0.2",
            "--config-map",
            "",
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "FREEZE_PROXY_IMAGE": IMAGE, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    return Webhook(f"https://127.0.0.1:{port}", proc, bundle.ca_bundle, tmp_path)


@contextlib.contextmanager
def running_webhook(tmp_path: Path, *args: str) -> Iterator[Webhook]:
    """``start_webhook``, terminated at the end if still running."""
    hook = start_webhook(tmp_path, *args)
    try:
        yield hook
    finally:
        if hook.proc.poll() is None:
            hook.proc.terminate()
            hook.proc.wait(timeout=10)


@pytest.fixture
def webhook_process(tmp_path: Path) -> Iterator[Webhook]:
    with running_webhook(tmp_path, "--drain-delay", "0") as hook:
        yield hook


@pytest.fixture
async def session(webhook_process: Webhook) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        ctx = webhook_process.ssl_for(webhook_process.ca)
        for _ in range(100):
            if webhook_process.proc.poll() is not None:
                pytest.fail(f"webhook exited: {webhook_process.proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                async with s.get(
                    webhook_process.url + "/healthz", ssl=ctx, server_hostname=SERVICE_DNS
                ) as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        else:
            pytest.fail("webhook never became healthy")
        yield s


async def post(
    hook: Webhook, session: aiohttp.ClientSession, body: Any, path: str = "/defaulting"
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(
        hook.url + path,
        data=data,
        headers={"Content-Type": "application/json"},
        ssl=hook.ssl_for(hook.ca),
        server_hostname=SERVICE_DNS,
    ) as r:
        return r.status, await r.json()


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
@pytest.mark.parametrize("path", ["/defaulting", "/mutate"])
async def test_round_trip(
    webhook_process: Webhook, session: aiohttp.ClientSession, version: str, path: str
) -> None:
    pod = knative_pod(annotations={"freeze-proxy.knative.dev/grace": "500ms"})
    status, body = await post(webhook_process, session, review(pod, version), path)
    assert status == 200
    assert body["apiVersion"] == version and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert "warnings" not in response
    out = apply_patch(pod, decode_patch(response))
    proxy = out["spec"]["containers"][-1]
    assert proxy["image"] == IMAGE
    assert {"name": "FREEZE_GRACE", "value": "500ms"} in proxy["env"]


async def test_invalid_grace_warns(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    pod = knative_pod(annotations={"freeze-proxy.knative.dev/grace": "whenever"})
    status, body = await post(webhook_process, session, review(pod))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is True and response["patch"]
    (warning,) = response["warnings"]
    assert "whenever" in warning and "refused" in warning


async def test_already_mutated_and_opted_out_get_no_patch(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    for pod in (
        knative_pod(labels={"freeze-pod-added": "true"}),
        knative_pod(annotations={"freeze-proxy.knative.dev/enabled": "false"}),
    ):
        status, body = await post(webhook_process, session, review(pod))
        assert status == 200
        assert body["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "no request"),
        ({"apiVersion": "v1", "kind": "AdmissionReview", "request": {}}, "apiVersion"),
        ({"kind": "Pod"}, "kind"),
    ],
)
async def test_malformed_is_400(
    webhook_process: Webhook, session: aiohttp.ClientSession, body: Any, reason: str
) -> None:
    status, answer = await post(webhook_process, session, body)
    assert status == 400
    assert reason in answer["error"]


async def test_non_pod_is_400(webhook_process: Webhook, session: aiohttp.ClientSession) -> None:
    deployment = review(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
        kind={"group": "apps", "version": "v1", "kind": "Deployment"},
        resource={"group": "apps", "version": "v1", "resource": "deployments"},
    )
    status, answer = await post(webhook_process, session, deployment)
    assert status == 400 and "Pod" in answer["error"]
    missing_uid = review(knative_pod())
    del missing_uid["request"]["uid"]
    status, answer = await post(webhook_process, session, missing_uid)
    assert status == 400 and "uid" in answer["error"]


async def test_internal_error_is_allowed_with_warning(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    """A pod our code chokes on is admitted unchanged, never blocked."""
    broken: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {},
    }
    broken["spec"]["containers"] = "not-a-list"
    status, body = await post(webhook_process, session, review(broken))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert "admitted unchanged" in response["warnings"][0]


async def test_logs_name_the_pod_and_shutdown_is_clean(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    await post(webhook_process, session, review(knative_pod()))
    webhook_process.proc.terminate()
    assert webhook_process.proc.wait(timeout=10) == 0
    assert webhook_process.proc.stderr is not None
    lines = [json.loads(line) for line in webhook_process.proc.stderr.read().splitlines()]
    mutated = [e for e in lines if e.get("action") == "mutated"]
    assert mutated and mutated[0]["pod"] == "default/hello-00001-deployment-6d9f8c7b5-*"
    assert mutated[0]["program"] == "freeze-webhook"
    assert "freeze-proxy injected" in mutated[0]["msg"]


async def test_cert_files_are_reloaded(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    await asyncio.sleep(0.3)
    new = write_certs(webhook_process.tmp, dt.datetime.now(dt.UTC))
    for _ in range(50):
        try:
            status, _ = await post(
                Webhook(
                    webhook_process.url, webhook_process.proc, new.ca_bundle, webhook_process.tmp
                ),
                session,
                review(knative_pod()),
            )
            assert status == 200
            break
        except aiohttp.ClientConnectorCertificateError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("new certificate was never served")


MiB = 1024 * 1024


def review_of_size(size: int) -> bytes:
    """A valid AdmissionReview of exactly ``size`` bytes, made big the way that costs the most
    memory once parsed: many tiny strings (args), ~15x their JSON size as Python objects."""
    pod = knative_pod()
    args: list[str] = []
    pod["spec"]["containers"][0]["args"] = args
    pod["metadata"]["annotations"]["pad"] = ""
    body = json.dumps(review(pod)).encode()
    args.extend(["00"] * ((size - len(body)) // 6))  # ', "00"' is 6 bytes
    pad = size - len(json.dumps(review(pod)).encode())
    assert pad >= 0
    pod["metadata"]["annotations"]["pad"] = "x" * pad
    body = json.dumps(review(pod)).encode()
    assert len(body) == size, (len(body), size)
    return body


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the highest resident set size the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_reviews_bigger_than_the_api_server_sends_are_refused(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    """The API server takes at most 3 MiB request bodies (and etcd stores 1.5 MiB objects): a
    bigger AdmissionReview is no pod the API server can send, and parsing one costs ~15x its
    size in memory (an 8 MiB one added ~100 MiB RSS)."""
    status, _ = await post(webhook_process, session, review_of_size(3 * MiB))
    assert status == 200
    status, _ = await post(webhook_process, session, review_of_size(3 * MiB + 1))
    assert status == 413
    assert webhook_process.proc.poll() is None


async def test_a_refused_oversized_review_closes_its_connection_and_sigterm_exits_at_once(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    """The 413 comes before the body is read, so the connection still carries megabytes the
    webhook will not read: it closes it. Kept open, its handler lingered and SIGTERM waited the
    whole --shutdown-timeout (10 s) for it."""
    reader, writer = await _request(webhook_process, _post_head(3 * MiB + 1), b"{" * 65536)
    status, headers, _ = await _answer(reader)
    assert status == 413
    assert headers.get("connection", "").lower() == "close", headers
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the connection stayed open"
    writer.close()
    webhook_process.proc.terminate()
    started = time.monotonic()
    assert webhook_process.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 5, "SIGTERM waited for a connection left open"


async def test_many_big_reviews_at_once_stay_within_the_memory_limit(
    webhook_process: Webhook, session: aiohttp.ClientSession
) -> None:
    """Twenty 3 MiB reviews at once are all answered, and the process peaks far below the
    256 Mi limit config/ gives it: bodies are read only --max-inflight-reviews at a time, and no
    copy of a body outlives its review (``request.read()`` kept one per keep-alive connection)."""
    idle = peak_rss_kib(webhook_process.proc.pid)
    body = review_of_size(3 * MiB)
    statuses = await asyncio.gather(*(post(webhook_process, session, body) for _ in range(20)))
    assert [s for s, _ in statuses] == [200] * 20
    grown_mib = (peak_rss_kib(webhook_process.proc.pid) - idle) / 1024
    assert grown_mib < 100, f"peak RSS grew by {grown_mib:.0f} MiB"


async def _request(
    hook: Webhook, head: bytes, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(hook.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=hook.ssl_for(hook.ca), server_hostname=SERVICE_DNS
    )
    writer.write(head + body)
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    status_line = await asyncio.wait_for(reader.readline(), 10)
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def _post_head(length: int) -> bytes:
    return (
        f"POST /defaulting HTTP/1.1\r\nHost: {SERVICE_DNS}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_sigterm_drains_then_finishes_in_flight_reviews(tmp_path: Path) -> None:
    """A rollout (or a drained node) sends SIGTERM while the API server still routes reviews
    to this replica; with failurePolicy Ignore, each review lost is a pod that runs unfrozen
    for good. So: go unready and keep answering (with Connection: close, so the API server's
    keep-alive connections move to another replica) for --drain-delay, then stop listening and
    finish the reviews in flight."""
    hook = start_webhook(tmp_path, "--drain-delay", "1s", "--shutdown-timeout", "10s")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with s.get(
                        hook.url + "/readyz", ssl=hook.ssl_for(hook.ca), server_hostname=SERVICE_DNS
                    ) as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("webhook never became ready")
        body = json.dumps(review(knative_pod())).encode()
        # A review in flight: the API server has sent half of it when SIGTERM arrives.
        in_flight, writer = await _request(hook, _post_head(len(body)), body[:1000])
        hook.proc.send_signal(signal.SIGTERM)
        # Still answering during the drain delay, unready, and closing connections after use.
        for _ in range(100):
            reader, w2 = await _request(hook, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await _answer(reader)
            w2.close()
            if status == 503:
                break
            assert status == 200
        else:
            pytest.fail("still ready after SIGTERM")
        reader, w3 = await _request(hook, _post_head(len(body)), body)
        status, headers, answer = await _answer(reader)
        assert status == 200 and json.loads(answer)["response"]["allowed"] is True
        assert headers.get("connection", "").lower() == "close"
        w3.close()
        # Then it stops listening...
        port = int(hook.url.rsplit(":", 1)[1])
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
            except ConnectionRefusedError:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("still listening after the drain delay")
        # ... but the review in flight is answered, in full, before it exits.
        assert hook.proc.poll() is None
        writer.write(body[1000:])
        await writer.drain()
        status, _, answer = await _answer(in_flight)
        assert status == 200
        assert decode_patch(json.loads(answer)["response"])  # mutated as usual
        assert hook.proc.wait(timeout=10) == 0
    finally:
        if hook.proc.poll() is None:
            hook.proc.kill()
            hook.proc.wait()


# --- in-process: an exception from the mutation itself ------------------------------------------


async def test_mutator_exception_is_allowed_with_warning(aiohttp_client: AiohttpClient) -> None:
    def explode(pod: Any, settings: MutationSettings) -> MutationResult:
        raise RuntimeError("boom")

    client = await aiohttp_client(create_app(MutationSettings(proxy_image=IMAGE), explode))
    r = await client.post("/mutate", json=review(knative_pod(), "admission.k8s.io/v1beta1"))
    assert r.status == 200
    body = await r.json()
    assert body["apiVersion"] == "admission.k8s.io/v1beta1"
    assert body["response"]["allowed"] is True
    assert "RuntimeError: boom" in body["response"]["warnings"][0]


async def test_non_create_operations_pass_through(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(MutationSettings(proxy_image=IMAGE)))
    r = await client.post("/mutate", json=review(None, operation="DELETE", oldObject=knative_pod()))
    assert r.status == 200
    assert (await r.json())["response"]["allowed"] is True
