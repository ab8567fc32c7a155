"""Durations in Go's ``time.ParseDuration`` format, as Knative users write them.

Shared by every flag and by the webhook's check of the grace annotation: ``0``, ``250ms``,
``1.5s``, ``1m30s``, ``1h2m3.5s``, ``.5s``; units ``ns``, ``us``/``µs``/``μs``, ``ms``, ``s``,
``m``, ``h``; components in any order, summed. The arithmetic is Go's, to the nanosecond (whole
numbers exactly, fractions through a float64 as Go does), and so is the range (at most
2^63-1 ns, about 292 years). Two differences, both on purpose:

* no sign: a negative duration means nothing here, so ``-`` is refused (``+`` is accepted, as Go
  does);
* a bare number means seconds (``2``, ``1.5``): Go refuses it, but earlier versions of
  freeze-proxy documented it, and Services annotated so keep working. Surrounding whitespace is
  ignored for the same reason.
"""

from __future__ import annotations

import re

_NS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX = 1 << 63  # Go's bound while summing; the result must be below it
_BARE_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DIGITS = frozenset("0123456789")
_FORMS = (
    "use Go's duration format: numbers with units ns, us, ms, s, m, h, e.g. 0, 250ms, 1.5s, "
    "1m30s (a bare number means seconds)"
)


def parse_duration(text: str) -> float:
    """Return seconds. Raise ValueError saying what is wrong and naming the accepted forms."""
    return parse_duration_ns(text) / 1e9


def parse_duration_ns(text: str) -> int:
    """Return whole nanoseconds, as Go's ``time.ParseDuration`` would (without a sign)."""
    s = text.strip()
    if _BARE_SECONDS.fullmatch(s):
        s += "s"
    if s.startswith("-"):
        raise _invalid(text, "negative durations are not allowed")
    if s.startswith("+"):
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise _invalid(text, "empty")
    total = 0
    while s:
        if not (s[0] == "." or s[0] in _DIGITS):
            raise _invalid(text, f"expected a number at {s!r}")
        whole, s, had_whole = _leading_int(text, s)
        fraction, scale, had_fraction = 0, 1.0, False
        if s.startswith("."):
            fraction, scale, s, had_fraction = _leading_fraction(s[1:])
        if not (had_whole or had_fraction):
            raise _invalid(text, "a '.' without digits")
        i = 0
        while i < len(s) and s[i] != "." and s[i] not in _DIGITS:
            i += 1
        unit_text, s = s[:i], s[i:]
        if not unit_text:
            raise _invalid(text, "a number without a unit")
        unit = _NS.get(unit_text)
        if unit is None:
            raise _invalid(text, f"unknown unit {unit_text!r}")
        if whole > _MAX // unit:
            raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
        value = whole * unit
        if fraction:
            value += int(float(fraction) * (float(unit) / scale))
            if value > _MAX:
                raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
        total += value
        if total > _MAX:
            raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
    if total > _MAX - 1:
        raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
    return total


def _leading_int(text: str, s: str) -> tuple[int, str, bool]:
    i, x = 0, 0
    while i < len(s) and s[i] in _DIGITS:
        if x > _MAX // 10:
            raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
        x = x * 10 + int(s[i])
        if x > _MAX:
            raise _invalid(text, "out of range (at most 2562047h47m16.854775807s)")
        i += 1
    return x, s[i:], i > 0


def _leading_fraction(s: str) -> tuple[int, float, str, bool]:
    """Digits after the '.': Go keeps those that fit, and the scale (a float64) that goes with
    them; the rest are read and ignored."""
    i, x, scale, overflow = 0, 0, 1.0, False
    while i < len(s) and s[i] in _DIGITS:
        if not overflow:
            y = x * 10 + int(s[i])
            if x > (_MAX - 1) // 10 or y > _MAX:
                overflow = True
            else:
                x, scale = y, scale * 10
        i += 1
    return x, scale, s[i:], i > 0


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"invalid duration {text!r}: {why}; {_FORMS}")


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
