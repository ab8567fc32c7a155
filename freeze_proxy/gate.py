"""The in-flight gate: a pure state machine deciding when the app is paused and resumed.

No I/O and no clock of its own: the proxy feeds it events with the current time and carries out
the decisions it returns. Its invariants, proven by ``tests/test_gate.py`` over random schedules:

* a request is forwarded only while the app is known to be awake: a resume has completed, or no
  call that may have frozen it has been made since (a pause that never reached the daemon, or
  that it refused, leaves the app as it was), or no daemon is left that could hold it frozen (a
  resume that found none for its whole budget: a daemon thaws what it froze when it stops, and
  thaws what a dead one left paused when it starts);
* a failed pause is retried with backoff, and requests in between do not shorten it;
* a pause starts only when nothing is in flight and the app has been idle for ``grace`` seconds;
* one idle period costs at most one pause, and a request arriving during the grace costs nothing;
* a request arriving while a pause is in flight waits for it, then for a resume;
* after ``stop()`` the app is resumed and never paused again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PauseOutcome(enum.Enum):
    """What a pause call did to the app, as far as the proxy can tell."""

    FROZEN = "frozen"  # the daemon answered: done
    NOT_FROZEN = "not_frozen"  # it never reached a daemon, or the daemon refused: nothing changed
    MAYBE_FROZEN = "maybe_frozen"  # sent but unanswered (a timeout): it may still be carried out


class ResumeOutcome(enum.Enum):
    """What a resume call (with its own retries) found."""

    RESUMED = "resumed"  # the daemon answered: the app runs
    NOT_RESUMED = "not_resumed"  # it reached a daemon and failed, or may not have: still frozen
    # No daemon took a connection for the whole budget: freeze-proxy was uninstalled from the
    # node or its daemon is down. A daemon that stops thaws what it froze and one that starts
    # thaws what a dead one left paused, so no daemon means nothing frozen by us: awake.
    DAEMON_GONE = "daemon_gone"


class AppState(enum.Enum):
    AWAKE = "awake"
    PAUSING = "pausing"
    FROZEN = "frozen"
    RESUMING = "resuming"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the driver must do now. Several fields may be set at once."""

    pause: bool = False  # start a pause call
    resume: bool = False  # start a resume call
    timer_at: float | None = None  # (re)arm the single idle timer: call ``timer()`` at this time
    release: bool = False  # waiting requests may be forwarded now
    fail: bool = False  # waiting requests must be refused: the app could not be resumed


NOTHING = Decision()
_RELEASE = Decision(release=True)
_PAUSE = Decision(pause=True)
_RESUME = Decision(resume=True)


