"""Probes of the user container on the health port (freeze_proxy/probes.py).

While the app is awake: a real check of the app (a TCP connect, or a GET passed on with the
prober's headers), failures included. While it is frozen: the app's last result, the app
untouched (no resume, no request). A check holds the gate: the app is not paused mid-probe.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest

from freeze_proxy import contract
from freeze_proxy.gate import AppState
from freeze_proxy.probes import DEFAULT_TIMEOUT, Probe, Verdict, decide, probe_request, tcp_check
from testbed.processes import free_port
from tests.proxy_harness import Harness, start_harness, start_site


def health_base(h: Harness) -> str:
    return h.health_url.removesuffix(contract.HEALTH_PATH)


async def get(
    h: Harness, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(health_base(h) + path, headers=headers, skip_auto_headers=["User-Agent"]) as r,
    ):
        return r.status, json.loads(await r.read())


async def ready(h: Harness) -> tuple[int, dict[str, object]]:
    return await get(h, contract.READY_PATH)


def http(h: Harness, path: str, whole_path: bool = False) -> str:
    return contract.probe_path(contract.PROBE_HTTP, h.app_port, path, whole_path=whole_path)


def tcp(h: Harness, whole_path: bool = False) -> str:
    return contract.probe_path(contract.PROBE_TCP, h.app_port, whole_path=whole_path)


async def health(h: Harness) -> dict[str, object]:
    return (await get(h, contract.HEALTH_PATH))[1]


# --- the paths (contract.py: the webhook writes them, the proxy reads them) --------------------


@pytest.mark.parametrize("whole_path", [True, False])
@pytest.mark.parametrize(
    ("kind", "app_path", "target"),
    [
        ("tcp", "", ""),
        ("http", "/healthz", "/healthz"),
        ("http", "healthz", "/healthz"),
        ("http", "", "/"),
        ("http", "/", "/"),
        ("http", "/a/b?x=1&y=/z", "/a/b?x=1&y=/z"),
    ],
)
def test_probe_paths_round_trip(whole_path: bool, kind: str, app_path: str, target: str) -> None:
    path = contract.probe_path(kind, 8080, app_path, whole_path=whole_path)
    assert path.startswith(contract.READY_PATH if whole_path else contract.PROBE_PATH)
    assert contract.parse_probe_path(path) == (whole_path, kind, 8080, target)


@pytest.mark.parametrize("target", ["/ready", "/ready?x=1"])
def test_a_bare_ready_checks_the_apps_own_port(target: str) -> None:
    """What freeze-pod-version 5 pods ask (port 0: the proxy's upstream)."""
    assert contract.parse_probe_path(target) == (True, "tcp", 0, "")


@pytest.mark.parametrize("target", ["/healthz", "/", "/readyz", "/probes/tcp/1", "/prob"])
def test_other_paths_are_not_probes(target: str) -> None:
    assert contract.parse_probe_path(target) is None


@pytest.mark.parametrize(
    "target",
    [
        "/probe/udp/80",
        "/probe/tcp/0",
        "/probe/tcp/65536",
        "/probe/http/x/",
        "/ready/tcp/",
        "/probe/",
    ],
)
def test_malformed_probe_paths_raise(target: str) -> None:
    with pytest.raises(ValueError):
        contract.parse_probe_path(target)
    with pytest.raises(ValueError):
        contract.probe_path("grpc", 80, whole_path=False)


def test_the_apps_request_is_the_probes() -> None:
    probe = Probe(
        "http",
        "10.0.0.5",
        8080,
        "/healthz?deep=1",
        headers=((b"Host", b"10.0.0.5:9998"), (b"User-Agent", b"kube-probe/1.33"), (b"X-A", b"1")),
    )
    assert probe_request(probe) == (
        b"GET /healthz?deep=1 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nUser-Agent: kube-probe/1.33\r\n"
        b"X-A: 1\r\nconnection: close\r\n\r\n"
    )
    # A Host the probe set itself (httpHeaders) is kept; none at all: the app's address.
    custom = Probe("http", "127.0.0.1", 8080, "/", headers=((b"host", b"app.example"),))
    assert b"host: app.example\r\n" in probe_request(custom)
    bare = Probe("http", "127.0.0.1", 8080, "/")
    assert probe_request(bare).startswith(b"GET / HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n")


# --- the decision ----------------------------------------------------------------------------

PASSED, FAILED = Verdict(True, "passed"), Verdict(False, "failed")


@pytest.mark.parametrize("whole_path", [True, False])
@pytest.mark.parametrize("last", [None, PASSED, FAILED])
@pytest.mark.parametrize("state", [None, AppState.AWAKE])
def test_an_awake_app_is_checked(
    whole_path: bool, last: Verdict | None, state: AppState | None
) -> None:
    assert (
        decide(whole_path=whole_path, stopping=False, serving=True, state=state, last=last) is None
    )


@pytest.mark.parametrize("started", [True, False])
@pytest.mark.parametrize("whole_path", [True, False])
@pytest.mark.parametrize("state", [AppState.FROZEN, AppState.PAUSING, AppState.RESUMING])
def test_a_frozen_app_is_answered_from_its_last_result(
    started: bool, whole_path: bool, state: AppState
) -> None:
    for last in (PASSED, FAILED):
        got = decide(
            whole_path=whole_path,
            stopping=False,
            serving=True,
            state=state,
            last=last,
            started=started,
        )
        assert got is not None and got.ready is last.ready, got
        assert got.status == (200 if last.ready else 503)
        assert state.value in got.cause and last.cause in got.cause
    # Nothing to answer from: check it (the gate wakes the app first), once the app is known
    # to listen; before, not ready.
    none = decide(
        whole_path=whole_path, stopping=False, serving=True, state=state, last=None, started=started
    )
    if started:
        assert none is None
    else:
        assert none is not None and not none.ready and "not accepted" in none.cause


@pytest.mark.parametrize("last", [None, PASSED, FAILED])
@pytest.mark.parametrize("state", [None, *AppState])
def test_queue_proxys_probes_need_a_serving_proxy_kubelets_do_not(
    last: Verdict | None, state: AppState | None
) -> None:
    stopping = decide(whole_path=True, stopping=True, serving=True, state=state, last=last)
    assert stopping == Verdict(False, "freeze-proxy is shutting down")
    closed = decide(whole_path=True, stopping=False, serving=False, state=state, last=last)
    assert closed == Verdict(False, "freeze-proxy does not listen on its serving port")
    # A liveness probe must not restart the app because its proxy stops or restarts.
    for stop, serve in ((True, True), (False, False), (True, False)):
        kubelet = decide(whole_path=False, stopping=stop, serving=serve, state=state, last=last)
        assert kubelet == decide(
            whole_path=False, stopping=False, serving=True, state=state, last=last
        )


async def test_the_tcp_check_is_bounded() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, a connect hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):  # backlog 0 still queues one; be generous
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            verdict = await tcp_check(Probe("tcp", "127.0.0.1", port, timeout=0.3))
            took = loop.time() - started
            assert not verdict.ready and "within 0.3 s" in verdict.cause, verdict
            assert 0.25 < took < 1.0, took
        finally:
            for s in fillers:
                s.close()


