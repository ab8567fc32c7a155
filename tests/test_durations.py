"""freeze_proxy.durations follows Go's time.ParseDuration (Go's own test table, and its refusals),
plus two documented differences: no negative durations, and a bare number means seconds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freeze_proxy.durations import parse_duration, parse_duration_ns

NS, US, MS, S, M, H = 1, 10**3, 10**6, 10**9, 60 * 10**9, 3600 * 10**9
MAX = 2**63 - 1

# Go's src/time/time_test.go parseDurationTests (the non-negative ones), to the nanosecond.
GO_ACCEPTS = [
    ("0", 0),
    ("5s", 5 * S),
    ("30s", 30 * S),
    ("1478s", 1478 * S),
    ("+5s", 5 * S),
    ("+0", 0),
    ("5.0s", 5 * S),
    ("5.6s", 5 * S + 600 * MS),
    ("5.s", 5 * S),
    (".5s", 500 * MS),
    ("1.0s", 1 * S),
    ("1.00s", 1 * S),
    ("1.004s", 1 * S + 4 * MS),
    ("1.0040s", 1 * S + 4 * MS),
    ("100.00100s", 100 * S + 1 * MS),
    ("10ns", 10 * NS),
    ("11us", 11 * US),
    ("12µs", 12 * US),  # U+00B5
    ("12μs", 12 * US),  # U+03BC
    ("13ms", 13 * MS),
    ("14s", 14 * S),
    ("15m", 15 * M),
    ("16h", 16 * H),
    ("3h30m", 3 * H + 30 * M),
    ("10.5s4m", 4 * M + 10 * S + 500 * MS),
    ("1h2m3s4ms5us6ns", 1 * H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
    ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
    ("52763797000ns", 52763797000 * NS),
    ("0.3333333333333333333h", 20 * M),  # Go's float64 arithmetic, not exact thirds
    ("1562417h", 1562417 * H),
    ("9007199254740993ns", (1 << 53) + 1),
    ("9223372036854775807ns", MAX),
    ("9223372036854775.807us", MAX),
    ("9223372036s854ms775us807ns", MAX),
    ("0.100000000000000000000h", 6 * M),
    ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
    # and what Knative users write
    ("1m30s", 90 * S),
    ("1h2m3.5s", 1 * H + 2 * M + 3 * S + 500 * MS),
    ("300ms", 300 * MS),
    ("1.5h", 90 * M),
    ("250ms", 250 * MS),
    ("1s1s", 2 * S),  # Go sums repeated units
    ("0s", 0),
    ("0.000000001s", 1),
    ("0.0000000009s", 0),  # below a nanosecond: truncated, as Go does
]

GO_REFUSES = [
    "",
    "-",
    "s",
    ".",
    "-.",
    ".s",
    "+.s",
    "1d",
    "1w",
    "1S",
    "1Ms",
    "1sec",
    "1m30",  # the last number has no unit
    "1.5.s",
    "1..5s",
    "1e3s",
    "0x10s",
    "1 s",
    "1s 2s",
    "inf",
    "nan",
    "fast",
    "\x85\x85",
    "hello \xffff world",
    "\u0661s",  # a digit, but not an ASCII one
    "9223372036854775808ns",  # one past the range
    "9223372036854775810ns",
    "9223372036854775.808us",
    "9223372036854ms775us808ns",
    "2562048h",
    "106751991167300d",
    "99999999999999999999s",
]

# Go accepts these, we do not: a negative grace or TTL means nothing.
NEGATIVE = ["-5s", "-0", "-2m3.4s", "-9223372036854775808ns", "-1"]

# Go refuses these, we accept them as seconds (earlier versions documented it; README).
BARE_SECONDS = [("1", 1 * S), ("2", 2 * S), ("1.5", 1500 * MS), (".5", 500 * MS), ("5.", 5 * S)]


@pytest.mark.parametrize(("text", "ns"), GO_ACCEPTS)
def test_what_go_accepts_reads_the_same_to_the_nanosecond(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns
    assert parse_duration(text) == ns / 1e9


@pytest.mark.parametrize("text", GO_REFUSES)
def test_what_go_refuses_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*e\.g\. 0, 250ms, 1\.5s, 1m30s"):
        parse_duration(text)


@pytest.mark.parametrize("text", NEGATIVE)
def test_negative_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="negative durations are not allowed"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "ns"), BARE_SECONDS)
def test_a_bare_number_means_seconds(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_duration(" 250ms\n") == 0.25


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1d", "unknown unit 'd'"),
        ("1m30", "a number without a unit"),
        ("2562048h", "out of range"),
        (".s", "a '.' without digits"),
        ("fast", "expected a number at 'fast'"),
    ],
)
def test_the_message_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


UNITS = [("ns", NS), ("us", US), ("µs", US), ("μs", US), ("ms", MS), ("s", S), ("m", M), ("h", H)]


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(UNITS)), min_size=1, max_size=8))
def test_any_sequence_of_whole_components_sums_exactly(
    parts: list[tuple[int, tuple[str, int]]],
) -> None:
    text = "".join(f"{n}{unit}" for n, (unit, _) in parts)
    assert parse_duration_ns(text) == sum(n * ns for n, (_, ns) in parts)


@given(
    st.integers(0, 10**6),
    st.integers(0, 9).flatmap(lambda k: st.tuples(st.just(k), st.integers(0, 10**k - 1))),
)
def test_fractions_of_a_second_down_to_the_nanosecond_are_exact(
    whole: int, digits: tuple[int, int]
) -> None:
    k, fraction = digits
    text = f"{whole}.{fraction:0{k}d}s" if k else f"{whole}.s"
    assert parse_duration_ns(text) == whole * S + fraction * 10 ** (9 - k)
