"""``GET /metrics`` of the sidecar: Prometheus's text exposition format (version 0.0.4), written
here because the proxy runs in every pod and stays standard-library only.

Counters, gauges and histograms with fixed buckets, each either updated where the event happens
(``inc``, ``set``, ``observe``) or read when scraped (``fn``: the state the proxy already keeps,
so nothing is counted twice). :class:`ProxyMetrics` is the sidecar's set; ``render`` is pure.
Checked against ``prometheus_client``'s own parser and scraped by a real Prometheus in the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    suffix: str  # appended to the family's name: "", "_bucket", "_sum", "_count"
    labels: Labels
    value: float


class Metric(Protocol):
    name: str
    help: str
    kind: str  # "counter", "gauge" or "histogram"

    def samples(self) -> Iterable[Sample]: ...


def format_value(value: float) -> str:
    """Go's client writes integers without a fraction and +Inf/-Inf/NaN by name; so do we."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _check_names(name: str, labelnames: Sequence[str], reserved: Sequence[str] = ()) -> None:
    if not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}: use [a-zA-Z_:][a-zA-Z0-9_:]*")
    for label in labelnames:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"invalid label name {label!r} for {name}")
    if len(set(labelnames)) != len(labelnames):
        raise ValueError(f"duplicate label names for {name}: {list(labelnames)}")


def _key(name: str, labelnames: Sequence[str], labels: Mapping[str, str]) -> tuple[str, ...]:
    if set(labels) != set(labelnames):
        raise ValueError(f"{name} takes labels {sorted(labelnames)}, got {sorted(labels)}")
    return tuple(str(labels[n]) for n in labelnames)


ValueFn = Callable[[], float | Mapping[tuple[str, ...], float]]


class _Simple:
    """A counter or gauge: values per label set, set by hand or read from ``fn`` at scrape."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        fn: ValueFn | None = None,
        *,
        initial: Iterable[Mapping[str, str]] = (),
    ) -> None:
        _check_names(name, labelnames)
        if self.kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._fn = fn
        self._values: dict[tuple[str, ...], float] = {}
        if not labelnames and fn is None:
            self._values[()] = 0.0
        for labels in initial:  # label sets shown at 0 before their first event
            self._values[_key(name, self.labelnames, labels)] = 0.0

    def value(self, **labels: str) -> float:
        return self._current().get(_key(self.name, self.labelnames, labels), 0.0)

    def _current(self) -> Mapping[tuple[str, ...], float]:
        if self._fn is None:
            return self._values
        got = self._fn()
        return got if isinstance(got, Mapping) else {(): float(got)}

    def samples(self) -> Iterable[Sample]:
        for key, value in sorted(self._current().items()):
            yield Sample("", tuple(zip(self.labelnames, key, strict=True)), value)


class Counter(_Simple):
    """Only goes up (from process start); named ``*_total`` as Prometheus's conventions ask."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        if self._fn is not None:
            raise TypeError(f"{self.name} is read from a function at scrape time")
        key = _key(self.name, self.labelnames, labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Simple):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        if self._fn is not None:
            raise TypeError(f"{self.name} is read from a function at scrape time")
        self._values[_key(self.name, self.labelnames, labels)] = float(value)


class Histogram:
    """Fixed upper bounds (``le``), cumulative buckets, ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        _check_names(name, labelnames, reserved=("le",))
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)) or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be increasing and distinct: {list(buckets)}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.bounds = (*bounds, math.inf)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._series[()] = ([0] * len(self.bounds), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        key = _key(self.name, self.labelnames, labels)
        counts, total = self._series.setdefault(key, ([0] * len(self.bounds), [0.0]))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(_key(self.name, self.labelnames, labels))
        return sum(series[0]) if series else 0

    def samples(self) -> Iterable[Sample]:
        for key, (counts, total) in sorted(self._series.items()):
            labels = tuple(zip(self.labelnames, key, strict=True))
            running = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                yield Sample("_bucket", (*labels, ("le", format_value(bound))), running)
            yield Sample("_sum", labels, total[0])
            yield Sample("_count", labels, running)


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition of ``metrics``: HELP and TYPE lines, then one line per sample."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for sample in metric.samples():
            labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
            where = "{" + labels + "}" if labels else ""
            lines.append(f"{metric.name}{sample.suffix}{where} {format_value(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


M = TypeVar("M", bound=Metric)


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def names(self) -> list[str]:
        return list(self._metrics)

    def render(self) -> str:
        return render(self._metrics.values())


# Wakes on real containerd take 9-20 ms (README, the demo), a busy node more; the resume budget
# is 5 s by default.
WAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PAUSE_RESULTS = ("ok", "unknown", "refused", "unreachable", "state_file_error")
RESUME_RESULTS = ("ok", "failed", "unreachable")


class FrozenClock:
    """Seconds the app spent frozen, fed with the gate's state after every event."""

    def __init__(self) -> None:
        self._total = 0.0
        self._since: float | None = None

    def saw(self, frozen: bool, now: float) -> None:
        if frozen and self._since is None:
            self._since = now
        elif not frozen and self._since is not None:
            self._total += max(0.0, now - self._since)
            self._since = None

    def seconds(self, now: float) -> float:
        running = max(0.0, now - self._since) if self._since is not None else 0.0
        return self._total + running


