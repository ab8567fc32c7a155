"""The cluster's sidecar defaults from the ConfigMap, cached (webhook/cluster_config.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from webhook.cluster_config import ConfigWatcher, SettingsBox, defaults_from
from webhook.mutation import MutationSettings
from webhook.sidecar import DEFAULTS, SidecarConfig


class FakeReader:
    def __init__(self) -> None:
        self.data: dict[str, str] | None = None
        self.error: Exception | None = None
        self.hang = False
        self.reads = 0

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        self.reads += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        return self.data


def watcher(reader: FakeReader) -> ConfigWatcher:
    box = SettingsBox(MutationSettings(proxy_image="img"))
    return ConfigWatcher(reader, "knative-serving", "config-freeze-proxy", box, timeout=0.2)


def test_defaults_from_missing_or_example_only_configmap() -> None:
    assert defaults_from(None, "cm") == (DEFAULTS, [])
    assert defaults_from({"_example": "cpu-limit: 2"}, "cm") == (DEFAULTS, [])


def test_defaults_from_reports_bad_values_and_unknown_keys() -> None:
    config, warnings = defaults_from(
        {"cpu-limit": "2", "memory-limit": "lots", "cpu-limt": "3"}, "cm"
    )
    assert config == SidecarConfig(cpu_limit="2")
    assert len(warnings) == 2
    assert "ConfigMap cm key memory-limit='lots' refused" in warnings[0]
    assert "built-in default" in warnings[0]
    assert "'cpu-limt' is not a setting" in warnings[1]


async def test_loads_changes_and_keeps_the_image(caplog: pytest.LogCaptureFixture) -> None:
    reader = FakeReader()
    w = watcher(reader)
    reader.data = {"cpu-limit": "2", "grace": "1s"}
    assert await w.refresh()
    assert w.box.value.defaults == SidecarConfig(cpu_limit="2", grace="1s")
    assert w.box.value.proxy_image == "img"
    reader.data = {}
    assert await w.refresh()
    assert w.box.value.defaults == DEFAULTS


async def test_unreachable_or_slow_api_keeps_the_last_good_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = FakeReader()
    w = watcher(reader)
    reader.data = {"cpu-limit": "2"}
    await w.refresh()
    good = w.box.value
    reader.error = ConnectionRefusedError("refused")
    with caplog.at_level(logging.WARNING, "webhook.config"):
        assert not await w.refresh()
        assert not await w.refresh()  # the same failure is logged once
    assert w.box.value is good
    assert [r.getMessage() for r in caplog.records].count(
        "cannot read the ConfigMap; keeping the current sidecar settings"
    ) == 1
    reader.error, reader.hang = None, True
    started = asyncio.get_running_loop().time()
    assert not await w.refresh()  # bounded by the timeout
    assert asyncio.get_running_loop().time() - started < 1.0
    assert w.box.value is good


async def test_bad_values_are_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    reader = FakeReader()
    w = watcher(reader)
    reader.data = {"cpu-request": "5", "cpu-limit": "2"}  # request above limit
    with caplog.at_level(logging.INFO, "webhook.config"):
        await w.refresh()
        await w.refresh()
    loaded = [r for r in caplog.records if r.getMessage() == "sidecar settings loaded"]
    assert len(loaded) == 1 and loaded[0].levelno == logging.WARNING
    assert "would exceed the limit" in loaded[0].warnings[0]  # type: ignore[attr-defined]
    assert w.box.value.defaults == DEFAULTS
