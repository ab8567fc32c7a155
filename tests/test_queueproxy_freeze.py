"""Knative's real queue-proxy in front of the real freeze-proxy in front of a frozen app.

The chain a mutated Knative pod runs, every link a real process: queue-proxy (the Go binary,
with the environment Knative's reconciler gives it, ``USER_PORT`` re-pointed at freeze-proxy as
the webhook does) → ``python -m freeze_proxy`` → the sleeptalker app in a container on the test
bed's containerd, paused and resumed by the real ``python -m daemon`` (which here checks a
locally minted token against a JWKS file: authentication against a real API server is
``tests/test_apiserver_daemon.py``'s job). The kernel's freezer state and the app's own tick
log say whether the app runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio

from freeze_proxy import contract
from testbed.pods import Pod
from testbed.queueproxy import QueueProxy, http_probe, tcp_probe
from testbed.stack import Proxy, Stack, stack
from tests.pod_checks import eventually
from webhook.mutation import rewrite_readiness_env

# One stack (containerd, daemon, app pod, freeze-proxy) for the module, one event loop for it;
# each test starts its own queue-proxy (it binds fixed ports, so one at a time).
pytestmark = [
    pytest.mark.queueproxy,
    pytest.mark.containerd,
    pytest.mark.asyncio(loop_scope="module"),
]

USER = "user-container"
TICK = 0.1  # the app prints a tick this often while it runs
GRACE = 0.25  # freeze-proxy's default idle grace
FIRST_LINE = b"Hello, this request will take two seconds..\n"
LAST_LINE = b".. world.\n"


@dataclass
class Chain:
    stack: Stack
    pod: Pod
    app_port: int
    proxy: Proxy
    binary: Path

    @property
    def proxy_port(self) -> int:
        port = urlsplit(self.proxy.url).port
        assert port is not None
        return port

    @property
    def health_port(self) -> int:
        port = urlsplit(self.proxy.health_url).port
        assert port is not None
        return port

    @contextlib.contextmanager
    def queue_proxy(self, readiness_probe: dict[str, Any] | None = None) -> Iterator[QueueProxy]:
        """queue-proxy with USER_PORT = freeze-proxy's port and its readiness probe of the app
        (Knative's default, a TCP probe of the app's port, unless given) as the webhook
        rewrites them."""
        probe = self.rewritten(readiness_probe or tcp_probe(self.app_port))
        with QueueProxy(self.proxy_port, binary=self.binary, readiness_probe=probe) as qp:
            yield qp

    def rewritten(self, probe: dict[str, Any]) -> dict[str, Any]:
        """SERVING_READINESS_PROBE as the webhook rewrites it for this chain's ports."""
        new = rewrite_readiness_env(json.dumps(probe), self.health_port, (self.proxy_port,))
        assert new is not None, probe
        rewritten: dict[str, Any] = json.loads(new)
        assert rewritten["httpGet"]["port"] == self.health_port
        return rewritten

    async def kubelet_probe(self, path: str) -> int:
        """A kubelet probe of the user container as the webhook re-aims it (an httpGet of the
        health port at ``path``, with kubelet's User-Agent)."""
        url = f"http://127.0.0.1:{self.health_port}{path}"
        headers = {"User-Agent": "kube-probe/1.33", contract.PROBE_TIMEOUT_HEADER: "1"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status

    def accept_queue(self) -> int:
        """Connections waiting in the app's accept queue (``ss``: Recv-Q of a LISTEN socket):
        a frozen app accepts none, so every TCP connect to its port would stay there."""
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{self.app_port}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return max((int(line.split()[1]) for line in out.splitlines() if line.strip()), default=0)

    def ticks(self) -> int:
        return sum(1 for line in self.pod.log_lines(USER) if line.startswith("tick "))

    def requests_seen(self) -> list[str]:
        return [line for line in self.pod.log_lines(USER) if line.startswith("request ")]

    async def health(self) -> dict[str, Any]:
        return await self.proxy.health()

    async def frozen_and_quiet(self, timeout: float = 5.0, quiet: float = 1.0) -> bool:
        """The gate paused the app (after the grace), the kernel agrees, and no tick is
        printed for ``quiet`` seconds (ten tick intervals)."""
        deadline = time.monotonic() + timeout
        while not (
            (await self.health())["state"] == "frozen" and self.pod.freezer_state(USER) == "FROZEN"
        ):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a tick printed just before the pause may still be on its way
        before = self.ticks()
        await asyncio.sleep(quiet)
        return self.ticks() == before and self.pod.freezer_state(USER) == "FROZEN"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(queue_proxy_binary: Path) -> AsyncIterator[Chain]:
    async with stack() as st:
        st.sleeptalker_image()
        pod, app_port = await st.sleeptalker_pod(tick=TICK)
        async with st.proxy(pod, app_port, f"--grace={GRACE * 1000:g}ms") as proxy:
            yield Chain(st, pod, app_port, proxy, queue_proxy_binary)


async def get(url: str) -> tuple[int, bytes, list[tuple[float, bytes]]]:
    """GET ``url``: status, body, and each chunk with the time it arrived (from the start)."""
    started = time.monotonic()
    chunks: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        async for chunk in resp.content.iter_any():
            chunks.append((time.monotonic() - started, chunk))
        return resp.status, b"".join(c for _, c in chunks), chunks


async def test_requests_flow_through_both_proxies_and_wake_the_frozen_app(chain: Chain) -> None:
    with chain.queue_proxy() as qp:
        assert await chain.frozen_and_quiet(), chain.proxy.log_file.read_text()[-2000:]
        before = await chain.health()
        ticks = chain.ticks()

        status, body, _ = await get(qp.url + "/hello?sleep=0.3")
        assert status == 200, (body, chain.proxy.log_file.read_text()[-3000:])
        assert body == FIRST_LINE + LAST_LINE
        # It reached the app (its own request log), which ran for it: ticks during the request.
        # (The app logs a request after its last byte; the CRI log lags its stdout a little.)
        assert await eventually(
            lambda: any(
                r.startswith("request GET /hello?sleep=0.3 200") for r in chain.requests_seen()
            )
        ), chain.requests_seen()
        assert await eventually(lambda: chain.ticks() >= ticks + 2)
        after = await chain.health()
        assert after["resumes"] == before["resumes"] + 1
        assert after["resume_failures"] == after["pause_failures"] == after["refused"] == 0

        # Idle again: frozen after the grace, silent while idle; and the next request wakes it.
        assert await chain.frozen_and_quiet()
        assert (await chain.health())["pauses"] == before["pauses"] + 1
        for _ in range(2):
            status, body, _ = await get(qp.url + "/again?sleep=0")
            assert (status, body) == (200, FIRST_LINE + LAST_LINE)
            assert await chain.frozen_and_quiet(quiet=0.5)
        assert not [line for line in qp.output().splitlines() if '"severity":"ERROR"' in line]


@pytest.mark.parametrize(
    "kind",
    [
        "tcpSocket at the app's port (Knative's default probe)",
        "httpGet of the app (aggressive, Knative's default period 0)",
        "httpGet of the app (periodSeconds 1, timeoutSeconds 1)",
    ],
)
async def test_readiness_probe_of_a_frozen_app_neither_wakes_it_nor_queues_a_connection(
    chain: Chain, kind: str
) -> None:
    """queue-proxy's readiness probe of the app as the webhook rewrites it: answered by
    freeze-proxy from the app's last result while the app is frozen — no resume, no request,
    and no connection left in the frozen app's accept queue (a TCP probe of the app itself
    leaves one per probe). A probe with no earlier result (this kind's first, the app frozen
    already) wakes the app once to get one."""
    if kind.startswith("tcpSocket"):
        probe = tcp_probe(chain.app_port)
    else:
        period = 1 if "periodSeconds 1" in kind else 0
        probe = http_probe(chain.app_port, "/healthz?sleep=0", period_seconds=period)
    with chain.queue_proxy(probe) as qp:
        assert await chain.frozen_and_quiet(quiet=0.5)
        first = await chain.health()
        seen = len(chain.requests_seen())
        assert qp.probe(timeout=15) == (200, "queue"), qp.output()[-2000:]
        woken = (await chain.health())["probe_wakes"] - first["probe_wakes"]
        if kind.startswith("tcpSocket"):
            assert woken == 0  # the proxy's start-up connect was this probe's first result
        else:
            # The real check, the app awake: the app answered the probe's GET itself.
            assert woken <= 1
            if woken:
                assert await eventually(lambda: len(chain.requests_seen()) > seen)
                assert chain.requests_seen()[seen].startswith("request GET /healthz?sleep=0 200")
        for _ in range(3):
            assert await chain.frozen_and_quiet(quiet=0.5)
            before = await chain.health()
            seen = len(chain.requests_seen())
            queued = chain.accept_queue()

            # kubelet's probe of queue-proxy (K-Network-Probe: queue), which asks freeze-proxy.
            assert qp.probe(timeout=15) == (200, "queue"), qp.output()[-2000:]

            after = await chain.health()
            assert after["resumes"] == before["resumes"], after
            assert after["probe_wakes"] == before["probe_wakes"], after
            assert after["probes_from_last_result"] > before["probes_from_last_result"], after
            assert after["state"] == "frozen" and chain.pod.freezer_state(USER) == "FROZEN"
            assert chain.accept_queue() == queued
            assert len(chain.requests_seen()) == seen
        # A request still wakes it, and it is frozen again after.
        status, body, _ = await get(qp.url + "/after-probes?sleep=0")
        assert (status, body) == (200, FIRST_LINE + LAST_LINE)
        assert await chain.frozen_and_quiet()


async def test_a_frozen_app_probed_hundreds_of_times_stays_ready_and_is_never_woken(
    chain: Chain,
) -> None:
    """Before probes were answered by freeze-proxy, a tcpSocket probe of the app completed a
    handshake with the frozen app and left the connection in its accept queue (sleeptalker's
    backlog is aiohttp's 128: probe 130 and every one after answered 503 — in a cluster ~22 min
    of kubelet probes every 10 s, then a NotReady pod no request would ever wake); freeze-proxy
    then polled that queue and woke the app to drain it. Now: Knative's default readiness
    probe and kubelet's tcpSocket and httpGet liveness probes, re-aimed by the webhook, 160
    times each while frozen: all pass, and the app is never resumed."""
    probes = 160
    liveness = [
        contract.probe_path(contract.PROBE_TCP, chain.app_port, whole_path=False),
        contract.probe_path(contract.PROBE_HTTP, chain.app_port, "/live?sleep=0", whole_path=False),
    ]
    with chain.queue_proxy(tcp_probe(chain.app_port)) as qp:
        # One real check each while the app is awake (a request woke it): their last results.
        # (Within the grace; should the app be frozen first, the check wakes it once.)
        status, _, _ = await get(qp.url + "/wake?sleep=0")
        assert status == 200
        assert [await chain.kubelet_probe(path) for path in liveness] == [200, 200]
        assert await chain.frozen_and_quiet(quiet=0.3)
        before = await chain.health()
        queued = chain.accept_queue()
        results = []
        for _ in range(probes):
            results.append(qp.probe(timeout=15)[0])
            for path in liveness:
                results.append(await chain.kubelet_probe(path))
        assert results == [200] * probes * 3, results
        after = await chain.health()
        assert after["resumes"] == before["resumes"], after
        assert after["probe_wakes"] == before["probe_wakes"], after
        assert after["probes_from_last_result"] - before["probes_from_last_result"] >= 3 * probes
        assert chain.accept_queue() == queued  # not one connection waits at the app
        assert after["state"] == "frozen" and chain.pod.freezer_state(USER) == "FROZEN"


async def test_streaming_response_keeps_the_app_awake_until_the_last_byte(chain: Chain) -> None:
    sleep = 1.5  # between the app's two lines; six graces long
    with chain.queue_proxy() as qp:
        assert await chain.frozen_and_quiet()
        before = await chain.health()
        request = asyncio.ensure_future(get(f"{qp.url}/stream?sleep={sleep}"))

        # Mid-stream, long after a grace would have run out if the gate thought it idle.
        await asyncio.sleep(1.0)
        assert not request.done()
        mid = await chain.health()
        assert (mid["state"], mid["in_flight"]) == ("awake", 1), mid
        assert chain.pod.freezer_state(USER) == "THAWED"
        ticks = chain.ticks()
        await asyncio.sleep(0.4)
        assert chain.ticks() >= ticks + 2  # it runs, producing the rest of its response

        status, body, chunks = await request
        assert status == 200
        assert body == FIRST_LINE + LAST_LINE
        # Streamed through both proxies: the first line arrived at once, the last after `sleep`.
        assert b"".join(c for t, c in chunks if t < 1.0) == FIRST_LINE, chunks
        assert chunks[0][0] < 0.5 and chunks[-1][0] >= sleep, chunks
        after = await chain.health()
        assert after["pauses"] == before["pauses"]  # never paused mid-response
        assert after["resumes"] == before["resumes"] + 1

        assert await chain.frozen_and_quiet()
        assert (await chain.health())["pauses"] == before["pauses"] + 1
