"""Wires the gate, the relay and the daemon client into the running proxy.

The gate decides; this module carries its decisions out: it runs pause/resume calls as tasks,
keeps the single idle timer, parks requests that must wait for a resume and releases (or refuses)
them, and handles start-up (pause only once the app accepts connections) and SIGTERM (resume,
stop accepting, drain).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from freeze_proxy import contract
from freeze_proxy import relay as relay_limits
from freeze_proxy.addresses import bind_host, host_port, parse_listen
from freeze_proxy.daemon_client import (
    DaemonError,
    DryRunClient,
    FreezeClient,
    HttpDaemonClient,
    TokenFile,
)
from freeze_proxy.durations import parse_duration
from freeze_proxy.gate import AppState, Decision, Gate, PauseOutcome, ResumeOutcome
from freeze_proxy.health import HealthPort
from freeze_proxy.marker import FrozenMarker
from freeze_proxy.metrics import ProxyMetrics
from freeze_proxy.probes import Prober
from freeze_proxy.relay import Admission, AlwaysAwake, Relay, Wakeup

log = logging.getLogger("freeze_proxy")


@dataclass
class Settings:
    # The command line's defaults (freeze_proxy/contract.py), so Settings() is the proxy the
    # webhook injects.
    listen: str = f"0.0.0.0:{contract.PROXY_PORT}"
    health_listen: str = f"0.0.0.0:{contract.HEALTH_PORT}"
    upstream: str = contract.DEFAULT_UPSTREAM
    daemon_url: str = f"http://127.0.0.1:{contract.DAEMON_PORT}"
    token_file: str = contract.TOKEN_FILE
    state_file: str = contract.STATE_FILE
    containers: list[str] = field(default_factory=list)
    grace: float = parse_duration(contract.DEFAULT_GRACE)
    resume_timeout: float = parse_duration(contract.DEFAULT_RESUME_TIMEOUT)
    drain_timeout: float = parse_duration(contract.DEFAULT_DRAIN_TIMEOUT)
    freeze: bool = True  # False: a plain proxy (benchmarks, and a kill switch)
    mode: str = contract.MODE_FREEZE  # freeze, throttle or dry-run (contract.MODES)
    throttle_cpu: str = contract.DEFAULT_THROTTLE_CPU  # throttle mode's floor
    header_timeout: float = relay_limits.HEADER_TIMEOUT  # README, "Timeouts and limits"
    idle_timeout: float = relay_limits.IDLE_TIMEOUT
    max_connections: int = relay_limits.MAX_CONNECTIONS


@dataclass
class Counters:
    pauses: int = 0
    resumes: int = 0
    pause_failures: int = 0
    resume_failures: int = 0
    refused: int = 0
    # --mode dry-run: what the gate decided, not carried out (pauses/resumes stay 0).
    would_pause: int = 0
    would_resume: int = 0


class FreezeProxy:
    """Carries out the gate's decisions around every relayed request (it is the relay's
    ``Admission``)."""

    def __init__(
        self,
        gate: Gate,
        client: FreezeClient,
        resume_timeout: float,
        marker: FrozenMarker,
        daemon_url: str = "the daemon",
        *,
        mode: str = contract.MODE_FREEZE,
    ) -> None:
        self.gate = gate
        self.mode = mode
        self._dry_run = mode == contract.MODE_DRY_RUN
        self._daemon_url = daemon_url
        self._marker = marker
        self.counters = Counters()
        self._client = client
        self._resume_timeout = resume_timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._wakeup: Wakeup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # "unknown" until the first call; "unreachable" while no daemon takes our connections.
        self.daemon = "unknown"
        # Called as a pause starts: the relay drops its pooled app connections, which the
        # frozen app's keep-alive timers would close just as we sent on them after a resume.
        self.on_pause: Callable[[], None] = lambda: None
        self.metrics = ProxyMetrics(
            now=self._loop.time,
            in_flight=lambda: self.gate.in_flight,
            state=lambda: self.gate.state.value,
            states=[s.value for s in AppState],
            counters=lambda: vars(self.counters) | self.component_counts(),
        )
        # What the prober, the relay and the health port count, for /metrics: serve() wires it.
        self.component_counts: Callable[[], dict[str, int]] = dict

    def arrive(self) -> Wakeup | None:
        """Count one more piece of work in flight; pair it with exactly one ``depart()``.

        None: the app is awake, go ahead. Otherwise wait on the returned wakeup; its ``ok``
        then says whether the resume worked.
        """
        decision = self.gate.arrive(self._loop.time())
        wakeup = None
        if not self.gate.may_forward:
            wakeup = self._wakeup = self._wakeup or Wakeup()
            self.metrics.wakes.waiting(self._loop.time())
        self._apply(decision)
        return wakeup

    def depart(self) -> None:
        self._apply(self.gate.depart(self._loop.time()))

    def refused(self) -> None:
        self.counters.refused += 1

    # -- carrying out decisions -------------------------------------------------------------

    def _apply(self, d: Decision) -> None:
        self.metrics.frozen_clock.saw(self.gate.state is AppState.FROZEN, self._loop.time())
        if d.release or d.fail:
            wakeup, self._wakeup = self._wakeup, None
            if wakeup is not None:
                self.metrics.wakes.released(d.release, self._loop.time())
                wakeup.ok = d.release
                wakeup.event.set()
        if d.timer_at is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(d.timer_at, self._on_timer)
        if d.pause:
            self._spawn(self._pause())
        if d.resume:
            self._spawn(self._resume())

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.gate.timer(self._loop.time()))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self) -> None:
        started = time.perf_counter()
        self.on_pause()
        try:
            self._marker.set()
        except OSError as exc:
            self.counters.pause_failures += 1
            self.metrics.pauses.inc(result="state_file_error")
            log.error(
                "cannot write the frozen marker, so the app is not paused (a crash would leave "
                "it frozen unknown to us); check the freeze-proxy-state volume",
                extra={"path": self._marker.path, "err": str(exc)},
            )
            self._apply(self.gate.pause_done(PauseOutcome.NOT_FROZEN, self._loop.time()))
            return
        if self._dry_run:
            self.counters.would_pause += 1
            self.metrics.pauses.inc(result="dry_run")
            log.info("would pause (dry run: the daemon is not called)")
            self._apply(self.gate.pause_done(PauseOutcome.FROZEN, self._loop.time()))
            return
        try:
            await self._client.pause()
            outcome = PauseOutcome.FROZEN
            self._reached()
            self.counters.pauses += 1
            self.metrics.pauses.inc(result="ok")
            log.info("app paused", extra={"took_ms": _ms_since(started)})
        except DaemonError as exc:
            self.counters.pause_failures += 1
            if exc.sent:
                self.metrics.pauses.inc(result="unknown")
                outcome = PauseOutcome.MAYBE_FROZEN
                self._reached()
                log.warning(
                    "pause outcome unknown: the next request resumes the app first; the pause "
                    "is retried",
                    extra={"err": str(exc)},
                )
            else:
                outcome = PauseOutcome.NOT_FROZEN
                self.metrics.pauses.inc(result="unreachable" if exc.unreachable else "refused")
                if exc.unreachable:
                    self._unreachable(exc)
                else:
                    self._reached()
                    log.warning(
                        "pause failed; the app stays awake and it is retried",
                        extra={"err": str(exc), "status": exc.status},
                    )
        self._apply(self.gate.pause_done(outcome, self._loop.time()))
        if self.gate.state is AppState.AWAKE:
            self._marker.clear()  # nothing froze it: a restarted proxy need not resume first

    def _reached(self) -> None:
        if self.daemon == "unreachable":
            log.info("the freeze-daemon is reachable again: the app is paused when idle")
        self.daemon = "reachable"

    def _unreachable(self, exc: DaemonError) -> None:
        """No daemon takes the connection: said once, not at every retry."""
        if self.daemon != "unreachable":
            log.warning(
                "the freeze-daemon is unreachable, so the app stays awake (unfrozen) and the "
                "pause is retried with backoff; on a node without the DaemonSet (not labelled "
                "knative.dev/container-runtime=containerd) that is expected, else check the "
                "freeze-daemon pod on this node and --daemon-url",
                extra={"err": str(exc)},
            )
        else:
            log.debug("the freeze-daemon is still unreachable", extra={"err": str(exc)})
        self.daemon = "unreachable"

    async def _resume(self) -> None:
        started = time.perf_counter()
        if self._dry_run:
            self._marker.clear()
            self.counters.would_resume += 1
            self.metrics.resumes.inc(result="dry_run")
            self._apply(self.gate.resume_done(ResumeOutcome.RESUMED, self._loop.time()))
            log.info("would resume (dry run: the daemon is not called)")
            return
        try:
            await self._client.resume(self._resume_timeout)
        except DaemonError as exc:
            self.counters.resume_failures += 1
            self.metrics.resumes.inc(result="unreachable" if exc.unreachable else "failed")
            if exc.unreachable:
                # No daemon took a connection for the whole budget: none is left that could
                # hold the app frozen (a stopping daemon thaws what it froze, a starting one
                # what a dead one left paused). Forward, and pause again only once a daemon
                # answers a pause (refused pauses leave the app awake, as on a node without one).
                self.daemon = "unreachable"
                self._marker.clear()
                self._apply(self.gate.resume_done(ResumeOutcome.DAEMON_GONE, self._loop.time()))
                log.warning(
                    f"daemon unreachable at {self._daemon_url}: freeze-proxy was uninstalled "
                    "from this node or its daemon is down; forwarding unfrozen",
                    extra={"err": str(exc)},
                )
                return
            self._apply(self.gate.resume_done(ResumeOutcome.NOT_RESUMED, self._loop.time()))
            log.error("resume failed; waiting requests get 503", extra={"err": str(exc)})
            return
        took_ms = _ms_since(started)
        self._reached()
        self._marker.clear()
        self.counters.resumes += 1
        self.metrics.resumes.inc(result="ok")
        self._apply(self.gate.resume_done(ResumeOutcome.RESUMED, self._loop.time()))  # release...
        log.info("app resumed", extra={"took_ms": took_ms})  # ...then take time to log it

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """The app accepts connections: an idle app may now be paused."""
        self._apply(self.gate.start(self._loop.time()))

    async def stop(self) -> None:
        """Resume the app if frozen and wait for pending calls; it is never paused again."""
        self._apply(self.gate.stop())
        if self._timer is not None:
            self._timer.cancel()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.gate.state is not AppState.AWAKE:
            log.error(
                "the app may still be frozen at shutdown", extra={"state": self.gate.state.value}
            )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def upstream_address(upstream: str) -> tuple[str, int]:
    """The app's host and port, from ``--upstream``."""
    parts = urlsplit(upstream)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


