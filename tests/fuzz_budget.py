"""Hypothesis budgets for the fuzz tests: modest for ``make test``, scaled by an env for soak runs.

``FREEZE_FUZZ_EXAMPLES`` multiplies every fuzz test's ``max_examples`` (``make reliability`` sets
it); each run writes ``{"fuzz": name, "cases": n, "failures": f}`` via ``write_figure``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hypothesis import HealthCheck, settings

from tests.reliability_report import write_figure


def budget(examples: int) -> settings:
    """Settings for a fuzz test: ``examples`` times ``$FREEZE_FUZZ_EXAMPLES``, no deadline (the
    machine is shared: a slow example is not a bug), derandomized only if asked."""
    scale = float(os.environ.get("FREEZE_FUZZ_EXAMPLES", "1") or 1)
    return settings(
        max_examples=max(1, int(examples * scale)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Cases:
    """Counts the examples a fuzz test ran, for its reliability figure."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def run_fuzz(name: str, cases: Cases, check: Callable[[], None]) -> None:
    """Run a hypothesis test and write its figure, a failure included (then re-raised)."""
    try:
        check()
    except BaseException:
        write_figure(name, fuzz=name, cases=cases.n, failures=1)
        raise
    write_figure(name, fuzz=name, cases=cases.n, failures=0)