class Gate:
    """Counts requests in flight and turns arrivals, departures and timers into decisions.

    ``in_flight`` counts every admitted request, waiting or forwarded, so nothing pauses while a
    request waits for a resume or a response is still streaming.
    """

    __slots__ = (
        "_deadline",
        "_frozen_before_pause",
        "_last_depart",
        "_pause_backoff",
        "_retry_at",
        "_started",
        "_stopped",
        "_timer_at",
        "grace",
        "in_flight",
        "max_pause_backoff",
        "pause_retry",
        "state",
    )

    def __init__(
        self,
        grace: float,
        pause_retry: float = 1.0,
        max_pause_backoff: float = 60.0,
        may_be_frozen: bool = False,
    ):
        """``may_be_frozen``: an earlier instance of the proxy may have left the app frozen
        (it crashed after a pause), so the first request resumes before it is forwarded."""
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.grace = grace
        self.pause_retry = pause_retry
        self.max_pause_backoff = max_pause_backoff
        self.state = AppState.FROZEN if may_be_frozen else AppState.AWAKE
        self.in_flight = 0
        self._deadline: float | None = None  # when the current idle period may end in a pause
        self._timer_at: float | None = None  # when the armed idle timer fires, if armed
        self._started = False  # the app has accepted connections: pausing is allowed
        self._stopped = False  # shutting down: never pause again
        self._pause_backoff = pause_retry
        self._retry_at = 0.0  # after a failed pause, no new pause before this time
        self._frozen_before_pause = False  # the app may have been frozen when the pause began
        self._last_depart = float("-inf")  # when a request last left: a pause waits out its grace

    @property
    def may_forward(self) -> bool:
        """True when a request admitted now may go straight to the app."""
        return self.state is AppState.AWAKE

    @property
    def pause_deadline(self) -> float | None:
        return self._deadline

    # -- events -----------------------------------------------------------------------------

    def start(self, now: float) -> Decision:
        """The app accepts connections: from now on an idle app may be paused."""
        self._started = True
        if self.state is AppState.FROZEN and not self.in_flight:
            return self._arm(now + self.grace)  # pausing a frozen app is a no-op that confirms it
        return self._idle_from(now, self.grace)

    def arrive(self, now: float) -> Decision:
        """A request arrived. Forward it if ``may_forward``, else wait for ``release``/``fail``."""
        self.in_flight += 1
        self._deadline = None  # cancels a pending pause at no cost; a stale timer is ignored
        if self.state is AppState.FROZEN:
            self.state = AppState.RESUMING
            return _RESUME
        return NOTHING

    def depart(self, now: float) -> Decision:
        """A request finished: its response has been written in full (or it gave up waiting)."""
        self.in_flight -= 1
        if self.in_flight < 0:
            raise AssertionError("depart() without arrive()")
        self._last_depart = now
        return self._idle_from(now, self.grace)

    def timer(self, now: float) -> Decision:
        """The idle timer fired."""
        self._timer_at = None
        deadline = self._deadline
        if deadline is None:
            return NOTHING
        if now < deadline:
            self._timer_at = deadline
            return Decision(timer_at=deadline)
        return self._begin_pause()

    def pause_done(self, outcome: PauseOutcome, now: float) -> Decision:
        """The pause call returned, with what it did to the app."""
        if self.state is not AppState.PAUSING:
            raise AssertionError(f"pause_done() in state {self.state}")
        if outcome is PauseOutcome.FROZEN:
            self._pause_backoff = self.pause_retry
            self._retry_at = 0.0
            self.state = AppState.FROZEN
            if self.in_flight or self._stopped:
                self.state = AppState.RESUMING
                return _RESUME
            return NOTHING
        # Failed: retry later, and not sooner for requests in between.
        delay = self._pause_backoff
        self._pause_backoff = min(self._pause_backoff * 2, self.max_pause_backoff)
        self._retry_at = now + delay
        if outcome is PauseOutcome.NOT_FROZEN and not self._frozen_before_pause:
            # Nothing happened to an awake app: waiters go ahead, no resume is owed.
            self.state = AppState.AWAKE
            if self.in_flight:
                return _RELEASE
            if self._stopped:
                return NOTHING
            return self._arm(self._retry_deadline())
        # It may have frozen the app (or the app may have been frozen already): a request resumes
        # it (a no-op if it is awake) before being forwarded.
        self.state = AppState.FROZEN
        if self.in_flight or self._stopped:
            self.state = AppState.RESUMING
            return _RESUME
        return self._arm(self._retry_deadline())

    def resume_done(self, outcome: ResumeOutcome, now: float) -> Decision:
        """The resume call returned (after its own retries). NOT_RESUMED: waiters get refused;
        RESUMED or DAEMON_GONE: they go ahead (see :class:`ResumeOutcome`)."""
        if self.state is not AppState.RESUMING:
            raise AssertionError(f"resume_done() in state {self.state}")
        if outcome is ResumeOutcome.NOT_RESUMED:
            # Unknown, so assume the worst: the next arrival resumes again before forwarding.
            self.state = AppState.FROZEN
            return Decision(fail=True)
        self.state = AppState.AWAKE
        if self.in_flight:
            return _RELEASE
        # Every waiter gave up meanwhile: the app is idle again.
        idle = self._idle_from(now, self.grace)
        return Decision(release=True, pause=idle.pause, timer_at=idle.timer_at)

    def stop(self) -> Decision:
        """Shutting down: resume the app if it is (or may soon be) frozen; never pause again."""
        self._stopped = True
        self._deadline = None
        if self.state is AppState.FROZEN:
            self.state = AppState.RESUMING
            return _RESUME
        return NOTHING  # AWAKE: nothing to do; PAUSING/RESUMING: handled when the call returns

    # -- helpers ----------------------------------------------------------------------------

    def _idle_from(self, now: float, delay: float) -> Decision:
        if self.in_flight or not self._started or self._stopped:
            return NOTHING
        if self.state is not AppState.AWAKE:
            return NOTHING
        deadline = max(now + delay, self._retry_at)
        if deadline <= now:
            return self._begin_pause()
        return self._arm(deadline)

    def _retry_deadline(self) -> float:
        """When a failed pause may be retried: after its backoff, and never within the grace of
        a request that came and went while it was in flight."""
        return max(self._retry_at, self._last_depart + self.grace)

    def _arm(self, deadline: float) -> Decision:
        self._deadline = deadline
        if self._timer_at is not None and self._timer_at <= deadline:
            return NOTHING  # the armed timer fires first and re-arms itself for the deadline
        self._timer_at = deadline
        return Decision(timer_at=deadline)

    def _begin_pause(self) -> Decision:
        self._deadline = None
        self._frozen_before_pause = self.state is AppState.FROZEN
        self.state = AppState.PAUSING
        return _PAUSE
