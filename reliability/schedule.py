"""Random soak schedules (pure): seeded, so a failing run is replayed from its printed seed.

An episode is an idle gap followed by one to three activities run at the same time. Most gaps
are longer than the proxy's grace, so the app is frozen and woken again and again; some are
shorter, so a pending pause is cancelled by the next request instead.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

GRACE_S = 0.25  # the proxy's default --grace


@dataclass(frozen=True)
class Burst:
    """``requests`` POSTs, ``concurrency`` at a time, on keep-alive connections."""

    requests: int
    concurrency: int


@dataclass(frozen=True)
class Stream:
    """A streamed response of ``chunks`` chunks ``gap_s`` apart (in flight the whole time)."""

    chunks: int
    gap_s: float


@dataclass(frozen=True)
class Websocket:
    """``messages`` echoed messages ``gap_s`` apart on one websocket (gaps may pass the grace:
    an open websocket must keep the app awake)."""

    messages: int
    gap_s: float


@dataclass(frozen=True)
class Abort:
    """A request the client gives up on: after the first chunk of a stream (``mid_response``),
    or before any answer."""

    mid_response: bool


Activity = Burst | Stream | Websocket | Abort


@dataclass(frozen=True)
class Episode:
    idle_s: float
    activities: tuple[Activity, ...]


def _activity(rng: random.Random) -> Activity:
    r = rng.random()
    if r < 0.45:
        return Burst(requests=rng.randint(1, 40), concurrency=rng.choice((1, 2, 4, 8, 16)))
    if r < 0.65:
        return Stream(chunks=rng.randint(2, 10), gap_s=rng.uniform(0.01, 0.1))
    if r < 0.85:
        return Websocket(messages=rng.randint(1, 15), gap_s=rng.uniform(0.0, 0.35))
    return Abort(mid_response=rng.random() < 0.6)


def episodes(seed: int) -> Iterator[Episode]:
    """The endless schedule of ``seed``."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.75:
            idle = rng.uniform(GRACE_S + 0.1, 1.5)  # frozen for a while
        else:
            idle = rng.uniform(0.0, GRACE_S - 0.05)  # a pending pause cancelled
        yield Episode(idle, tuple(_activity(rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))))
