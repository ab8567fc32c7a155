"""A clear message instead of a traceback when a program's optional dependencies are missing.

``pip install freeze-proxy`` installs only what the sidecar needs (it runs in every pod); the
daemon and the webhook need an extra each.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable


def require_extra(program: str, extra: str, modules: Iterable[str]) -> None:
    """Exit (status 2) naming the missing modules and the install command, if any is missing."""
    missing = [m for m in modules if not _importable(m)]
    if missing:
        sys.exit(
            f"{program}: missing {', '.join(missing)}; install its dependencies with "
            f"pip install 'freeze-proxy[{extra}]'"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False
