"""One place that writes a reliability figure: ``make reliability`` collects these files.

A test that measures a fault, a fuzz run, a soak or a load run writes its figures with
:func:`write_figure`; when ``$FREEZE_RELIABILITY_OUT`` names a directory they land there as
``<name>.json``, one file per figure, so the collector can build the README's table without
re-running anything. A plain test run leaves no files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

OUT_ENV = "FREEZE_RELIABILITY_OUT"


def write_figure(name: str, **fields: Any) -> dict[str, Any]:
    """Write ``fields`` to ``$FREEZE_RELIABILITY_OUT/<name>.json`` if that is set, and print
    them (seen with ``pytest -s`` and in a failing test's output); returns what was written."""
    print(f"reliability {name} {json.dumps(fields, sort_keys=True)}")
    out = os.environ.get(OUT_ENV)
    if out:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "figure"
        text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
        (directory / f"{safe}.json").write_text(text)
    return fields


def report(
    fault: str, *, requests: int, failed: int, max_added_latency_ms: float, **extra: Any
) -> dict[str, Any]:
    """A fault's figures: requests sent under it, how many failed, the longest added latency."""
    return write_figure(
        fault,
        fault=fault,
        requests=requests,
        failed=failed,
        max_added_latency_ms=round(max_added_latency_ms, 1),
        **extra,
    )
