"""``GET /ready`` on the health port: what queue-proxy's readiness probe asks (readiness.py).

Ready only when freeze-proxy serves and the app accepts connections; while the app is frozen
(or a pause/resume is in flight) the app's last result, without connecting to it.
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
from freeze_proxy.readiness import AppProbe, Verdict, decide
from testbed.processes import free_port
from tests.proxy_harness import Harness, start_harness, start_site


async def ready(h: Harness) -> tuple[int, dict[str, object]]:
    url = h.health_url.replace(contract.HEALTH_PATH, contract.READY_PATH)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, json.loads(await r.read())


# --- the decision ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", [None, AppState.AWAKE])
@pytest.mark.parametrize("accepted", [None, True, False])
def test_an_awake_app_is_connected_to(state: AppState | None, accepted: bool | None) -> None:
    assert decide(stopping=False, serving=True, state=state, app_accepted=accepted) is None


@pytest.mark.parametrize("state", [AppState.FROZEN, AppState.PAUSING, AppState.RESUMING])
def test_a_frozen_app_is_answered_from_its_last_result(state: AppState) -> None:
    yes = decide(stopping=False, serving=True, state=state, app_accepted=True)
    assert yes is not None and yes.ready and yes.status == 200, yes
    for accepted in (None, False):
        no = decide(stopping=False, serving=True, state=state, app_accepted=accepted)
        assert no is not None and not no.ready and no.status == 503, no


@pytest.mark.parametrize("state", [None, *AppState])
def test_never_ready_while_stopping_or_not_serving(state: AppState | None) -> None:
    stopping = decide(stopping=True, serving=True, state=state, app_accepted=True)
    assert stopping == Verdict(False, "freeze-proxy is shutting down")
    closed = decide(stopping=False, serving=False, state=state, app_accepted=True)
    assert closed == Verdict(False, "freeze-proxy does not listen on its serving port")


async def test_the_app_check_is_bounded_and_shared() -> None:
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
            probe = AppProbe("127.0.0.1", port, timeout=0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            verdicts = await asyncio.gather(*(probe.check() for _ in range(5)))
            took = loop.time() - started
            assert {v.ready for v in verdicts} == {False}
            assert "no connection within 0.3 s" in verdicts[0].cause, verdicts[0]
            assert 0.25 < took < 1.0, took  # one bounded connect for all five
        finally:
            for s in fillers:
                s.close()


async def test_a_refused_connection_names_its_cause() -> None:
    probe = AppProbe("127.0.0.1", free_port())
    verdict = await probe.check()
    assert not verdict.ready and probe.accepted is False
    assert "Connect call failed" in verdict.cause or "refused" in verdict.cause, verdict


# --- the endpoint, on the in-process proxy -----------------------------------------------------


@pytest.mark.parametrize("state_dir", ["usable", "missing"])
async def test_ready_once_the_app_listens(tmp_path: Path, state_dir: str) -> None:
    """Without a usable state dir the proxy starts as if the app may be frozen (marker.py):
    then the app's own first accept (the proxy's start-up check) is what makes it ready."""
    state_file = tmp_path / "may-be-frozen" if state_dir == "usable" else None
    h = await start_harness(tmp_path, grace=60.0, start_app=False, state_file=state_file)
    try:
        status, body = await ready(h)
        assert status == 503, body
        if state_dir == "usable":
            assert body["state"] == "awake" and str(h.app_port) in str(body["cause"]), body
        else:
            assert body["state"] == "frozen" and "not accepted" in str(body["cause"]), body
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
    thaws = harness.daemon.count("thaw")
    status, body = await ready(harness)
    assert (status, body["ready"], body["state"]) == (200, True, "frozen"), body
    assert harness.daemon.count("thaw") == thaws and harness.daemon.frozen
    assert harness.app.seen == []


async def test_the_health_port_names_what_it_serves(harness: Harness) -> None:
    url = harness.health_url.replace(contract.HEALTH_PATH, "/nope")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 404
        assert contract.READY_PATH in (await r.json())["error"]
