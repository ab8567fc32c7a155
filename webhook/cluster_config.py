"""The cluster's defaults for the sidecar: the ConfigMap ``config-freeze-proxy``, cached.

Admission never waits for the API server: it reads the last good ``MutationSettings`` from a
``SettingsBox``, which ``ConfigWatcher`` refreshes every few seconds (one GET, bounded). A
missing ConfigMap means the built-in defaults; a value that does not parse is refused with a log
line naming the key, and the built-in default applies to that key; an unreachable API server
keeps the last good settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from webhook.cluster import ConfigMapReader
from webhook.mutation import MutationSettings
from webhook.sidecar import DEFAULTS, KEYS, SidecarConfig, apply_overrides

log = logging.getLogger("webhook.config")

DEFAULT_CONFIG_MAP = "config-freeze-proxy"


@dataclass
class SettingsBox:
    """The settings admission uses now; swapped whole, never changed in place."""

    value: MutationSettings


def defaults_from(data: Mapping[str, str] | None, name: str) -> tuple[SidecarConfig, list[str]]:
    """The ConfigMap's data -> (cluster defaults, warnings). Keys starting with ``_`` (like
    ``_example``) are documentation; other unknown keys are reported, in case of a typo."""
    data = data or {}
    config, warnings = apply_overrides(
        DEFAULTS, data, f"ConfigMap {name} key {{key}}", "the built-in default is used instead"
    )
    for key in sorted(data):
        if key not in KEYS and not key.startswith("_"):
            warnings.append(
                f"ConfigMap {name} key {key!r} is not a setting (known: {', '.join(KEYS)}); ignored"
            )
    return config, warnings


@dataclass
class ConfigWatcher:
    """Keep ``box`` in step with the ConfigMap."""

    reader: ConfigMapReader
    namespace: str
    name: str
    box: SettingsBox
    interval: float = 10.0
    timeout: float = 2.0
    _seen: Mapping[str, str] | None = None
    _error: str | None = None

    async def refresh(self) -> bool:
        """One read; True when the settings are current (changed or not)."""
        where = f"{self.namespace}/{self.name}"
        try:
            async with asyncio.timeout(self.timeout):
                data = await self.reader.read_config_map(self.namespace, self.name)
        except Exception as err:  # any failure: keep the last good settings
            error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if error != self._error:  # once per distinct failure, not every interval
                log.warning(
                    "cannot read the ConfigMap; keeping the current sidecar settings",
                    extra={"configmap": where, "error": error},
                )
            self._error = error
            return False
        self._error = None
        data = data or {}
        if data == self._seen:
            return True
        self._seen = dict(data)
        config, warnings = defaults_from(data, self.name)
        self.box.value = dataclasses.replace(self.box.value, defaults=config)
        log.log(
            logging.WARNING if warnings else logging.INFO,
            "sidecar settings loaded",
            extra={
                "configmap": where,
                "settings": {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
                "warnings": warnings,
            },
        )
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()
