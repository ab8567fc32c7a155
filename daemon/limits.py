"""What a caller may cost the daemon: pure bookkeeping, no I/O, the clock passed in.

- :class:`TokenBucket` / :class:`KeyedBuckets`: rate limits (per source, per pod), bounded memory.
- :class:`KnownTokens`: tokens that authenticated before (until their ``exp``); they skip the
  refusal limiter, so a flood of bad tokens from one address never delays a good one.
- :class:`PodStates`: the state the daemon last set for each pod, so freezing a frozen pod or
  thawing a thawed one costs no runtime call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

Action = Literal["freeze", "thaw"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; each allowed event takes one."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def _fill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._fill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def give_back(self, now: float) -> None:
        """Return a token taken for an event that turned out not to count."""
        self._fill(now)
        self._tokens = min(self.burst, self._tokens + 1)

    def full(self, now: float) -> bool:
        self._fill(now)
        return self._tokens >= self.burst

    def retry_after(self, now: float) -> float:
        """Seconds until one token is there again (0 if one is there now)."""
        self._fill(now)
        return max(0.0, (1 - self._tokens) / self.rate)


class KeyedBuckets:
    """One :class:`TokenBucket` per key (source address, pod), at most ``max_keys`` of them.

    Full buckets carry no information and are dropped first when room is needed; when every
    bucket is in use the least recently used one goes (its key starts over with a full bucket,
    so a flood of distinct keys can at worst reset buckets, never grow memory).
    ``rate`` 0 disables the limit: every ``take`` succeeds.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        if len(self._buckets) >= self._max:
            for old in [k for k, b in self._buckets.items() if b.full(now)]:
                del self._buckets[old]
            while len(self._buckets) >= self._max:
                self._buckets.popitem(last=False)
        bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def take(self, key: str, now: float) -> bool:
        return not self.enabled or self._bucket(key, now).take(now)

    def give_back(self, key: str, now: float) -> None:
        if self.enabled and key in self._buckets:
            self._buckets[key].give_back(now)

    def retry_after(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key) if self.enabled else None
        return 0.0 if bucket is None else bucket.retry_after(now)


class KnownTokens:
    """Digests of tokens that authenticated, each until its ``exp``; bounded (oldest go first).

    Only used to decide which requests skip the refusal limiter: a known token is still fully
    verified (and reviewed) on every call.
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()
        self._pods: OrderedDict[str, float] = OrderedDict()

    def add(self, digest: bytes, pod_uid: str, expires_at: float) -> None:
        _put(self._until, digest, expires_at, self._max)
        _put(self._pods, pod_uid, expires_at, self._max)

    def known(self, digest: bytes, now: float) -> bool:
        until = self._until.get(digest)
        if until is None:
            return False
        if now >= until:
            del self._until[digest]
            return False
        return True

    def known_pod(self, pod_uid: str, now: float) -> bool:
        """Whether some token of this pod authenticated and has not expired yet."""
        until = self._pods.get(pod_uid)
        return until is not None and now < until


K = TypeVar("K")


def _put(table: OrderedDict[K, float], key: K, until: float, max_entries: int) -> None:
    table[key] = max(until, table.get(key, 0.0))
    table.move_to_end(key)
    while len(table) > max_entries:
        table.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Last:
    containers: tuple[str, ...]
    action: Action
    done: tuple[str, ...]


class PodStates:
    """The state this daemon last set for each pod, as (container narrowing, action).

    Only what the daemon itself did successfully is remembered; a failed or unknown outcome
    forgets the pod, so the next call goes to the runtime. A call with another narrowing than
    the remembered one is never a no-op (``?container=a`` after a whole-pod freeze may move a
    container the remembered state does not describe).
    """

    def __init__(self, *, max_pods: int = 10_000) -> None:
        self._max = max_pods
        self._last: OrderedDict[str, _Last] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def noop(self, pod_uid: str, containers: Sequence[str], action: Action) -> list[str] | None:
        """The containers the same call moved last time, if it is a no-op now; else None."""
        last = self._last.get(pod_uid)
        if last is None or last.containers != tuple(containers) or last.action != action:
            return None
        return list(last.done)

    def record(
        self, pod_uid: str, containers: Sequence[str], action: Action, done: Sequence[str]
    ) -> None:
        self._last[pod_uid] = _Last(tuple(containers), action, tuple(done))
        self._last.move_to_end(pod_uid)
        while len(self._last) > self._max:
            self._last.popitem(last=False)

    def forget(self, pod_uid: str) -> None:
        self._last.pop(pod_uid, None)


@dataclass(frozen=True)
class LimitSettings:
    """The per-caller limits (flags ``--refusal-rate`` ... of ``python -m daemon``)."""

    refusal_rate: float = 10.0  # refused tokens per second and source (0: no limit)
    refusal_burst: float = 20.0
    freeze_rate: float = 5.0  # freezes that change a pod's state, per second and pod (0: none)
    freeze_burst: float = 20.0
    body_timeout: float = 5.0  # seconds to read a request body
    refusal_delay: float = 1.0  # a caller over the refusal rate waits this long for its 429


@dataclass(frozen=True, slots=True)
class Ticket:
    """What :meth:`Admission.admit` decided for one request, to settle once it is answered."""

    allowed: bool
    digest: bytes
    key: str | None  # the refusal bucket charged; None: a known token, never limited
    retry_after: float = 0.0


class Admission:
    """Who may make the daemon verify a token, and how often a pod may freeze.

    Unknown tokens (never authenticated here) cost one token of a refusal bucket, given back
    when they authenticate: so only refusals drain it. The bucket is the claimed pod's when the
    (unverified) token names a pod that authenticated here before, else the source address's:
    behind hostPort's SNAT every pod of the node shares one source address, and a flood of junk
    from one of them must not delay the rotated token of another. Known tokens skip all this.
    Thaws are never limited per pod; a freeze that changes state takes one ``freeze_rate`` token
    (thaws that change state can only follow freezes, so they are bounded by it too).
    """

    def __init__(self, settings: LimitSettings, *, max_keys: int = 4096) -> None:
        self.settings = settings
        self._refusals = KeyedBuckets(
            settings.refusal_rate, settings.refusal_burst, max_keys=max_keys
        )
        self._freezes = KeyedBuckets(settings.freeze_rate, settings.freeze_burst, max_keys=max_keys)
        self.known = KnownTokens()

    def admit(self, digest: bytes, source: str, claimed_pod: str | None, now: float) -> Ticket:
        if self.known.known(digest, now):
            return Ticket(True, digest, None)
        if claimed_pod is not None and self.known.known_pod(claimed_pod, now):
            key = f"pod:{claimed_pod}"
        else:
            key = f"source:{source}"
        if self._refusals.take(key, now):
            return Ticket(True, digest, key)
        return Ticket(False, digest, key, self._refusals.retry_after(key, now))

    def authenticated(self, ticket: Ticket, pod_uid: str, expires_at: float, now: float) -> None:
        if ticket.key is not None:
            self._refusals.give_back(ticket.key, now)
        self.known.add(ticket.digest, pod_uid, expires_at)

    def unavailable(self, ticket: Ticket, now: float) -> None:
        """The token could not be checked: that is no refusal, so give the token back."""
        if ticket.key is not None:
            self._refusals.give_back(ticket.key, now)

    def may_freeze(self, pod_uid: str, now: float) -> tuple[bool, float]:
        """Whether this pod may change state to frozen now; else seconds until it may."""
        if self._freezes.take(pod_uid, now):
            return True, 0.0
        return False, self._freezes.retry_after(pod_uid, now)
