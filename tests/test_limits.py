"""daemon.limits: the pure bookkeeping behind the daemon's rate limits and no-op suppression."""

from __future__ import annotations

import pytest

from daemon.limits import (
    Admission,
    KeyedBuckets,
    KnownTokens,
    LimitSettings,
    PodStates,
    TokenBucket,
)
from freeze_proxy.durations import format_duration


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(0.0) == pytest.approx(0.1)
    assert not bucket.take(0.05)
    assert bucket.take(0.1001)
    assert not bucket.take(0.1001)


def test_bucket_never_saves_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=100, burst=2, now=0.0)
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]


def test_bucket_give_back() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    assert bucket.take(0.0) and not bucket.take(0.0)
    bucket.give_back(0.0)
    assert bucket.take(0.0)
    bucket.give_back(0.0)
    bucket.give_back(0.0)  # never above the burst
    assert bucket.take(0.0) and not bucket.take(0.0)


def test_bucket_clock_going_back_is_harmless() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0.5)])
def test_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


def test_keyed_buckets_are_independent() -> None:
    buckets = KeyedBuckets(rate=1, burst=2)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert buckets.take("b", 0.0)
    assert buckets.retry_after("a", 0.0) == pytest.approx(1.0)
    assert buckets.retry_after("never-seen", 0.0) == 0.0


def test_keyed_buckets_rate_zero_disables() -> None:
    buckets = KeyedBuckets(rate=0, burst=1)
    assert all(buckets.take("a", 0.0) for _ in range(1000))
    assert len(buckets) == 0 and not buckets.enabled


def test_keyed_buckets_memory_is_bounded_and_busy_keys_survive() -> None:
    buckets = KeyedBuckets(rate=1, burst=2, max_keys=3)
    assert buckets.take("flooder", 0.0) and buckets.take("flooder", 0.0)
    for i in range(100):  # many one-off keys: their buckets are nearly full, the flooder's empty
        buckets.take(f"k{i}", 0.0)
        buckets.take("flooder", 0.0)
        assert len(buckets) <= 3
    assert not buckets.take("flooder", 0.0)


def test_keyed_give_back_only_for_known_keys() -> None:
    buckets = KeyedBuckets(rate=1, burst=1)
    buckets.give_back("nobody", 0.0)
    assert len(buckets) == 0
    assert buckets.take("a", 0.0)
    buckets.give_back("a", 0.0)
    assert buckets.take("a", 0.0)


def test_known_tokens_until_exp() -> None:
    known = KnownTokens()
    known.add(b"d1", "pod-1", expires_at=100.0)
    assert known.known(b"d1", 99.0) and known.known_pod("pod-1", 99.0)
    assert not known.known(b"d2", 0.0) and not known.known_pod("pod-2", 0.0)
    assert not known.known(b"d1", 100.0) and not known.known_pod("pod-1", 100.0)
    assert not known.known(b"d1", 50.0)  # expired entries are gone


def test_known_pod_lasts_as_long_as_its_latest_token() -> None:
    known = KnownTokens()
    known.add(b"new", "pod-1", expires_at=200.0)
    known.add(b"old", "pod-1", expires_at=100.0)
    assert known.known_pod("pod-1", 150.0)


def test_known_tokens_are_bounded() -> None:
    known = KnownTokens(max_entries=2)
    for i in range(5):
        known.add(bytes([i]), f"pod-{i}", expires_at=100.0)
    assert not known.known(b"\x00", 0.0) and known.known(b"\x04", 0.0)
    assert not known.known_pod("pod-0", 0.0) and known.known_pod("pod-4", 0.0)


def test_pod_states_noop_only_for_the_same_action_and_narrowing() -> None:
    states = PodStates()
    assert states.noop("p", [], "freeze") is None
    states.record("p", [], "freeze", ["app", "side"])
    assert states.noop("p", [], "freeze") == ["app", "side"]
    assert states.noop("p", [], "thaw") is None
    assert states.noop("p", ["app"], "freeze") is None
    assert states.noop("q", [], "freeze") is None
    states.record("p", ["app"], "thaw", ["app"])  # another narrowing replaces what was known
    assert states.noop("p", [], "freeze") is None and states.noop("p", [], "thaw") is None
    assert states.noop("p", ["app"], "thaw") == ["app"]
    states.forget("p")
    assert states.noop("p", ["app"], "thaw") is None
    states.forget("never-seen")


