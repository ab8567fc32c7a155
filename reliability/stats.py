"""Figures from samples (pure): percentiles and the drift of a resource over a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import percentile  # the benchmarks' own, so both tables agree

__all__ = ["Drift", "Sample", "drift", "percentile"]


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the run started
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class Drift:
    """Last minus first sample after the warm-up, and the spread after it."""

    rss_kib: int
    fds: int
    rss_max_kib: int
    fds_max: int
    samples: int


def drift(samples: Sequence[Sample], warmup_s: float) -> Drift:
    """Drift after ``warmup_s`` (all samples if fewer than two are past it): a leak shows as a
    steady climb, so last minus first is the figure; the maxima show a transient peak."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 2:
        after = list(samples)
    if not after:
        return Drift(0, 0, 0, 0, 0)
    return Drift(
        rss_kib=after[-1].rss_kib - after[0].rss_kib,
        fds=after[-1].fds - after[0].fds,
        rss_max_kib=max(s.rss_kib for s in after),
        fds_max=max(s.fds for s in after),
        samples=len(after),
    )