async def wait_for_app(upstream: str, poll: float = 0.05) -> None:
    """Return once the app accepts TCP connections (never freeze an app that is starting)."""
    host, port = upstream_address(upstream)
    last_log = 0.0
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError as exc:
            now = time.monotonic()
            if now - last_log > 10:
                log.info(
                    "waiting for the app to accept connections",
                    extra={"upstream": upstream, "err": str(exc)},
                )
                last_log = now
            await asyncio.sleep(poll)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    proxy: FreezeProxy | None = None
    admission: Admission = AlwaysAwake()
    token = TokenFile(settings.token_file)
    client: HttpDaemonClient | DryRunClient
    if settings.mode == contract.MODE_DRY_RUN:
        client = DryRunClient()
    else:
        client = HttpDaemonClient(
            settings.daemon_url,
            token,
            settings.containers,
            mode=settings.mode,
            throttle_cpu=settings.throttle_cpu,
        )
    if settings.freeze:
        marker = FrozenMarker(settings.state_file)
        left_frozen = marker.may_be_frozen()
        if left_frozen:
            log.info(
                "the app may have been left frozen (by an earlier instance, or no state dir to "
                "tell): the first request resumes it",
                extra={"state_file": settings.state_file, "state_dir_usable": marker.usable},
            )
        gate = Gate(settings.grace, may_be_frozen=left_frozen)
        admission = proxy = FreezeProxy(
            gate,
            client,
            settings.resume_timeout,
            marker,
            daemon_url=settings.daemon_url,
            mode=settings.mode,
        )

    relay = Relay(
        *upstream_address(settings.upstream),
        admission,
        wait_timeout=settings.resume_timeout + 5,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
        max_connections=settings.max_connections,
    )
    if proxy is not None:
        proxy.on_pause = relay.drop_idle
    stopping = asyncio.Event()
    # A wildcard host listens on every address family the pod has (IPv4, and IPv6 where it has
    # it); asyncio skips a family the kernel lacks.
    host, port = parse_listen(settings.listen)
    server = await loop.create_server(
        relay.protocol, bind_host(host), port, reuse_address=True, backlog=1024
    )
    app_address = upstream_address(settings.upstream)
    prober = Prober(
        admission,
        lambda: proxy.gate.state if proxy is not None else None,
        stopping.is_set,
        server.is_serving,
    )
    host, health_port = parse_listen(settings.health_listen, "--health-listen")
    own = frozenset({port, health_port})
    health_answers = HealthPort(proxy, stopping, prober, app_address, own)
    if proxy is not None:
        proxy.component_counts = lambda: {
            "probe_wakes": prober.wakes,
            "probes_from_last_result": prober.from_last,
            "client_connections": len(relay.downstreams),
            "head_timeouts": relay.head_timeouts,
            "idle_closed": relay.idle_closed,
            "refused_connections": relay.refused_connections,
            "health_refused_connections": health_answers.refused_connections,
        }
    health = await loop.create_server(
        health_answers.protocol, bind_host(host), health_port, reuse_address=True
    )
    log.info(
        "listening",
        extra={
            "listen": settings.listen,
            "addresses": [host_port(*s.getsockname()[:2]) for s in server.sockets],
            "upstream": settings.upstream,
            "daemon_url": settings.daemon_url if settings.freeze else None,
            "grace_s": settings.grace,
            "mode": settings.mode if settings.freeze else None,
            "containers": settings.containers or "all",
        },
    )

    async def arm() -> None:
        await wait_for_app(settings.upstream)
        prober.saw_accept(app_address[1])
        log.info("the app accepts connections", extra={"upstream": settings.upstream})
        await token.wait_ready()
        assert proxy is not None
        proxy.start()
        await token.keep_fresh()

    armer = asyncio.ensure_future(arm()) if proxy is not None else None
    try:
        await stop.wait()
    finally:
        log.info("shutting down: resuming the app, then draining")
        stopping.set()
        if armer is not None:
            armer.cancel()
        if proxy is not None:
            await proxy.stop()
        server.close()  # stop accepting; then let in-flight requests finish (drain_timeout)
        await relay.drain(settings.drain_timeout)
        health.close()
        health_answers.close()
        await client.close()
        log.info("stopped")