class WakeTimer:
    """How long requests waited for the app: from the first that found it frozen (or a pause
    in flight) until the resume released them, once per wake."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._since: float | None = None

    def waiting(self, now: float) -> None:
        if self._since is None:
            self._since = now

    def released(self, ok: bool, now: float) -> None:
        since, self._since = self._since, None
        if ok and since is not None:
            self._histogram.observe(max(0.0, now - since))


class ProxyMetrics:
    """The sidecar's metrics (names in README, "Metrics"). Events come from
    ``freeze_proxy.app.FreezeProxy``; the rest is read from it when scraped."""

    def __init__(
        self,
        *,
        now: Callable[[], float],
        in_flight: Callable[[], int],
        state: Callable[[], str],
        states: Sequence[str],
        counters: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = r = Registry()
        self.frozen_clock = FrozenClock()
        r.add(
            Gauge(
                "freeze_proxy_requests_in_flight",
                "Requests admitted and not yet finished (waiting for a resume, or relayed).",
                fn=lambda: float(in_flight()),
            )
        )
        r.add(
            Gauge(
                "freeze_proxy_app_state",
                "1 for the app's current state as the proxy knows it, 0 for the others.",
                ("state",),
                fn=lambda: {(s,): float(s == state()) for s in states},
            )
        )
        self.pauses = r.add(
            Counter(
                "freeze_proxy_pauses_total",
                "Pause calls to the freeze-daemon by result (ok: frozen; unknown: no answer, "
                "may be frozen; refused: the daemon answered an error; unreachable: no daemon; "
                "state_file_error: the frozen marker could not be written, nothing called; "
                "dry_run: --mode dry-run, a pause it would have made, the daemon not called).",
                ("result",),
                initial=[{"result": x} for x in PAUSE_RESULTS],
            )
        )
        self.resumes = r.add(
            Counter(
                "freeze_proxy_resumes_total",
                "Resume calls to the freeze-daemon by result (ok; failed: waiting requests got "
                "503; unreachable: no daemon for the whole budget, forwarded unfrozen; dry_run: a "
                "resume it would have made).",
                ("result",),
                initial=[{"result": x} for x in RESUME_RESULTS],
            )
        )
        r.add(
            Counter(
                "freeze_proxy_frozen_seconds_total",
                "Seconds the app was frozen (from a pause's answer until a request woke it).",
                fn=lambda: self.frozen_clock.seconds(now()),
            )
        )
        self.wake_seconds = r.add(
            Histogram(
                "freeze_proxy_wake_seconds",
                "Wake latency: from the first request that found the app frozen until the "
                "resume released it (one observation per wake).",
                WAKE_BUCKETS,
            )
        )
        self.wakes = WakeTimer(self.wake_seconds)
        for name, field, what in (
            (
                "freeze_proxy_probes_answered_frozen_total",
                "probes_from_last_result",
                "Probes of the app (queue-proxy's readiness, kubelet's) answered from its last "
                "result while it was not awake, without touching it.",
            ),
            (
                "freeze_proxy_probe_wakes_total",
                "probe_wakes",
                "Probes that had to resume the app (no earlier result while it was frozen).",
            ),
            (
                "freeze_proxy_requests_refused_total",
                "refused",
                "Requests answered 503 because the app could not be resumed in time.",
            ),
            (
                "freeze_proxy_head_timeouts_total",
                "head_timeouts",
                "Client connections answered 408 and closed: a request head was not complete "
                "within --header-timeout of its first byte.",
            ),
            (
                "freeze_proxy_idle_closed_total",
                "idle_closed",
                "Client connections closed after --idle-timeout without a request.",
            ),
        ):
            r.add(Counter(name, what, fn=_reader(counters, field)))
        r.add(
            Gauge(
                "freeze_proxy_client_connections",
                "Client connections the serving port holds (at --max-connections, new ones are "
                "refused).",
                fn=_reader(counters, "client_connections"),
            )
        )
        r.add(
            Counter(
                "freeze_proxy_connections_refused_total",
                "Connections answered 503 and closed because the listener already held its "
                "maximum (serving: --max-connections; health: 1024).",
                ("listener",),
                fn=lambda: {
                    ("serving",): _reader(counters, "refused_connections")(),
                    ("health",): _reader(counters, "health_refused_connections")(),
                },
            )
        )

    def render(self) -> str:
        return self.registry.render()


def _reader(counters: Callable[[], Mapping[str, int]], field: str) -> Callable[[], float]:
    return lambda: float(counters().get(field, 0))
