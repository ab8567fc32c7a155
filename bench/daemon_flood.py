"""Row: a pod's wake while another pod floods the node daemon (issue #11, item 5).

Every pod of a node can reach freeze-daemon's hostPort, and behind hostPort's SNAT they all
arrive from one address. This row times what matters under attack: a good-token thaw of a
frozen pod on real containerd (a new connection per wake, as after an idle keep-alive closed),
side by side

- quiet;
- during a flood of bad tokens (junk and validly shaped tokens signed by a stranger's key) from
  the same address, over 16 keep-alive connections, as fast as the daemon answers;
- the same flood with the refusal limiter off (``--refusal-rate=0``): every bad token verified;
- during a flood of held connections: twice ``--max-connections``, half idle, half trickling a
  request head, each reopened as soon as the daemon closes it.

- during a hostile flood against a daemon that checks tokens with a real kube-apiserver (keys
  from its ``/openid/v1/jwks``, every token confirmed by TokenReview, as shipped): random
  ``kid``s, stranger-signed tokens with the API server's own ``kid``, 1 MB tokens and bodies
  trickled a byte at a time; the good pod's token is a real pod-bound TokenRequest token, and
  the row counts the requests the daemon made to the API server meanwhile
  (:func:`apiserver_flood`, also run by ``tests/test_apiserver_flood.py``).

The flood runs in its own process (``python -m bench.daemon_flood tokens|held ...``), so it
competes with the daemon for the CPU as an attacking pod would, not with the timing client.
Freezes are not rate-limited here (``--freeze-rate=0``): the row freezes and thaws one pod
hundreds of times a minute on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Table, percentile
from testbed import tokens
from testbed.containerd import missing_prerequisites
from testbed.pods import Pod, ticker
from testbed.stack import program, stack

BENCH = "daemon_flood"
MAX_CONNECTIONS = 256  # the daemons' --max-connections here (default 1024): a quicker fill
DAEMON_ARGS = ["--freeze-rate=0", f"--max-connections={MAX_CONNECTIONS}"]


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    asyncio.run(_run(table, rounds=15 if quick else 150))
    _run_apiserver(table, seconds=5.0 if quick else FLOOD_SECONDS)


async def _run(table: Table, rounds: int) -> None:
    async with stack(daemon_args=DAEMON_ARGS) as st:
        pod = await st.client.create_pod([ticker()], name="woken", namespace="bench")
        token = Path(st.token_file(pod)).read_text()
        async with st.extra_daemon(*DAEMON_ARGS, "--refusal-rate=0") as (unlimited_url, _):
            scenarios: list[tuple[str, str, list[str]]] = [
                ("quiet", st.daemon_url, []),
                ("bad-token flood", st.daemon_url, ["tokens", st.daemon_url]),
                ("bad-token flood, no limiter", unlimited_url, ["tokens", unlimited_url]),
                (
                    f"held-connection flood ({2 * MAX_CONNECTIONS})",
                    st.daemon_url,
                    ["held", st.daemon_url, str(2 * MAX_CONNECTIONS)],
                ),
            ]
            for name, url, flood in scenarios:
                retries = [0]
                async with _flood(st.work, flood) as counts:
                    wakes = await _wakes(url, token, pod, rounds, retries)
                values: dict[str, float | int | str] = {
                    "p50_ms": round(percentile(wakes, 50), 2),
                    "p99_ms": round(percentile(wakes, 99), 2),
                    "max_ms": round(max(wakes), 2),
                    "wakes": len(wakes),
                    "retried": retries[0],
                }
                note = ""
                if counts:
                    seconds = counts.pop("seconds", 1) or 1
                    total = sum(v for k, v in counts.items() if k.isdigit())
                    if total:
                        values["flood_per_s"] = round(total / seconds)
                    note = "flood answers: " + ", ".join(f"{k}: {v}" for k, v in counts.items())
                table.add(BENCH, name, note=note, **values)


async def _wakes(url: str, token: str, pod: Pod, rounds: int, retries: list[int]) -> list[float]:
    """Freeze (untimed), then time a thaw with the pod's good token; a new connection each.
    A call whose connection is closed is retried like the proxy retries a resume (counted)."""
    headers = {"Token": token}
    out: list[float] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(rounds):
            await _post(http, f"{url}/freeze", headers, retries)
            await pod.wait_frozen("user-container")
            await asyncio.sleep(0.02)
            started = time.perf_counter()
            await _post(http, f"{url}/thaw", headers, retries)
            out.append((time.perf_counter() - started) * 1000)
    return out


async def _post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], retries: list[int]
) -> None:
    for attempt in range(50):
        try:
            async with http.post(url, headers=headers) as r:
                body = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}: {body}")
            return
        except aiohttp.ClientError:
            retries[0] += 1
            await asyncio.sleep(min(0.01 * 2**attempt, 0.5))
    raise RuntimeError(f"{url} failed 50 times")


@contextlib.asynccontextmanager
async def _flood(work: Path, args: list[str]) -> AsyncIterator[dict[str, Any]]:
    """Run a flood child for the block; yields its counts (filled in when it has stopped)."""
    counts: dict[str, Any] = {}
    if not args:
        yield counts
        return
    out = work / f"flood-{uuid.uuid4().hex[:6]}.json"
    async with program(["bench.daemon_flood", *args, str(out)], work / "flood.log") as proc:
        await asyncio.sleep(1.0)  # let it reach full speed
        if proc.poll() is not None:
            raise RuntimeError(
                f"the flood exited early: {(work / 'flood.log').read_text()[-2000:]}"
            )
        yield counts
    with contextlib.suppress(OSError, ValueError):
        counts.update(json.loads(out.read_text()))


# --------------------------------------------------------------------------- vs kube-apiserver

FLOOD_SECONDS = 30.0
AUDIENCE = "freeze"
RBAC = Path(__file__).resolve().parent.parent / "config" / "200-tokenreview-rbac.yaml"


def _run_apiserver(table: Table, seconds: float) -> None:
    from testbed import gobins
    from testbed.apiserver import ApiServer

    name = "bad-token flood vs real kube-apiserver"
    try:
        bins = gobins.binaries("etcd", "kube-apiserver", "kubectl", build=False)
    except gobins.BuildError as e:
        table.add(BENCH, name, result=f"skipped: {str(e)[:200]}")
        return
    api = ApiServer(
        etcd_bin=bins["etcd"], apiserver_bin=bins["kube-apiserver"], kubectl_bin=bins["kubectl"]
    )
    api.start()
    try:

        async def go() -> dict[str, Any]:
            async with stack(daemon_args=DAEMON_ARGS) as st:
                return await apiserver_flood(api, st.containerd, st.client, st.work, seconds)

        got = asyncio.run(go())
    finally:
        api.stop()
    flood = got.pop("flood_answers")
    table.add(
        BENCH,
        name,
        note="flood answers: " + ", ".join(f"{k}: {v}" for k, v in flood.items()),
        **{k: v for k, v in got.items() if isinstance(v, int | float | str)},
    )


def _kubectl_apply(api: Any, manifest: dict[str, Any]) -> None:
    api.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def apiserver_flood(
    api: Any,
    containerd: Any,
    pods: Any,
    work: Path,
    seconds: float,
    *,
    quiet_wakes: int = 30,
    daemon_extra: Sequence[str] = (),
) -> dict[str, Any]:
    """A good pod's wakes, quiet then during ``seconds`` of a hostile flood, with freeze-daemon
    checking tokens against the real kube-apiserver ``api`` (testbed.apiserver.ApiServer) as
    shipped: keys and issuer from the API server, TokenReview on, default limits (freezes not
    rate-limited: the wakes freeze one pod many times a second on purpose).

    The good pod is an API pod with a CRI twin of the same uid on ``containerd`` (created with
    ``pods``, a testbed.pods.PodClient), its token a pod-bound TokenRequest token as kubelet
    would mount. Returns the figures: wake percentiles, the API server requests the daemon made
    during the flood (its own counters, and the API server's ``apiserver_request_total`` for
    tokenreviews), the daemon's peak RSS, and what the flood got. ``daemon_extra``: more flags
    (e.g. ``--refusal-rate=0``, every bad token verified).
    """
    from testbed.kubeconfig import service_account_kubeconfig
    from testbed.processes import free_port
    from testbed.stack import wait_http

    _kubectl_apply(
        api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "knative-serving"}}
    )
    api.kubectl("apply", "-f", str(RBAC))
    namespace = f"flood-{uuid.uuid4().hex[:6]}"
    api.kubectl("create", "namespace", namespace)
    api.kubectl("-n", namespace, "create", "serviceaccount", "app")
    kubeconfig = service_account_kubeconfig(
        api, "knative-serving", "freeze-tokenreview", work / "flood-kubeconfig"
    )
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "woken", "namespace": namespace},
        "spec": {
            "serviceAccountName": "app",
            "automountServiceAccountToken": False,
            "containers": [{"name": "user-container", "image": "registry.invalid/app:1"}],
        },
    }
    out = api.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(manifest))
    uid: str = json.loads(out.stdout)["metadata"]["uid"]
    pod = await pods.create_pod([ticker()], name="woken", namespace=namespace, uid=uid)
    token = api.kubectl(
        "-n", namespace, "create", "token", "app", f"--audience={AUDIENCE}",
        "--bound-object-kind=Pod", "--bound-object-name=woken", f"--bound-object-uid={uid}",
        "--duration=1h",
    ).stdout.strip()  # fmt: skip
    code, raw = api.get("/openid/v1/jwks")
    assert code == 200, raw[:200]
    known_kid = json.loads(raw)["keys"][0]["kid"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    daemon_args = [
        "daemon", f"--listen=127.0.0.1:{port}", f"--kubeconfig={kubeconfig}",
        "--runtime=containerd", f"--containerd-socket={containerd.socket}",
        f"--containerd-namespace={containerd.namespace}", "--freeze-rate=0", *daemon_extra,
    ]  # fmt: skip
    async with program(daemon_args, work / "flood-daemon.log") as daemon:
        await wait_http(f"{url}/healthz")
        retries = [0]
        await _wakes(url, token, pod, 3, retries)  # warm: keys loaded, token reviewed
        quiet = await _wakes(url, token, pod, quiet_wakes, retries)

        async def scrape() -> tuple[str, str]:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
                mine = await r.text()
            code, theirs = await asyncio.to_thread(api.get, "/metrics")
            assert code == 200, theirs[:200]
            return mine, theirs.decode()

        rss = [_rss_mib(daemon.pid)]
        before = await scrape()
        flood = ["hostile", url, known_kid]
        async with _flood(work, flood) as counts:
            until = time.monotonic() + seconds
            loud: list[float] = []
            while time.monotonic() < until:
                loud += await _wakes(url, token, pod, 1, retries)
                rss.append(_rss_mib(daemon.pid))
        after = await scrape()
        rss.append(_rss_mib(daemon.pid))

    def delta(side: int, name: str, **labels: str) -> int:
        return round(_metric(after[side], name, **labels) - _metric(before[side], name, **labels))

    reviews = delta(0, "freeze_daemon_token_reviews_total")
    fetches = delta(0, "freeze_daemon_jwks_fetches_total")
    counts.pop("seconds", None)
    flooded = sum(v for k, v in counts.items() if k.isdigit())
    return {
        "flood_s": seconds,
        "quiet_p50_ms": round(percentile(quiet, 50), 2),
        "quiet_p99_ms": round(percentile(quiet, 99), 2),
        "p50_ms": round(percentile(loud, 50), 2),
        "p99_ms": round(percentile(loud, 99), 2),
        "max_ms": round(max(loud), 2),
        "wakes": len(loud),
        "retried": retries[0],
        "flood_requests": flooded,
        "flood_per_s": round(flooded / seconds),
        "token_reviews": reviews,
        "jwks_fetches": fetches,
        # each key-set fetch from the API server is two GETs (OIDC discovery, then the JWKS)
        "api_requests": reviews + 2 * fetches,
        "apiserver_tokenreviews": delta(1, "apiserver_request_total", resource="tokenreviews"),
        "daemon_rss_mib_before": round(rss[0], 1),
        "daemon_rss_mib_max": round(max(rss), 1),
        "flood_answers": dict(counts),
    }


# --------------------------------------------------------------------------- the flood child


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _connect(
    host: str, port: int, counts: Counter[str], backoff: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection to the daemon for a flooder, or None after ``backoff`` seconds (counted as
    ``connect_error``: the daemon refused or dropped it; the flooder tries again)."""
    try:
        return await asyncio.open_connection(host, port)
    except OSError:
        counts["connect_error"] += 1
        await asyncio.sleep(backoff)
        return None


