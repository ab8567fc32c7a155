"""Figures for ``make reliability``: a test reports a number the README quotes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_figure(name: str, **fields: object) -> None:
    """Write ``$FREEZE_RELIABILITY_OUT/<name>.json`` when that variable is set (else nothing)."""
    out = os.environ.get("FREEZE_RELIABILITY_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(fields, indent=2, default=str) + "\n")