def test_pod_states_bounded() -> None:
    states = PodStates(max_pods=2)
    for pod in ("a", "b", "c"):
        states.record(pod, [], "freeze", ["x"])
    assert len(states) == 2 and states.noop("a", [], "freeze") is None
    assert states.noop("c", [], "freeze") == ["x"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0000025, "2.5µs"),
        (0.25, "250ms"),
        (0.0015, "1.5ms"),
        (1.5, "1.5s"),
        (60, "1m0s"),
        (90, "1m30s"),
        (7200, "2h0m0s"),
        (3725.25, "1h2m5.25s"),
    ],
)
def test_format_duration_is_gos(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_admission_charges_only_refusals() -> None:
    adm = Admission(LimitSettings(refusal_rate=1, refusal_burst=2))
    for i in range(10):  # good tokens from one source never drain its bucket
        ticket = adm.admit(bytes([i]), "10.0.0.1", None, 0.0)
        assert ticket.allowed
        adm.authenticated(ticket, f"pod-{i}", 100.0, 0.0)
    bad = [adm.admit(b"junk%d" % i, "10.0.0.1", None, 0.0) for i in range(3)]
    assert [t.allowed for t in bad] == [True, True, False]
    assert bad[2].retry_after == pytest.approx(1.0)
    assert adm.admit(b"junk", "10.0.0.2", None, 0.0).allowed  # another source is unaffected


def test_admission_known_token_skips_a_drained_bucket() -> None:
    adm = Admission(LimitSettings(refusal_rate=1, refusal_burst=1))
    good = adm.admit(b"good", "node", None, 0.0)
    adm.authenticated(good, "pod-a", 100.0, 0.0)
    assert adm.admit(b"junk", "node", None, 0.0).allowed
    assert not adm.admit(b"junk2", "node", None, 0.0).allowed
    ticket = adm.admit(b"good", "node", None, 0.0)
    assert ticket.allowed and ticket.key is None
    assert adm.admit(b"good", "node", None, 100.0).key == "source:node"  # expired: unknown again


def test_admission_new_token_of_a_known_pod_has_its_own_bucket() -> None:
    """A rotated token of a pod that authenticated before is not starved by junk from the same
    (SNAT) source address; junk claiming that pod drains only that pod's bucket."""
    adm = Admission(LimitSettings(refusal_rate=1, refusal_burst=1))
    adm.authenticated(adm.admit(b"old", "node", "pod-a", 0.0), "pod-a", 100.0, 0.0)
    assert adm.admit(b"junk", "node", None, 0.0).allowed
    assert not adm.admit(b"junk2", "node", "pod-x", 0.0).allowed
    rotated = adm.admit(b"rotated", "node", "pod-a", 0.0)
    assert rotated.allowed and rotated.key == "pod:pod-a"


def test_admission_unavailable_is_no_refusal() -> None:
    adm = Admission(LimitSettings(refusal_rate=1, refusal_burst=1))
    for _ in range(5):
        ticket = adm.admit(b"t", "s", None, 0.0)
        assert ticket.allowed
        adm.unavailable(ticket, 0.0)


def test_admission_rate_zero_is_unlimited() -> None:
    adm = Admission(LimitSettings(refusal_rate=0, freeze_rate=0))
    assert all(adm.admit(b"j%d" % i, "s", None, 0.0).allowed for i in range(100))
    assert all(adm.may_freeze("p", 0.0)[0] for _ in range(100))


def test_admission_freeze_rate_per_pod() -> None:
    adm = Admission(LimitSettings(freeze_rate=1, freeze_burst=2))
    assert [adm.may_freeze("p", 0.0)[0] for _ in range(3)] == [True, True, False]
    assert adm.may_freeze("p", 0.0)[1] == pytest.approx(1.0)
    assert adm.may_freeze("q", 0.0)[0]
    assert adm.may_freeze("p", 1.0)[0]
