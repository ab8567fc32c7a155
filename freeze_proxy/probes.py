"""Probes of the user container, answered on the health port without waking a frozen app.

Every probe Knative or the kubelet aims at the user container — queue-proxy's
``SERVING_READINESS_PROBE``, kubelet's liveness and startup probes, ``tcpSocket`` or ``httpGet``
— is re-aimed by the webhook at a path of ours (``contract.probe_path``). While the app is
awake, the proxy checks the app as the original probe would (a TCP connect, or a GET whose
status 200-399 passes), bounded by the probe's own timeout, and remembers the result. While it
is frozen, or a pause or resume is in flight, it answers that last result without touching the
app: the app cannot change while frozen, and a probe of a frozen app would otherwise time out
(a GET is never answered; a TCP connect is completed by the kernel and then waits in the app's
accept queue until the queue is full and every TCP probe fails).

A check of the app is one more piece of work in flight for the gate (``Admission.arrive``), so
the app is never paused while a probe is on its way to it, and never probed while frozen. When
there is no earlier result for a probe (the first probe of its kind arrives while the app is
frozen: a proxy restarted beside a frozen app, or a liveness probe whose first run comes after
the first pause), the check wakes the app like a request, once; from then on there is one.

queue-proxy's probes (``READY_PATH``) also require freeze-proxy itself to serve: queue-proxy
turns Ready on them, and the activator then sends the first request through us. kubelet's
(``PROBE_PATH``) do not: a liveness probe must not restart the app because its proxy restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from freeze_proxy import contract, http1
from freeze_proxy.gate import AppState
from freeze_proxy.relay import Admission

log = logging.getLogger("freeze_proxy.probes")

# kubelet's default (and smallest) timeoutSeconds; a probe without our timeout header gets it.
DEFAULT_TIMEOUT = 1.0
# Results kept, one per probe target: the webhook writes a handful per pod; a client inventing
# paths only evicts the oldest (whose next probe while frozen then wakes the app once).
MAX_RESULTS = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool
    cause: str

    @property
    def status(self) -> int:
        return 200 if self.ready else 503


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe as it reached the health port: what to check, where, and how long it may take.

    ``host``: the address the probe was sent to (the pod's IP for kubelet, 127.0.0.1 for
    queue-proxy), where the original probe would have reached the app. ``target``: the httpGet
    request target. ``headers``: the prober's headers, passed on to the app.
    """

    kind: str
    host: str
    port: int
    target: str = ""
    whole_path: bool = False
    timeout: float = DEFAULT_TIMEOUT
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def key(self) -> tuple[str, int, str]:
        # Not the host: queue-proxy's TCP check (127.0.0.1) and kubelet's (the pod's IP) of one
        # port agree, and the proxy's start-up connect counts for both.
        return self.kind, self.port, self.target

    def describe(self) -> str:
        if self.kind == contract.PROBE_TCP:
            return f"TCP connect to port {self.port}"
        return f"GET {self.target} on port {self.port}"


def decide(
    *,
    whole_path: bool,
    stopping: bool,
    serving: bool,
    state: AppState | None,
    last: Verdict | None,
    started: bool = True,
) -> Verdict | None:
    """The answer when it needs no check of the app; None: check the app now (through the
    gate, which wakes it first if it is not awake).

    ``state``: the gate's (None without freezing); ``last``: this probe's last result (None:
    never checked); ``started``: the proxy's start-up check has seen the app accept a
    connection (before that, an app a dead proxy may have left frozen is not resumed for a
    probe: the app is starting, or the resume would only fail until it listens).
    """
    if whole_path and stopping:
        return Verdict(False, "freeze-proxy is shutting down")
    if whole_path and not serving:
        return Verdict(False, "freeze-proxy does not listen on its serving port")
    if state is None or state is AppState.AWAKE:
        return None
    if last is None:
        if started:
            return None
        return Verdict(False, f"the app is {state.value} and has not accepted a connection yet")
    return Verdict(last.ready, f"the app is {state.value}; its last check: {last.cause}")


async def tcp_check(probe: Probe) -> Verdict:
    """Connect and close at once, as kubelet's tcpSocket probe does."""
    host, port, timeout = probe.host, probe.port, probe.timeout
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()  # at once: nothing is sent
        return Verdict(True, f"the app accepts connections on port {port}")
    except TimeoutError:
        return Verdict(False, f"no connection to port {port} within {timeout:g} s")
    except OSError as exc:
        why = exc.strerror or str(exc)
        return Verdict(False, f"the app does not accept connections on port {port}: {why}")


def probe_request(probe: Probe) -> bytes:
    """The GET the original probe would have sent the app: its target and headers (Host named
    the health port: it names the app's port now), ``Connection: close``."""
    headers = []
    for name, value in probe.headers:
        if name.lower() == b"host":
            host, colon, port = value.rpartition(b":")
            if colon and port.isdigit() and b"]" not in port:
                value = host + b":" + str(probe.port).encode()
        headers.append((name, value))
    if not any(name.lower() == b"host" for name, _ in headers):
        headers.insert(0, (b"host", f"{probe.host}:{probe.port}".encode()))
    start = b"GET " + probe.target.encode("latin-1") + b" HTTP/1.1"
    return http1.serialize(start, headers, b"connection: close\r\n")


