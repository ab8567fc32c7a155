"""The soak's invariant checker and schedule (pure): each violation is caught, correct runs pass."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from reliability.invariants import (
    FREEZE,
    THAW,
    Arrival,
    Call,
    Sent,
    Window,
    check,
    check_calls,
    forwarding_windows,
    frozen_windows,
)
from reliability.schedule import GRACE_S, Abort, Burst, Stream, Websocket, episodes
from reliability.stats import Sample, drift, percentile

# One cycle: pause sent at 100, answered at 110; resume sent at 200, answered at 210.
CYCLE = [Call(FREEZE, 100, 110, 200), Call(THAW, 200, 210, 200)]


def kinds(vs: list[object]) -> list[str]:
    return sorted(v.kind for v in vs)  # type: ignore[attr-defined]


def test_a_correct_run_has_no_violation() -> None:
    arrivals = [Arrival("a", 50), Arrival("b", 211)]
    sent = [Sent("a", "unary", answers=1), Sent("b", "unary", answers=1)]
    assert check(arrivals, [10, 60, 99, 215], CYCLE, sent) == []


def test_windows() -> None:
    assert forwarding_windows(CYCLE) == [Window(100, 210)]
    assert frozen_windows(CYCLE) == [Window(110, 200)]
    # A pause refused with an answer: the app stayed awake once it was answered.
    refused = [Call(FREEZE, 100, 105, 429), *CYCLE[:0]]
    assert forwarding_windows(refused) == [Window(100, 105)]
    assert frozen_windows(refused) == []
    # No answer: maybe frozen, until a resume succeeds (a failed one does not end it).
    unknown = [Call(FREEZE, 100, 150, 0), Call(THAW, 200, 260, 500), Call(THAW, 300, 310, 200)]
    assert forwarding_windows(unknown) == [Window(100, 310)]
    # Frozen at the end of the run.
    assert forwarding_windows(CYCLE[:1]) == [Window(100, None)]
    assert frozen_windows(CYCLE[:1]) == [Window(110, None)]


def test_arrival_while_a_pause_or_resume_is_in_flight() -> None:
    for t in (101, 105, 150, 205, 209):
        vs = check([Arrival("a", t)], [], CYCLE, [Sent("a", "unary", answers=1)])
        assert "arrival-while-frozen" in kinds(vs), t
    # The boundaries themselves are outside (open interval): the clocks tie only by chance.
    for t in (100, 210):
        assert check([Arrival("a", t)], [], CYCLE, [Sent("a", "unary", answers=1)]) == []


def test_an_aborted_requests_late_arrival_is_its_own_kind() -> None:
    vs = check([Arrival("a", 150)], [], CYCLE, [Sent("a", "abort", aborted=True)])
    assert kinds(vs) == ["aborted-arrival-while-frozen", "ran-while-frozen"]


def test_the_app_running_while_the_daemon_said_frozen() -> None:
    assert kinds(check([], [150], CYCLE, [])) == ["ran-while-frozen"]
    # While a pause or resume runs the app may still (or already) run: not a violation.
    assert check([], [105, 205], CYCLE, []) == []


def test_answered_exactly_once() -> None:
    assert kinds(check([], [], [], [Sent("a", "unary", error="timeout")])) == ["lost"]
    assert kinds(check([Arrival("a", 1)], [], [], [Sent("a", "unary", answers=2)])) == [
        "duplicate-answer"
    ]
    twice = [Arrival("a", 1), Arrival("a", 2)]
    assert kinds(check(twice, [], [], [Sent("a", "unary", wrong=1)])) == [
        "duplicate-arrival",
        "lost",
        "misrouted",
    ]
    assert kinds(check([Arrival("x", 1)], [], [], [])) == ["unknown-arrival"]
    assert kinds(check([], [], [], [Sent("a", "unary", answers=1)])) == ["answer-without-arrival"]
    # Aborted: neither an answer nor an arrival is owed; a websocket message has no arrival.
    assert check([], [], [], [Sent("a", "abort", aborted=True)]) == []
    assert check([], [], [], [Sent("m", "ws-message", answers=1, needs_arrival=False)]) == []


def test_pauses_and_resumes_alternate() -> None:
    cycles = [
        Call(c.op, c.start_ns + k * 1000, c.end_ns + k * 1000, 200) for k in range(3) for c in CYCLE
    ]
    assert check_calls(cycles) == []
    # A proxy that starts with "may be frozen" resumes once first.
    assert check_calls([Call(THAW, 0, 5, 200), *CYCLE]) == []
    twice = [Call(FREEZE, 0, 5, 200), Call(FREEZE, 10, 15, 200)]
    assert kinds(check_calls(twice)) == ["not-alternating"]
    # Failed calls do not count as a transition.
    assert check_calls([Call(FREEZE, 0, 5, 429), *CYCLE]) == []
    overlap = [Call(FREEZE, 0, 50, 200), Call(THAW, 40, 60, 200)]
    assert kinds(check_calls(overlap)) == ["overlapping-calls"]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.data())
def test_arrivals_outside_every_window_never_violate(gaps: list[int], data: st.DataObject) -> None:
    """Any alternating record, any arrival strictly between a resume's answer and the next
    pause: no violation (the checker raises no false alarm on a correct run)."""
    t, calls, free = 0, [], []
    for g in gaps:
        start = t + g
        free.append((t, start))  # awake: after the last resume's answer, before this pause
        calls += [Call(FREEZE, start, start + 3, 200), Call(THAW, start + 10, start + 13, 200)]
        t = start + 13
    arrivals = []
    for k, (lo, hi) in enumerate(free):
        if hi - lo >= 2:
            arrivals.append(Arrival(f"r{k}", data.draw(st.integers(lo + 1, hi - 1))))
    sent = [Sent(a.rid, "unary", answers=1) for a in arrivals]
    assert check(arrivals, [a.t_ns for a in arrivals], calls, sent) == []


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.data())
def test_every_arrival_inside_a_window_is_caught(gaps: list[int], data: st.DataObject) -> None:
    t, calls, inside = 0, [], []
    for g in gaps:
        start = t + g
        calls += [Call(FREEZE, start, start + 3, 200), Call(THAW, start + 10, start + 13, 200)]
        inside.append((start, start + 13))
        t = start + 13
    lo, hi = data.draw(st.sampled_from(inside))
    a = Arrival("r", data.draw(st.integers(lo + 1, hi - 1)))
    assert "arrival-while-frozen" in kinds(check([a], [], calls, [Sent("r", "u", answers=1)]))


def test_schedules_are_seeded_and_mostly_freeze() -> None:
    first = list(itertools.islice(episodes(7), 300))
    assert first == list(itertools.islice(episodes(7), 300))
    assert first != list(itertools.islice(episodes(8), 300))
    long_idles = sum(e.idle_s > GRACE_S for e in first)
    assert 0.6 * len(first) < long_idles < len(first)  # freezes, and cancelled pauses too
    seen = {type(a) for e in first for a in e.activities}
    assert seen == {Burst, Stream, Websocket, Abort}
    aborts = [a for e in first for a in e.activities if isinstance(a, Abort)]
    assert {a.mid_response for a in aborts} == {True, False}


def test_drift_and_percentiles() -> None:
    samples = [Sample(0, 100, 5), Sample(10, 200, 9), Sample(20, 210, 9), Sample(30, 212, 10)]
    d = drift(samples, warmup_s=10)
    assert (d.rss_kib, d.fds, d.rss_max_kib, d.fds_max, d.samples) == (12, 1, 212, 10, 3)
    assert drift(samples[:1], warmup_s=10).samples == 1  # too few after warm-up: all of them
    assert drift([], 0).samples == 0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(101))), 99) == 99.0
