"""The gate's promises, unit by unit and over random schedules in virtual time."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from freeze_proxy.gate import AppState, Decision, Gate, PauseOutcome, ResumeOutcome

FROZEN, NOT_FROZEN, MAYBE = PauseOutcome.FROZEN, PauseOutcome.NOT_FROZEN, PauseOutcome.MAYBE_FROZEN
RESUMED, NOT_RESUMED, GONE = (
    ResumeOutcome.RESUMED,
    ResumeOutcome.NOT_RESUMED,
    ResumeOutcome.DAEMON_GONE,
)

# -- single steps ------------------------------------------------------------------------------


def started(grace: float = 0.0) -> Gate:
    gate = Gate(grace=grace)
    gate.start(0.0)
    return gate


def test_grace_zero_pauses_at_start_and_after_last_response() -> None:
    gate = Gate(grace=0)
    assert gate.start(0.0) == Decision(pause=True)
    assert gate.pause_done(FROZEN, 0.0) == Decision()
    assert gate.state is AppState.FROZEN
    assert gate.arrive(1.0) == Decision(resume=True)
    assert not gate.may_forward
    assert gate.resume_done(RESUMED, 1.01) == Decision(release=True)
    assert gate.may_forward
    assert gate.depart(2.0) == Decision(pause=True)


def test_no_pause_before_the_app_started() -> None:
    gate = Gate(grace=0)
    assert gate.arrive(0.0) == Decision()
    assert gate.may_forward
    assert gate.depart(0.1) == Decision()
    assert gate.state is AppState.AWAKE


def test_no_pause_while_a_request_is_in_flight() -> None:
    gate = started(grace=0)
    gate.pause_done(FROZEN, 0.0)
    gate.arrive(1.0)
    gate.resume_done(RESUMED, 1.0)
    gate.arrive(1.1)
    assert gate.depart(1.2) == Decision()  # one still streaming
    assert gate.depart(1.3) == Decision(pause=True)


def test_grace_arms_a_timer_and_pauses_when_it_fires() -> None:
    gate = Gate(grace=0.5)
    assert gate.start(0.0) == Decision(timer_at=0.5)
    assert gate.timer(0.5) == Decision(pause=True)


def test_request_during_grace_cancels_the_pause_for_free() -> None:
    gate = started(grace=0.5)
    gate.arrive(0.2)
    assert gate.may_forward
    assert gate.timer(0.5) == Decision()  # stale timer: nothing
    assert gate.depart(0.3) == Decision(timer_at=0.8)


def test_timer_armed_early_rearms_for_the_later_deadline() -> None:
    gate = started(grace=0.5)  # timer at 0.5
    gate.arrive(0.1)
    assert gate.depart(0.2) == Decision()  # the armed timer fires first
    assert gate.timer(0.5) == Decision(timer_at=0.7)
    assert gate.timer(0.7) == Decision(pause=True)


def test_request_during_pause_waits_then_resumes() -> None:
    gate = started(grace=0)
    assert gate.state is AppState.PAUSING
    assert gate.arrive(0.001) == Decision()
    assert not gate.may_forward
    assert gate.pause_done(FROZEN, 0.01) == Decision(resume=True)
    assert gate.resume_done(RESUMED, 0.02) == Decision(release=True)


def test_failed_pause_with_waiters_resumes_before_forwarding() -> None:
    gate = started(grace=0)
    gate.arrive(0.001)
    assert gate.pause_done(MAYBE, 0.01) == Decision(resume=True)
    assert not gate.may_forward


def test_failed_pause_is_retried_with_backoff() -> None:
    gate = Gate(grace=0, pause_retry=1.0, max_pause_backoff=3.0)
    gate.start(0.0)
    assert gate.pause_done(MAYBE, 0.0) == Decision(timer_at=1.0)
    assert gate.state is AppState.FROZEN  # outcome unknown: a request resumes before forwarding
    assert gate.timer(1.0) == Decision(pause=True)
    assert gate.pause_done(MAYBE, 1.0) == Decision(timer_at=3.0)
    assert gate.timer(3.0) == Decision(pause=True)
    assert gate.pause_done(MAYBE, 3.0) == Decision(timer_at=6.0)  # capped at 3 s
    assert gate.timer(6.0) == Decision(pause=True)
    assert gate.pause_done(FROZEN, 6.0) == Decision()


def test_a_pause_that_never_reached_the_daemon_leaves_the_app_awake() -> None:
    """Connection refused (no daemon on this node) or an error answer: nothing was frozen."""
    gate = Gate(grace=0, pause_retry=1.0, max_pause_backoff=3.0)
    gate.start(0.0)
    assert gate.pause_done(NOT_FROZEN, 0.0) == Decision(timer_at=1.0)
    assert gate.state is AppState.AWAKE and gate.may_forward
    assert gate.arrive(0.5) == Decision()  # forwarded at once: no resume is owed
    assert gate.may_forward
    # The retry keeps its backoff: the idle period after the request does not pause sooner.
    assert gate.depart(0.6) == Decision()  # the armed timer (1.0) fires first
    assert gate.timer(1.0) == Decision(pause=True)
    assert gate.pause_done(NOT_FROZEN, 1.0) == Decision(timer_at=3.0)
    gate.arrive(1.5)
    assert gate.depart(1.6) == Decision()
    assert gate.timer(3.0) == Decision(pause=True)
    assert gate.pause_done(FROZEN, 3.0) == Decision()  # the daemon is back
    gate.arrive(4.0)
    gate.resume_done(RESUMED, 4.0)
    assert gate.depart(4.1) == Decision(pause=True)  # success reset the backoff


def test_requests_waiting_on_a_pause_that_did_nothing_go_ahead_without_a_resume() -> None:
    gate = started(grace=0)
    gate.arrive(0.001)
    assert not gate.may_forward
    assert gate.pause_done(NOT_FROZEN, 0.01) == Decision(release=True)
    assert gate.may_forward


def test_a_refused_pause_of_an_app_that_may_have_been_left_frozen_keeps_it_maybe_frozen() -> None:
    gate = Gate(grace=0, may_be_frozen=True)
    assert gate.start(0.0) == Decision(timer_at=0.0)
    assert gate.timer(0.0) == Decision(pause=True)
    assert gate.pause_done(NOT_FROZEN, 0.0) == Decision(timer_at=1.0)
    assert gate.state is AppState.FROZEN
    assert gate.arrive(0.5) == Decision(resume=True)


def test_stop_during_a_pause_that_did_nothing_needs_no_resume() -> None:
    gate = started(grace=0)
    assert gate.stop() == Decision()
    assert gate.pause_done(NOT_FROZEN, 0.1) == Decision()
    assert gate.state is AppState.AWAKE


def test_failed_resume_refuses_waiters_and_next_arrival_retries() -> None:
    gate = started(grace=0)
    gate.pause_done(FROZEN, 0.0)
    gate.arrive(1.0)
    assert gate.resume_done(NOT_RESUMED, 6.0) == Decision(fail=True)
    assert gate.state is AppState.FROZEN
    assert gate.depart(6.0) == Decision()  # the refused request leaves; still frozen
    assert gate.arrive(7.0) == Decision(resume=True)


def test_a_resume_that_finds_no_daemon_forwards_and_then_acts_as_on_a_node_without_one() -> None:
    """Uninstalled (or the daemon is down) while the app was frozen: the daemon thawed it on
    its way out, so the waiters go ahead; later pauses are refused and cost requests nothing."""
    gate = Gate(grace=0, pause_retry=1.0)
    gate.start(0.0)
    gate.pause_done(FROZEN, 0.0)
    assert gate.arrive(1.0) == Decision(resume=True)
    assert gate.resume_done(GONE, 6.0) == Decision(release=True)
    assert gate.state is AppState.AWAKE and gate.may_forward
    assert gate.depart(6.1) == Decision(pause=True)  # a daemon may be back: try a pause
    assert gate.pause_done(NOT_FROZEN, 6.1) == Decision(timer_at=7.1)  # none: backoff
    assert gate.arrive(6.5) == Decision() and gate.may_forward  # no resume, no waiting
    assert gate.depart(6.6) == Decision()
    assert gate.timer(7.1) == Decision(pause=True)
    assert gate.pause_done(FROZEN, 7.1) == Decision()  # a new daemon answers: frozen again
    assert gate.arrive(8.0) == Decision(resume=True)
    assert gate.resume_done(RESUMED, 8.01) == Decision(release=True)


def test_a_resume_that_finds_no_daemon_with_no_waiter_left_is_idle_again() -> None:
    gate = started(grace=0.5)
    gate.timer(0.5)
    gate.pause_done(FROZEN, 0.5)
    gate.arrive(1.0)
    gate.depart(1.5)  # gave up waiting
    assert gate.resume_done(GONE, 6.0) == Decision(release=True, timer_at=6.5)
    assert gate.state is AppState.AWAKE


def test_shutdown_with_no_daemon_left_ends_awake() -> None:
    gate = started(grace=0)
    gate.pause_done(FROZEN, 0.0)
    assert gate.stop() == Decision(resume=True)
    assert gate.resume_done(GONE, 5.0) == Decision(release=True)
    assert gate.state is AppState.AWAKE
    gate.arrive(5.1)
    assert gate.depart(5.2) == Decision()  # never paused again


def test_waiters_gone_when_resume_completes_means_idle_again() -> None:
    gate = started(grace=0)
    gate.pause_done(FROZEN, 0.0)
    gate.arrive(1.0)
    gate.depart(1.5)  # client gave up while waiting
    assert gate.resume_done(RESUMED, 2.0) == Decision(release=True, pause=True)


def test_stop_resumes_a_frozen_app_and_never_pauses_again() -> None:
    gate = started(grace=0)
    gate.pause_done(FROZEN, 0.0)
    assert gate.stop() == Decision(resume=True)
    assert gate.resume_done(RESUMED, 0.1) == Decision(release=True)
    gate.arrive(0.2)
    assert gate.depart(0.3) == Decision()


def test_stop_during_pause_resumes_when_it_lands() -> None:
    gate = started(grace=0)
    assert gate.stop() == Decision()
    assert gate.pause_done(FROZEN, 0.1) == Decision(resume=True)


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError):
        Gate(grace=-1)


def test_unbalanced_depart_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        Gate(grace=0).depart(0.0)


# -- random schedules ----------------------------------------------------------------------


@dataclass
class Sim:
    """Drives a gate like the proxy does, with a model of the real app, in virtual time."""

    gate: Gate
    now: float = 0.0
    app_frozen: bool = False
    pause_pending: bool = False
    resume_pending: bool = False
    timer_at: float | None = None
    waiting: int = 0
    forwarded: int = 0
    last_busy: float = 0.0  # last time something was in flight (or the start)
    pauses_this_idle_period: int = 0
    retry_at: float = 0.0  # a failed pause: the next one not before this time
    backoff: float = 0.0
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.backoff = self.gate.pause_retry

    def apply(self, d: Decision) -> None:
        # Waiters first, as the proxy does: release/fail speak of the state before any new call.
        if d.release:
            assert not d.fail
            self.forward(self.waiting)
            self.waiting = 0
        if d.fail:
            # Waiters are refused with 503 and leave.
            n, self.waiting = self.waiting, 0
            for _ in range(n):
                self.apply(self.gate.depart(self.now))
        if d.timer_at is not None:
            assert d.timer_at >= self.now
            self.timer_at = d.timer_at
        if d.pause:
            assert not self.pause_pending and not self.resume_pending, "overlapping calls"
            assert self.waiting == 0 and self.forwarded == 0, "pause with a request in flight"
            assert self.now - self.last_busy >= self.gate.grace - 1e-9, "pause within grace"
            assert self.now >= self.retry_at - 1e-9, "a failed pause retried before its backoff"
            self.pause_pending = True
            self.pauses_this_idle_period += 1
            assert self.pauses_this_idle_period == 1, "two pauses in one idle period"
        if d.resume:
            assert not self.pause_pending and not self.resume_pending, "overlapping calls"
            self.resume_pending = True

    def forward(self, n: int) -> None:
        if n:
            assert not self.app_frozen and not self.pause_pending, "forwarded to a frozen app"
            self.forwarded += n

    def arrive(self) -> None:
        self.pauses_this_idle_period = 0
        d = self.gate.arrive(self.now)
        if self.gate.may_forward:
            self.forward(1)
        else:
            self.waiting += 1
        self.apply(d)

    def depart(self, waiter: bool) -> None:
        if waiter and self.waiting:
            self.waiting -= 1
        elif self.forwarded:
            self.forwarded -= 1
        else:
            return
        self.last_busy = self.now
        self.apply(self.gate.depart(self.now))

    def advance(self, dt: float) -> None:
        end = self.now + dt
        while self.timer_at is not None and self.timer_at <= end:
            self.now = max(self.now, self.timer_at)
            self.timer_at = None
            self.apply(self.gate.timer(self.now))
        self.now = end

    def finish_pause(self, outcome: PauseOutcome) -> None:
        if self.pause_pending:
            self.pause_pending = False
            if outcome is not PauseOutcome.NOT_FROZEN:
                # Worst case: a pause of unknown outcome (a timeout) froze the app all the same.
                # NOT_FROZEN: it never reached the daemon, or was refused: the app is unchanged.
                self.app_frozen = True
            if outcome is not PauseOutcome.FROZEN:
                self.pauses_this_idle_period = 0  # a retry is allowed after a failure
                self.retry_at = self.now + self.backoff
                self.backoff = min(self.backoff * 2, self.gate.max_pause_backoff)
            else:
                self.backoff = self.gate.pause_retry
            self.apply(self.gate.pause_done(outcome, self.now))

    def finish_resume(self, outcome: ResumeOutcome) -> None:
        if self.resume_pending:
            self.resume_pending = False
            if outcome is ResumeOutcome.RESUMED:
                self.app_frozen = False
            elif outcome is ResumeOutcome.DAEMON_GONE:
                # The world the proxy relies on: a daemon that went away thawed what it froze
                # (its graceful stop), or the next one thawed it at its start.
                self.app_frozen = False
            self.apply(self.gate.resume_done(outcome, self.now))


events = st.one_of(
    st.just(("arrive",)),
    st.tuples(st.just("depart"), st.booleans()),
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=2)),
    st.tuples(st.just("pause_done"), st.sampled_from(PauseOutcome) | st.just(FROZEN)),
    st.tuples(st.just("resume_done"), st.sampled_from(ResumeOutcome) | st.just(RESUMED)),
)


@settings(max_examples=600, deadline=None)
@given(
    grace=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    schedule=st.lists(events, max_size=80),
    left_frozen=st.booleans(),
)
# Found by CI: a pause that failed while a request came and went was retried after the backoff
# alone, before that request's grace had passed.
@example(
    grace=0.5,
    schedule=[("advance", 1.0), ("arrive",), ("depart", True), ("pause_done", MAYBE)],
    left_frozen=False,
).via("discovered failure")
@example(
    grace=0.5,
    schedule=[("advance", 1.0), ("arrive",), ("depart", True), ("pause_done", NOT_FROZEN)],
    left_frozen=False,
).via("discovered failure")
def test_random_schedules_keep_every_promise(
    grace: float, schedule: list[tuple[object, ...]], left_frozen: bool
) -> None:
    sim = Sim(Gate(grace=grace, pause_retry=0.3, may_be_frozen=left_frozen))
    sim.app_frozen = left_frozen
    sim.apply(sim.gate.start(0.0))
    for event in schedule:
        kind = event[0]
        if kind == "arrive":
            sim.arrive()
        elif kind == "depart":
            sim.depart(bool(event[1]))
        elif kind == "advance":
            sim.advance(float(event[1]))  # type: ignore[arg-type]
        elif kind == "pause_done":
            sim.finish_pause(event[1])  # type: ignore[arg-type]
        elif kind == "resume_done":
            sim.finish_resume(event[1])  # type: ignore[arg-type]
        assert sim.gate.in_flight == sim.waiting + sim.forwarded
    # Quiesce: finish every call successfully, let everyone leave, wait out the grace.
    for _ in range(4):
        sim.finish_pause(FROZEN)
        sim.finish_resume(RESUMED)
        while sim.waiting or sim.forwarded:
            sim.depart(waiter=False) if sim.forwarded else sim.depart(waiter=True)
        sim.advance(grace + 61)
    sim.finish_pause(FROZEN)
    # An idle app ends frozen: the idle period paid exactly one successful pause.
    assert sim.app_frozen and sim.gate.state is AppState.FROZEN
    # Shutdown thaws it and nothing pauses it again.
    sim.apply(sim.gate.stop())
    sim.finish_resume(RESUMED)
    sim.arrive()
    sim.depart(waiter=False)
    sim.advance(grace + 61)
    assert not sim.app_frozen and not sim.pause_pending


def test_after_a_failed_pause_the_next_request_resumes_first() -> None:
    gate = started(grace=0)
    gate.pause_done(MAYBE, 0.0)
    assert gate.arrive(0.5) == Decision(resume=True)
    assert not gate.may_forward
    assert gate.timer(1.0) == Decision()  # the retry was cancelled by the arrival


def test_an_app_left_frozen_by_a_crash_is_resumed_before_the_first_request() -> None:
    gate = Gate(grace=0.5, may_be_frozen=True)
    assert not gate.may_forward
    assert gate.arrive(0.0) == Decision(resume=True)
    assert gate.resume_done(RESUMED, 0.01) == Decision(release=True)


def test_an_app_left_frozen_and_idle_is_confirmed_frozen_after_the_grace() -> None:
    gate = Gate(grace=0.5, may_be_frozen=True)
    assert gate.start(0.0) == Decision(timer_at=0.5)
    assert gate.timer(0.5) == Decision(pause=True)
    gate.pause_done(FROZEN, 0.51)
    assert gate.state is AppState.FROZEN


def test_shutdown_resumes_an_app_that_may_have_been_left_frozen() -> None:
    assert Gate(grace=0, may_be_frozen=True).stop() == Decision(resume=True)
