"""The sidecar's --mode: throttle asks the daemon for a CPU floor instead of a freeze; dry-run
runs the gate and counts what it would do, and never calls the daemon."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from freeze_proxy import contract
from freeze_proxy.__main__ import parse_args
from tests.proxy_harness import start_harness


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return resp.status, await resp.text()


async def test_dry_run_counts_would_be_pauses_and_resumes_and_never_calls_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="freeze_proxy")
    h = await start_harness(tmp_path, mode=contract.MODE_DRY_RUN)
    try:
        health = h.health_url
        metrics = health.replace(contract.HEALTH_PATH, contract.METRICS_PATH)

        async def counts() -> dict[str, object]:
            status, text = await _get(health)
            assert status == 200
            body: dict[str, object] = json.loads(text)
            return body

        await h.wait_for(lambda: "would pause" in caplog.text)
        for _ in range(3):
            status, text = await _get(h.proxy_url + "/hello")
            assert (status, text) == (200, "hello")
        body = await counts()
        assert body["mode"] == "dry-run"
        assert body["pauses"] == 0 and body["resumes"] == 0  # nothing was done
        assert body["would_resume"] == 3  # grace 0: every request found it "frozen"
        assert isinstance(body["would_pause"], int) and body["would_pause"] >= 3
        _, text = await _get(metrics)
        assert 'freeze_proxy_pauses_total{result="dry_run"}' in text
        assert 'freeze_proxy_resumes_total{result="dry_run"} 3' in text
        assert 'freeze_proxy_pauses_total{result="ok"} 0' in text
        assert h.daemon.events == []  # the daemon was never called
        assert "would resume" in caplog.text
    finally:
        await h.close()


async def test_throttle_mode_asks_the_daemon_for_the_floor_on_both_calls(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, mode=contract.MODE_THROTTLE, throttle_cpu="20m")
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        status, _ = await _get(h.proxy_url + "/hello")
        assert status == 200
        await h.wait_for(lambda: h.daemon.count("freeze") >= 2)
        assert h.daemon.events[0][0] == "freeze" and h.daemon.events[1][0] == "thaw"
        assert set(h.daemon.queries) == {"mode=throttle&cpu=20m"}
        _, text = await _get(h.health_url)
        assert json.loads(text)["mode"] == "throttle"
    finally:
        await h.close()


async def test_freeze_mode_sends_no_mode(tmp_path: Path) -> None:
    h = await start_harness(tmp_path)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        assert h.daemon.queries == [""]  # the protocol the original and old daemons speak
    finally:
        await h.close()


def test_flags_default_to_freeze_and_validate_the_floor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = parse_args([], env={})
    assert (settings.mode, settings.throttle_cpu) == ("freeze", "10m")
    settings = parse_args(["--mode", "throttle", "--throttle-cpu", "0.05"], env={})
    assert (settings.mode, settings.throttle_cpu) == ("throttle", "0.05")
    for bad in (["--mode", "nap"], ["--throttle-cpu", "1m"], ["--throttle-cpu", "lots"]):
        with pytest.raises(SystemExit):
            parse_args(bad, env={})
    assert "10m to 999m" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "millis"), [("10m", 10), ("50m", 50), ("0.1", 100), (".25", 250), ("999m", 999)]
)
def test_cpu_floors(text: str, millis: int) -> None:
    assert contract.parse_millicores(text) == millis


@pytest.mark.parametrize(
    "text", ["", "m", "1m", "9m", "1", "1000m", "-10m", "10.5m", "1e2m", "0.0105", "ten", "10 m"]
)
def test_junk_cpu_floors_are_refused_with_the_range(text: str) -> None:
    with pytest.raises(ValueError, match=r"millicore|10m to 999m"):
        contract.parse_millicores(text)