async def _count_answer(reader: asyncio.StreamReader, counts: Counter[str]) -> None:
    """Read one Content-Length answer of the daemon and count it by status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    counts[head.split()[1].decode()] += 1


async def _send_tokens(
    host: str,
    port: int,
    action: str,
    next_token: Callable[[], str],
    counts: Counter[str],
    stop: asyncio.Event,
) -> None:
    """One flooder: ``POST /<action>`` with ``next_token()`` on a kept-alive connection, each
    answer counted by status; a new connection whenever the daemon closes it, until ``stop``."""
    while not stop.is_set():
        if (conn := await _connect(host, port, counts, 0.01)) is None:
            continue
        reader, writer = conn
        try:
            while not stop.is_set():
                writer.write(
                    f"POST /{action} HTTP/1.1\r\nHost: x\r\nToken: {next_token()}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                await _count_answer(reader, counts)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counts["closed"] += 1
        finally:
            writer.close()


async def _bad_tokens(url: str, counts: Counter[str], stop: asyncio.Event) -> None:
    host, port = url.removeprefix("http://").split(":")
    stranger = tokens.new_rsa_key()
    forged = [
        tokens.mint_token(stranger, pod_uid=str(uuid.uuid4()), pod_name="x", namespace="x")
        for _ in range(64)
    ]
    junk = ["junk", "a.b.c", *forged]

    def junk_from(i: int) -> Callable[[], str]:
        n = itertools.count(i + 1)
        return lambda: junk[next(n) % len(junk)]

    await asyncio.gather(
        *(_send_tokens(host, int(port), "freeze", junk_from(i), counts, stop) for i in range(16))
    )


async def _held(url: str, n: int, counts: Counter[str], stop: asyncio.Event) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def one(i: int) -> None:
        while not stop.is_set():
            if (conn := await _connect(host, int(port), counts, 0.05)) is None:
                continue
            reader, writer = conn
            counts["opened"] += 1
            try:
                if i % 2:
                    writer.write(b"POST /thaw HTTP/1.1\r\nHost: x\r\n")
                while not stop.is_set():
                    if i % 2:
                        writer.write(b"X")
                    try:
                        if not await asyncio.wait_for(reader.read(1024), 1.0):
                            break  # closed by the daemon
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                counts["closed_by_daemon"] += 0 if stop.is_set() else 1
                writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _hostile(url: str, known_kid: str, counts: Counter[str], stop: asyncio.Event) -> None:
    """Every kind of bad token at once, each from its own connections (see the module doc)."""
    import os

    host, port = url.removeprefix("http://").split(":")
    stranger = tokens.new_rsa_key(kid=known_kid)  # the API server's kid, not its key
    forged = [
        tokens.mint_token(stranger, pod_uid=str(uuid.uuid4()), pod_name="x", namespace="x")
        for _ in range(32)
    ]
    payload = forged[0].split(".")[1]

    def random_kid() -> str:
        header = json.dumps({"alg": "RS256", "kid": os.urandom(12).hex(), "typ": "JWT"})
        return f"{_b64(header.encode())}.{payload}.{_b64(os.urandom(256))}"

    async def huge() -> None:
        blob = "A" * 1_000_000
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"POST /thaw HTTP/1.1\r\nHost: x\r\nToken: {blob}\r\n\r\n".encode())
                await asyncio.wait_for(_count_answer(reader, counts), 5)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                counts["huge_reset"] += 1
            else:
                writer.close()
            await asyncio.sleep(0.05)

    async def slow_body(i: int) -> None:
        while not stop.is_set():
            if (conn := await _connect(host, int(port), counts, 0.05)) is None:
                continue
            reader, writer = conn
            try:
                writer.write(
                    f"POST / HTTP/1.1\r\nHost: x\r\nToken: {forged[i % len(forged)]}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{".encode()
                )
                while not stop.is_set():
                    writer.write(b" ")
                    try:
                        first = await asyncio.wait_for(reader.read(1024), 0.5)
                    except TimeoutError:
                        continue
                    counts[f"slow_body_{first.split()[1].decode() if first else 'closed'}"] += 1
                    break
            except (OSError, IndexError):
                counts["slow_body_closed"] += 1
            finally:
                writer.close()

    forged_n = itertools.count()

    def next_forged() -> str:
        return forged[next(forged_n) % len(forged)]

    await asyncio.gather(
        *(_send_tokens(host, int(port), "thaw", random_kid, counts, stop) for _ in range(8)),
        *(_send_tokens(host, int(port), "thaw", next_forged, counts, stop) for _ in range(8)),
        huge(),
        *(slow_body(i) for i in range(32)),
    )


async def _child(kind: str, url: str, rest: list[str]) -> None:
    out = Path(rest[-1])
    _raise_nofile()
    counts: Counter[str] = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    started = time.monotonic()
    if kind == "tokens":
        work = asyncio.ensure_future(_bad_tokens(url, counts, stop))
    elif kind == "hostile":
        work = asyncio.ensure_future(_hostile(url, rest[0], counts, stop))
    else:
        work = asyncio.ensure_future(_held(url, int(rest[0]), counts, stop))
    await stop.wait()
    await asyncio.wait([work], timeout=3)
    work.cancel()
    out.write_text(json.dumps({**counts, "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
