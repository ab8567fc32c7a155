"""The soak's invariant checker: pure, fed with three records made by three independent parties.

* the app's own log (``Arrival``, ``ran``): when it took each request and when it ran at all,
  read from CLOCK_MONOTONIC inside the container (containers share the node's monotonic clock);
* the freeze record (``Call``): every ``/freeze`` and ``/thaw`` call the proxy made, timed on the
  same clock by a recorder between the proxy and the real daemon (``reliability.recorder``);
* the client's record (``Sent``): what it sent and what came back.

Why the two timing checks are sound (no false alarm from a correct system):

``arrival-while-frozen``: the app takes a request at ``A`` (its handler's first line). A correct
proxy forwards only while nothing may have frozen the app, i.e. never between sending a pause and
learning a resume's answer. A pause is sent only when nothing is in flight, so every request
forwarded before it was answered — and taken by the app — before the proxy sent it, which is
before the recorder saw it (``start``). A request forwarded after a resume was forwarded after
its answer passed the recorder (``end``). So a correct run never has ``A`` in
``(freeze.start, thaw.end)``; one that does forwarded into a possibly frozen app (the app's
clock reading is late, never early, so a violation it reports is real). A pause answered with an
error left the app awake: its window ends at its own answer. An aborted request is the one
exception to "answered before the pause": the proxy may forward it, lose the client and pause
while the app has not read it yet; the grace (250 ms) makes that need an app that takes a
quarter of a second to read a request, so it is reported too, as its own kind.

``ran-while-frozen``: between a pause's answer (``freeze.end``: after the cgroup was frozen) and
the next resume's start (``thaw.start``: before it was thawed) the app is frozen for certain, and
a frozen process cannot read a clock: any time the app logged inside that interval means the
daemon said "frozen" of a container that was not.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FREEZE = "freeze"
THAW = "thaw"


@dataclass(frozen=True)
class Arrival:
    """The app took request ``rid`` at ``t_ns`` (its monotonic clock)."""

    rid: str
    t_ns: int


@dataclass(frozen=True)
class Call:
    """One daemon call as the recorder saw it: sent by the proxy at ``start_ns``, answered
    ``status`` (0: no answer reached the proxy) at ``end_ns``."""

    op: str  # FREEZE or THAW
    start_ns: int
    end_ns: int
    status: int


@dataclass(frozen=True)
class Sent:
    """One request (or websocket message) from the client: ``answers`` responses carried its
    id, ``wrong`` carried another id; ``aborted``: the client gave up on purpose."""

    rid: str
    kind: str
    aborted: bool = False
    answers: int = 0
    wrong: int = 0
    error: str = ""
    needs_arrival: bool = True  # websocket messages after the first share the upgrade's arrival


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str


@dataclass(frozen=True)
class Window:
    """An open interval (start, end) in monotonic ns; ``end`` None: until the end of the run."""

    start_ns: int
    end_ns: int | None

    def contains(self, t: int) -> bool:
        return self.start_ns < t and (self.end_ns is None or t < self.end_ns)


def _ok(call: Call) -> bool:
    return call.status == 200


def _may_have_frozen(call: Call) -> bool:
    """A pause answered 200, or whose answer never came (the daemon may have carried it out)."""
    return call.op == FREEZE and (call.status == 200 or call.status == 0)


def forwarding_windows(calls: Sequence[Call]) -> list[Window]:
    """Where a correct proxy forwards nothing: from each pause's start to the answer of the first
    successful resume after it (a pause refused with an answer: to that answer)."""
    out: list[Window] = []
    i = 0
    while i < len(calls):
        c = calls[i]
        if c.op != FREEZE:
            i += 1
            continue
        if not _may_have_frozen(c):
            out.append(Window(c.start_ns, c.end_ns))
            i += 1
            continue
        j = i + 1
        while j < len(calls) and not (calls[j].op == THAW and _ok(calls[j])):
            j += 1
        out.append(Window(c.start_ns, calls[j].end_ns if j < len(calls) else None))
        i = j + 1
    return out


def frozen_windows(calls: Sequence[Call]) -> list[Window]:
    """Where the app is frozen for certain: a 200 pause's answer to the next resume's start."""
    out: list[Window] = []
    for i, c in enumerate(calls):
        if c.op == FREEZE and _ok(c):
            nxt = next((d for d in calls[i + 1 :] if d.op == THAW), None)
            out.append(Window(c.end_ns, nxt.start_ns if nxt is not None else None))
    return out


def _inside(windows: Sequence[Window], t: int) -> Window | None:
    """The window containing ``t`` (windows sorted by start, not overlapping)."""
    starts = [w.start_ns for w in windows]
    k = bisect.bisect_left(starts, t) - 1
    if k >= 0 and windows[k].contains(t):
        return windows[k]
    return None


def check_calls(calls: Sequence[Call]) -> list[Violation]:
    """Pauses and resumes alternate and never overlap. One leading resume is allowed: a proxy
    that finds its state file (or none) resumes once before anything else."""
    out: list[Violation] = []
    for a, b in itertools.pairwise(calls):
        if b.start_ns < a.end_ns:
            out.append(
                Violation("overlapping-calls", f"{b.op} at {b.start_ns} during {a.op} {a.start_ns}")
            )
    done = [c for c in calls if _ok(c)]
    if done and done[0].op == THAW:
        done = done[1:]
    for k, c in enumerate(done):
        expected = FREEZE if k % 2 == 0 else THAW
        if c.op != expected:
            out.append(
                Violation(
                    "not-alternating",
                    f"successful call #{k} is {c.op} at {c.start_ns}, expected {expected}",
                )
            )
            break  # one is enough: every later index is shifted
    return out


def check(
    arrivals: Sequence[Arrival],
    ran_ns: Iterable[int],
    calls: Sequence[Call],
    sent: Sequence[Sent],
) -> list[Violation]:
    """Every violation of the soak's invariants (empty: the run was correct)."""
    calls = sorted(calls, key=lambda c: c.start_ns)
    out = check_calls(calls)
    by_rid = {s.rid: s for s in sent}
    fwd = forwarding_windows(calls)
    for a in arrivals:
        w = _inside(fwd, a.t_ns)
        if w is not None:
            s = by_rid.get(a.rid)
            kind = (
                "aborted-arrival-while-frozen"
                if s is not None and s.aborted
                else "arrival-while-frozen"
            )
            out.append(Violation(kind, f"{a.rid} at {a.t_ns} in ({w.start_ns}, {w.end_ns})"))
    frozen = frozen_windows(calls)
    for t in sorted(set(ran_ns) | {a.t_ns for a in arrivals}):
        w = _inside(frozen, t)
        if w is not None:
            out.append(
                Violation("ran-while-frozen", f"app ran at {t} in ({w.start_ns}, {w.end_ns})")
            )
    seen = Counter(a.rid for a in arrivals)
    for rid, n in seen.items():
        if rid not in by_rid:
            out.append(Violation("unknown-arrival", f"{rid}: the client never sent it"))
        elif n > 1:
            out.append(Violation("duplicate-arrival", f"{rid} reached the app {n} times"))
    for s in sent:
        if s.wrong:
            out.append(Violation("misrouted", f"{s.rid} got {s.wrong} answer(s) of another id"))
        if s.aborted:
            continue
        if s.answers == 0:
            out.append(Violation("lost", f"{s.rid} ({s.kind}) unanswered: {s.error or '?'}"))
        elif s.answers > 1:
            out.append(Violation("duplicate-answer", f"{s.rid} answered {s.answers} times"))
        elif s.needs_arrival and seen[s.rid] == 0:
            out.append(Violation("answer-without-arrival", f"{s.rid} answered, app never took it"))
    return out