async def test_a_refused_connection_names_its_cause() -> None:
    port = free_port()
    verdict = await tcp_check(Probe("tcp", "127.0.0.1", port, timeout=DEFAULT_TIMEOUT))
    assert not verdict.ready and str(port) in verdict.cause
    assert "Connect call failed" in verdict.cause or "refused" in verdict.cause, verdict


# --- the endpoint, on the in-process proxy -----------------------------------------------------


async def test_awake_the_app_is_checked_for_real(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, grace=60.0, state_file=tmp_path / "may-be-frozen")
    try:
        headers = {
            "X-Check": "deep",
            contract.PROBE_TIMEOUT_HEADER: "2",
            "User-Agent": "kube-probe/1.33",
        }
        status, body = await get(h, http(h, "/code/204?sleep=0"), headers)
        assert (status, body["ready"], body["state"]) == (200, True, "awake"), body
        path, seen = h.app.seen[-1]
        assert path == "/code/204?sleep=0"
        assert seen["X-Check"] == "deep" and seen["User-Agent"] == "kube-probe/1.33"
        assert contract.PROBE_TIMEOUT_HEADER not in seen
        assert seen["Host"].endswith(f":{h.app_port}"), seen

        for code in (301, 399):
            assert (await get(h, http(h, f"/code/{code}")))[0] == 200
        for code in (400, 500, 503):
            status, body = await get(h, http(h, f"/code/{code}"))
            assert (status, body["ready"]) == (503, False), body
            assert str(code) in str(body["cause"]), body

        assert (await get(h, tcp(h)))[0] == 200
        closed = contract.probe_path("tcp", free_port(), whole_path=False)
        status, body = await get(h, closed)
        assert status == 503 and "does not accept connections" in str(body["cause"]), body
        # The probe's own timeout bounds the check.
        slow = http(h, "/code/200?sleep=1.5")
        status, body = await get(h, slow, {contract.PROBE_TIMEOUT_HEADER: "0.3"})
        assert status == 503 and "within 0.3 s" in str(body["cause"]), body
        assert (await health(h))["probe_wakes"] == 0
    finally:
        await h.close()


