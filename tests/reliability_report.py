"""One place that writes a reliability figure: ``make reliability`` collects these files.

A test that measures a fault (or a soak, a load run) calls :func:`report`; when
``$FREEZE_RELIABILITY_OUT`` names a directory, the figures land there as ``<fault>.json``, one
file per fault, so the collector can build the README's table without re-running anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

OUT_ENV = "FREEZE_RELIABILITY_OUT"


def report(
    fault: str, *, requests: int, failed: int, max_added_latency_ms: float, **extra: Any
) -> dict[str, Any]:
    """Print the figures (seen with ``pytest -s`` and in a failing test's output) and write them
    to ``$FREEZE_RELIABILITY_OUT/<fault>.json`` if that is set; returns what was written."""
    figures: dict[str, Any] = {
        "fault": fault,
        "requests": requests,
        "failed": failed,
        "max_added_latency_ms": round(max_added_latency_ms, 1),
        **extra,
    }
    print(f"reliability {json.dumps(figures, sort_keys=True)}")
    out = os.environ.get(OUT_ENV)
    if out:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", fault).strip("-") or "fault"
        text = json.dumps(figures, indent=2, sort_keys=True) + "\n"
        (directory / f"{name}.json").write_text(text)
    return figures
