"""Parse human durations ("0", "250ms", "1.5s", "2m") shared by flags and pod annotations."""

from __future__ import annotations

import re

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """Return seconds; a bare number means seconds. Raise ValueError naming the accepted forms."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: use a non-negative number with an optional unit "
            "us, ms, s, m or h (e.g. 0, 250ms, 1.5s)"
        )
    number, unit = match.groups()
    return float(number) * _UNITS[unit or "s"]


def format_duration(seconds: float) -> str:
    """Seconds as Go prints a ``time.Duration``: ``0s``, ``250ms``, ``1.5s``, ``1m30s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1e-3:
        return f"{round(seconds * 1e6, 3):g}µs"
    if seconds < 1:
        return f"{round(seconds * 1e3, 3):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text
