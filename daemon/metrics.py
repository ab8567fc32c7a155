"""The daemon's ``GET /metrics`` (prometheus_client, one registry per app so tests and apps
never share series). Labels are bounded sets: no pod names or UIDs, whoever can reach the port
learns nothing about the node's pods."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from daemon.limits import Action

# ``*_created`` series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The proxies' names for the two calls (Knative's protocol), whichever protocol asked.
ACTION_LABEL: dict[Action, str] = {"freeze": "pause", "thaw": "resume"}

# Pause/resume through containerd's Tasks API takes 2-10 ms (README, bench), Docker's more.
RUNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REFUSAL_REASONS = ("missing_token", "refused", "rate_limited", "unavailable")


class _TokenReviews(Collector):
    """TokenReviews made, read from the reviewer when scraped (it already counts them)."""

    def __init__(self, made: Callable[[], tuple[int, int]]) -> None:
        self._made = made

    def collect(self) -> Iterable[CounterMetricFamily]:
        answered, failed = self._made()
        family = CounterMetricFamily(
            "freeze_daemon_token_reviews",
            "TokenReviews sent to the API server (cache misses), by result (answered: the "
            "API server said yes or no; failed: no answer, the caller got 503 or an outage thaw).",
            labels=("result",),
        )
        family.add_metric(("answered",), answered)
        family.add_metric(("failed",), failed)
        yield family


class _KeyFetches(Collector):
    """Service-account key-set fetches (JWKS file reads or API server GETs), read when scraped:
    an unknown ``kid`` may trigger one, at most once per refetch interval, so a flood of random
    key ids shows here as a flat line, not as API server load."""

    def __init__(self, made: Callable[[], tuple[int, int]]) -> None:
        self._made = made

    def collect(self) -> Iterable[CounterMetricFamily]:
        total, failed = self._made()
        family = CounterMetricFamily(
            "freeze_daemon_jwks_fetches",
            "Service-account key-set fetches (at start, then on an unknown key id at most once "
            "per 10 s; from the API server each is a discovery and a JWKS GET), by result.",
            labels=("result",),
        )
        family.add_metric(("ok",), total - failed)
        family.add_metric(("failed",), failed)
        yield family


class DaemonMetrics:
    """The daemon's metrics (names in README, "Metrics")."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "freeze_daemon_calls",
            "Calls answered, by action (pause, resume; unknown: unreadable) and HTTP status.",
            ("action", "status"),
            registry=self.registry,
        )
        self.runtime_seconds = Histogram(
            "freeze_daemon_runtime_call_seconds",
            "Time of the container runtime's pause/resume of one pod (lookup included), by "
            "backend and action, failures included.",
            ("backend", "action"),
            buckets=RUNTIME_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "freeze_daemon_auth_refusals",
            "Calls refused before reaching the runtime, by reason (missing_token: 400; "
            "refused: 403, the token proves no pod; rate_limited: 429 from the refusal limiter; "
            "unavailable: 503, keys or TokenReview unavailable).",
            ("reason",),
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)
        for action in ACTION_LABEL.values():
            self.runtime_seconds.labels(backend=backend, action=action)
        self._reviews: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.registry.register(_TokenReviews(lambda: self._reviews()))
        self._key_fetches: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.registry.register(_KeyFetches(lambda: self._key_fetches()))
        ProcessCollector(registry=self.registry)

    def count_reviews(self, made: Callable[[], tuple[int, int]]) -> None:
        """Where TokenReviews are counted: (answered, failed)."""
        self._reviews = made

    def count_key_fetches(self, made: Callable[[], tuple[int, int]]) -> None:
        """Where key-set fetches are counted: (started, failed)."""
        self._key_fetches = made

    def call(self, action: Action | None, status: int) -> None:
        self.calls.labels(
            action=ACTION_LABEL[action] if action else "unknown", status=str(status)
        ).inc()

    def runtime_call(self, action: Action, seconds: float) -> None:
        self.runtime_seconds.labels(backend=self.backend, action=ACTION_LABEL[action]).observe(
            seconds
        )

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def backend_name(runtime: object) -> str:
    """``ContainerdRuntime`` -> ``containerd``: the label without asking the backend."""
    return type(runtime).__name__.removesuffix("Runtime").lower() or "unknown"
