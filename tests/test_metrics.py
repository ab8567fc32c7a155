"""The sidecar's ``GET /metrics``: the stdlib exposition writer (freeze_proxy/metrics.py), read
back by prometheus_client's own parser, and the counts a running proxy reports."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from freeze_proxy import contract
from freeze_proxy.metrics import (
    CONTENT_TYPE,
    Counter,
    FrozenClock,
    Gauge,
    Histogram,
    Registry,
    format_value,
    render,
)
from tests.proxy_harness import Harness, start_harness


def parse(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, sorted labels): value}, by prometheus_client's parser."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- the writer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3, "3"),
        (2.0, "2"),
        (-1.5, "-1.5"),
        (0.005, "0.005"),
        (1e20, "1e+20"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_written_as_go_writes_them(value: float, text: str) -> None:
    assert format_value(value) == text


label_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


# Our help texts are fixed sentences; the parsers trim the space around them.
help_texts = label_values.map(str.strip)


@given(values=st.lists(label_values, min_size=1, max_size=5, unique=True), help_text=help_texts)
def test_any_label_value_and_help_round_trips_through_prometheus_clients_parser(
    values: list[str], help_text: str
) -> None:
    c = Counter("x_total", help_text, ("v",))
    for i, v in enumerate(values):
        c.inc(i + 1, v=v)
    [family] = text_string_to_metric_families(render([c]))
    assert (family.name, family.type) == ("x", "counter")
    assert family.documentation == help_text
    assert {s.labels["v"]: s.value for s in family.samples} == {
        v: i + 1 for i, v in enumerate(values)
    }


@given(
    st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
        max_size=50,
    )
)
def test_histogram_buckets_are_cumulative_with_sum_and_count(observed: list[float]) -> None:
    h = Histogram("lat_seconds", "latency", (0.01, 0.1, 1.0))
    for v in observed:
        h.observe(v)
    got = parse(render([h]))["lat_seconds"]
    for le, bound in (("0.01", 0.01), ("0.1", 0.1), ("1", 1.0), ("+Inf", math.inf)):
        want = sum(1 for v in observed if v <= bound)
        assert got[("lat_seconds_bucket", (("le", le),))] == want
    assert got[("lat_seconds_count", ())] == len(observed) == h.count()
    assert got[("lat_seconds_sum", ())] == pytest.approx(sum(observed))


def test_a_labelled_histogram_and_an_unlabelled_one() -> None:
    h = Histogram("call_seconds", "calls", (1.0,), ("action",))
    assert render([h]).splitlines()[2:] == []  # no series before the first observation
    h.observe(0.5, action="resume")
    h.observe(2.0, action="resume")
    got = parse(render([h]))["call_seconds"]
    assert got[("call_seconds_bucket", (("action", "resume"), ("le", "1")))] == 1
    assert got[("call_seconds_bucket", (("action", "resume"), ("le", "+Inf")))] == 2
    assert got[("call_seconds_count", (("action", "resume"),))] == 2


def test_gauges_and_counters_read_at_scrape_time() -> None:
    state = {"n": 1}
    g = Gauge("g", "a gauge", fn=lambda: state["n"])
    by = Gauge("s", "by state", ("state",), fn=lambda: {("a",): 1.0, ("b",): 0.0})
    c = Counter("c_total", "read", fn=lambda: state["n"] * 2)
    state["n"] = 5
    got = parse(render([g, by, c]))
    assert got["g"] == {("g", ()): 5}
    assert got["s"] == {("s", (("state", "a"),)): 1, ("s", (("state", "b"),)): 0}
    assert got["c"] == {("c_total", ()): 10}
    with pytest.raises(TypeError):
        c.inc()
    with pytest.raises(TypeError):
        g.set(1)


def test_label_sets_announced_at_zero_and_counted() -> None:
    c = Counter("r_total", "by result", ("result",), initial=[{"result": "ok"}, {"result": "no"}])
    c.inc(result="ok")
    c.inc(2, result="ok")
    assert c.value(result="ok") == 3 and c.value(result="no") == 0
    assert 'r_total{result="no"} 0' in render([c])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Counter("no_suffix", "x"),
        lambda: Counter("1bad_total", "x"),
        lambda: Gauge("g", "x", ("__reserved",)),
        lambda: Gauge("g", "x", ("a", "a")),
        lambda: Gauge("g", "x", ("bad-label",)),
        lambda: Histogram("h", "x", ()),
        lambda: Histogram("h", "x", (1.0, 0.5)),
        lambda: Histogram("h", "x", (1.0,), ("le",)),
    ],
)
def test_invalid_names_and_buckets_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_wrong_labels_and_decreasing_counters_are_refused() -> None:
    c = Counter("r_total", "x", ("result",))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(other="x")
    with pytest.raises(ValueError, match="cannot go down"):
        c.inc(-1, result="ok")
    r = Registry()
    r.add(c)
    with pytest.raises(ValueError, match="twice"):
        r.add(Counter("r_total", "again"))
    assert Registry().render() == ""


def test_frozen_seconds_add_up_the_frozen_spans() -> None:
    clock = FrozenClock()
    clock.saw(False, 0.0)
    clock.saw(True, 1.0)
    clock.saw(True, 2.0)  # still frozen: the span started at 1
    assert clock.seconds(3.5) == 2.5
    clock.saw(False, 4.0)
    clock.saw(True, 10.0)
    assert clock.seconds(10.5) == 3.5
    clock.saw(False, 11.0)
    assert clock.seconds(100.0) == 4.0


# -- a running proxy --------------------------------------------------------------------------


Parsed = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


async def scrape(h: Harness) -> Parsed:
    url = h.health_url.replace(contract.HEALTH_PATH, contract.METRICS_PATH)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE
        text = await r.text()
    return parse(text)


def value(
    got: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]], sample: str, **labels: str
) -> float:
    family = next(f for f in got if sample.startswith(f))
    return got[family][(sample, tuple(sorted(labels.items())))]


async def test_wakes_pauses_and_time_frozen_are_counted(harness: Harness) -> None:
    wakes = 3
    async with aiohttp.ClientSession() as s:
        for i in range(wakes):
            await harness.wait_for(lambda: harness.daemon.frozen)
            async with s.get(f"{harness.proxy_url}/w{i}") as r:
                assert r.status == 200
    await harness.wait_for(lambda: harness.daemon.frozen)
    got = await scrape(harness)
    assert value(got, "freeze_proxy_resumes_total", result="ok") == wakes
    assert value(got, "freeze_proxy_wake_seconds_count") == wakes
    assert 0 < value(got, "freeze_proxy_wake_seconds_sum") < wakes * 1.0
    # The harness froze the app before the first wake, and once after each.
    assert value(got, "freeze_proxy_pauses_total", result="ok") == wakes + 1
    assert value(got, "freeze_proxy_pauses_total", result="refused") == 0
    assert value(got, "freeze_proxy_requests_in_flight") == 0
    assert value(got, "freeze_proxy_app_state", state="frozen") == 1
    assert value(got, "freeze_proxy_app_state", state="awake") == 0
    before = value(got, "freeze_proxy_frozen_seconds_total")
    assert before > 0
    started = time.monotonic()
    await harness.wait_for(lambda: time.monotonic() - started > 0.2)
    got = await scrape(harness)
    assert value(got, "freeze_proxy_frozen_seconds_total") >= before + 0.2


async def test_ready_probes_answered_while_frozen_are_counted(harness: Harness) -> None:
    url = harness.health_url.replace(contract.HEALTH_PATH, contract.READY_PATH)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(url) as r:
                assert r.status == 200
    got = await scrape(harness)
    assert value(got, "freeze_proxy_probes_answered_frozen_total") == 2
    assert value(got, "freeze_proxy_resumes_total", result="ok") == 0


async def test_failed_pauses_and_resumes_by_result(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, resume_timeout=0.3)
    try:
        await h.wait_for(lambda: h.daemon.frozen)
        h.daemon.fail_thaw = 1000
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy_url + "/x") as r:
                assert r.status == 503
            got = await scrape(h)
            assert value(got, "freeze_proxy_resumes_total", result="failed") == 1
            assert value(got, "freeze_proxy_requests_refused_total") == 1
            assert value(got, "freeze_proxy_wake_seconds_count") == 0  # no wake happened
            h.daemon.fail_thaw = 0
            h.daemon.fail_freeze = True
            async with s.get(h.proxy_url + "/y") as r:
                assert r.status == 200
        await h.wait_for(
            lambda: h.daemon.count("freeze") == 1 and h.daemon.count("thaw") == 1, timeout=5
        )
        deadline = time.monotonic() + 5
        while value(got := await scrape(h), "freeze_proxy_pauses_total", result="refused") < 1:
            assert time.monotonic() < deadline, "the refused pause was not counted"
            await asyncio.sleep(0.01)
        assert value(got, "freeze_proxy_resumes_total", result="ok") == 1
    finally:
        await h.close()


async def test_the_health_port_lists_metrics_among_what_it_serves(harness: Harness) -> None:
    url = harness.health_url.replace(contract.HEALTH_PATH, "/nope")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 404
        assert contract.METRICS_PATH in (await r.json())["error"]


async def test_slow_idle_and_surplus_client_connections_are_counted(tmp_path: Path) -> None:
    """The relay's bounds (README, *Timeouts and limits*) show on /metrics, not in the log."""
    h = await start_harness(tmp_path, header_timeout=0.2, idle_timeout=0.4, max_connections=1)
    try:
        port = int(h.proxy_url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 5  # the harness's own check that the proxy listens
        while value(await scrape(h), "freeze_proxy_client_connections") > 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        surplus, extra = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(surplus.read(), 5)).startswith(b"HTTP/1.1 503 ")
        extra.close()
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # the idle timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")  # a head that never ends
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        writer.close()
        silent.close()
        got = await scrape(h)
        assert value(got, "freeze_proxy_head_timeouts_total") == 1
        assert value(got, "freeze_proxy_idle_closed_total") == 1
        assert value(got, "freeze_proxy_connections_refused_total", listener="serving") == 1
        assert value(got, "freeze_proxy_connections_refused_total", listener="health") == 0
        assert value(got, "freeze_proxy_client_connections") == 0
    finally:
        await h.close()