async def http_check(probe: Probe) -> Verdict:
    """GET the probe's target on the app; 200-399 passes (kubelet's and queue-proxy's rule).
    Redirects are not followed: a 3xx passes."""
    what = f"GET {probe.target} on port {probe.port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(probe.timeout):
            reader, writer = await asyncio.open_connection(probe.host, probe.port)
            writer.write(probe_request(probe))
            line = await reader.readuntil(b"\r\n")
    except TimeoutError:
        return Verdict(False, f"the app did not answer {what} within {probe.timeout:g} s")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Verdict(False, f"the app did not answer {what}: {why}")
    finally:
        if writer is not None:
            writer.close()
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/") or not code.isdigit():
        return Verdict(False, f"the app answered {what} with no status line: {line[:60]!r}")
    if 200 <= int(code) < 400:
        return Verdict(True, f"the app answered {what} {int(code)}")
    return Verdict(False, f"the app answered {what} {int(code)}")


class Prober:
    """Answers probes from the running proxy: ``decide``, else one check of the app at a time
    per probe target, admitted through the gate, its result kept for ``decide``."""

    def __init__(
        self,
        admission: Admission,
        state: Callable[[], AppState | None],
        stopping: Callable[[], bool],
        serving: Callable[[], bool],
    ) -> None:
        self._admission = admission
        self._state = state
        self._stopping = stopping
        self._serving = serving
        self._last: dict[tuple[str, int, str], Verdict] = {}
        self._pending: dict[tuple[str, int, str], asyncio.Future[Verdict]] = {}
        self.wakes = 0  # checks that had to resume the app (no earlier result while frozen)
        self.from_last = 0  # probes answered from the last result, the app untouched
        self._started = False  # the start-up check saw the app accept a connection

    def last(self, probe: Probe) -> Verdict | None:
        return self._last.get(probe.key)

    def record(self, key: tuple[str, int, str], verdict: Verdict) -> None:
        self._last.pop(key, None)
        self._last[key] = verdict
        while len(self._last) > MAX_RESULTS:
            del self._last[next(iter(self._last))]

    def saw_accept(self, port: int) -> None:
        """The app accepted a connection on ``port`` (the proxy's own start-up check)."""
        self._started = True
        self.record((contract.PROBE_TCP, port, ""), Verdict(True, "the app accepts connections"))

    async def answer(self, probe: Probe) -> Verdict:
        """``answer_now``, else ``check``."""
        verdict = self.answer_now(probe)
        return verdict if verdict is not None else await self.check(probe)

    def answer_now(self, probe: Probe) -> Verdict | None:
        """The answer when it needs no check of the app (``decide``); None: ``check`` it."""
        decided = decide(
            whole_path=probe.whole_path,
            stopping=self._stopping(),
            serving=self._serving(),
            state=self._state(),
            last=self.last(probe),
            started=self._started,
        )
        if decided is not None and self._state() not in (None, AppState.AWAKE):
            if self.last(probe) is not None:
                self.from_last += 1
        return decided

    async def check(self, probe: Probe) -> Verdict:
        """Check the app (one check at a time per probe target), bounded by the probe's
        timeout; the check itself goes on (holding the gate) if this prober gives up, and its
        result is kept."""
        pending = self._pending.get(probe.key)
        if pending is None:
            pending = self._pending[probe.key] = asyncio.ensure_future(self._check(probe))
            pending.add_done_callback(self._forget)
        try:
            async with asyncio.timeout(probe.timeout):
                return await asyncio.shield(pending)
        except TimeoutError:
            return Verdict(False, f"no answer to the {probe.describe()} within {probe.timeout:g} s")

    def _forget(self, done: asyncio.Future[Verdict]) -> None:
        for key, pending in list(self._pending.items()):
            if pending is done:
                del self._pending[key]

    async def _check(self, probe: Probe) -> Verdict:
        """The real check, as one piece of work in flight: the app is not paused before it
        ends, and it starts only once the app is awake. Bounded: at most the probe's timeout
        waiting for a resume, and as much for the check itself."""
        wakeup = self._admission.arrive()
        try:
            if wakeup is not None:
                self.wakes += 1
                log.info(
                    "no earlier result for this probe while the app is frozen: resuming it "
                    "to check",
                    extra={"probe": probe.describe()},
                )
                try:
                    async with asyncio.timeout(probe.timeout):
                        await wakeup.event.wait()
                except TimeoutError:
                    return Verdict(False, f"the app was not resumed within {probe.timeout:g} s")
                if not wakeup.ok:
                    return Verdict(False, "the app could not be resumed to check it")
            if probe.kind == contract.PROBE_TCP:
                verdict = await tcp_check(probe)
            else:
                verdict = await http_check(probe)
            self.record(probe.key, verdict)
            return verdict
        finally:
            self._admission.depart()


def probe_timeout(headers: list[tuple[bytes, bytes]]) -> float:
    """The probe's timeoutSeconds from ``PROBE_TIMEOUT_HEADER`` (DEFAULT_TIMEOUT without it),
    within (0, PROBE_TIMEOUT_MAX]."""
    wanted = contract.PROBE_TIMEOUT_HEADER.lower().encode()
    for name, value in headers:
        if name.lower() == wanted:
            try:
                seconds = float(value)
            except ValueError:
                return DEFAULT_TIMEOUT
            if seconds > 0:
                return min(seconds, float(contract.PROBE_TIMEOUT_MAX))
    return DEFAULT_TIMEOUT