async def test_frozen_the_last_result_is_answered_without_waking_the_app(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, grace=0.3, state_file=tmp_path / "may-be-frozen")
    try:
        paths = {
            http(h, "/code/200"): 200,
            http(h, "/code/500"): 503,
            tcp(h): 200,
            tcp(h, whole_path=True): 200,
            http(h, "/code/200", whole_path=True): 200,
            contract.READY_PATH: 200,
        }
        for path, status in paths.items():  # awake (within the grace): real checks
            assert (await get(h, path))[0] == status, path
        await h.wait_for(lambda: h.daemon.frozen)
        thaws, seen = h.daemon.count("thaw"), len(h.app.seen)
        for _ in range(100):
            for path, status in paths.items():
                got, body = await get(h, path)
                assert (got, body["state"]) == (status, "frozen"), (path, body)
        assert "frozen" in str(body["cause"]) and "last check" in str(body["cause"]), body
        assert h.daemon.count("thaw") == thaws and h.daemon.frozen
        assert len(h.app.seen) == seen  # not a single request reached the app
        counters = await health(h)
        assert counters["probe_wakes"] == 0 and counters["resumes"] == 0, counters
        assert counters["probes_from_last_result"] == 100 * len(paths), counters
    finally:
        await h.close()


async def test_a_probe_with_no_earlier_result_wakes_the_app_once(harness: Harness) -> None:
    """The first probe of its kind arriving while the app is frozen (grace 0: frozen as soon as
    it idled): nothing to answer from, so it is checked like a request — resumed first, and not
    paused until the check has its answer (the app's ``/code`` records a violation if it is
    frozen while it answers)."""
    assert harness.daemon.frozen
    thaws = harness.daemon.count("thaw")
    probe = http(harness, "/code/200?sleep=0.3")
    assert (await get(harness, probe))[0] == 200
    assert harness.daemon.count("thaw") == thaws + 1
    await harness.wait_for(lambda: harness.daemon.frozen)
    for _ in range(20):
        assert (await get(harness, probe))[0] == 200
    assert harness.daemon.count("thaw") == thaws + 1
    counters = await health(harness)
    assert counters["probe_wakes"] == 1 and counters["probes_from_last_result"] == 20, counters


async def test_concurrent_probes_share_one_check(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, grace=60.0)
    try:
        seen = len(h.app.seen)
        results = await asyncio.gather(*(get(h, http(h, "/code/200?sleep=0.2")) for _ in range(8)))
        assert [status for status, _ in results] == [200] * 8
        assert len(h.app.seen) == seen + 1
    finally:
        await h.close()


@pytest.mark.parametrize("state_dir", ["usable", "missing"])
async def test_ready_once_the_app_listens(tmp_path: Path, state_dir: str) -> None:
    """Without a usable state dir the proxy starts as if the app may be frozen (marker.py):
    then the app's own first accept (the proxy's start-up check) is what makes it ready, and
    no probe resumes it before (the resume could only fail until the app listens)."""
    state_file = tmp_path / "may-be-frozen" if state_dir == "usable" else None
    h = await start_harness(tmp_path, grace=60.0, start_app=False, state_file=state_file)
    try:
        for probe in (contract.READY_PATH, http(h, "/code/200")):
            status, body = await get(h, probe)
            assert status == 503, body
            if state_dir == "usable":
                assert body["state"] == "awake" and str(h.app_port) in str(body["cause"]), body
            else:
                assert body["state"] == "frozen" and "not accepted" in str(body["cause"]), body
        assert h.daemon.count("thaw") == 0 and (await health(h))["probe_wakes"] == 0
        h.runners.append(await start_site(h.app.app(), h.app_port))
        for _ in range(100):  # the start-up check polls every 50 ms
            status, body = await ready(h)
            if status == 200:
                break
            await asyncio.sleep(0.02)
        assert (status, body["ready"]) == (200, True), body
        assert h.app.seen == []  # a TCP connect, never a request to the app
    finally:
        await h.close()


async def test_ready_while_frozen_without_waking_the_app(harness: Harness) -> None:
    """The start-up check's accept is the ready check's first result."""
    thaws = harness.daemon.count("thaw")
    status, body = await ready(harness)
    assert (status, body["ready"], body["state"]) == (200, True, "frozen"), body
    assert harness.daemon.count("thaw") == thaws and harness.daemon.frozen
    assert harness.app.seen == []


@pytest.mark.parametrize(
    ("path", "status"),
    [("/nope", 404), ("/probe/udp/80", 400), ("/probe/tcp/x", 400), ("/ready/http/0/", 400)],
)
async def test_the_health_port_names_what_it_serves(
    harness: Harness, path: str, status: int
) -> None:
    got, body = await get(harness, path)
    assert got == status, body
    if status == 404:
        assert contract.READY_PATH in str(body["error"]) and contract.PROBE_PATH in str(
            body["error"]
        )


async def test_a_probe_of_the_proxys_own_ports_is_refused(harness: Harness) -> None:
    health_port = int(harness.health_url.rsplit(":", 1)[1].split("/")[0])
    for port in (health_port, int(harness.proxy_url.rsplit(":", 1)[1])):
        got, body = await get(harness, contract.probe_path("http", port, "/", whole_path=False))
        assert got == 400 and "own" in str(body["error"]), body


async def test_an_oversized_head_on_the_health_port_is_refused_and_closed(
    harness: Harness,
) -> None:
    health_port = int(harness.health_url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", health_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"x" * 20000)  # the head never ends
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    writer.close()
    got, body = await get(harness, contract.HEALTH_PATH)
    assert got == 200, body  # and it still serves
