"""One JSON line per reliability figure, for ``make reliability`` to collect.

Written only when ``FREEZE_RELIABILITY_OUT`` names a directory: a plain test run leaves no files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_figure(name: str, **fields: object) -> None:
    """Write ``{"<kind>": name, **fields}`` to ``$FREEZE_RELIABILITY_OUT/<name>.json``."""
    out = os.environ.get("FREEZE_RELIABILITY_OUT")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(fields) + "\n")
