"""Is the whole request path ready? What queue-proxy asks on ``READY_PATH`` (the health port).

queue-proxy turns Ready (and the activator forwards a cold start's first request) when its
``SERVING_READINESS_PROBE`` passes. Knative's default is a TCP probe of the app's port, which
says nothing about freeze-proxy, a process starting in parallel: queue-proxy then dials our
port, still closed, and answers 502. So the webhook aims that probe here, and this says ready
only when the proxy listens on its serving port and the app accepts TCP connections.

The app is not connected to while it is frozen, or a pause or resume is in flight: the kernel
would complete the handshake for a frozen app and leave the connection in its accept queue (see
``backlog.py``). Then the answer is the app's last result: the gate pauses an app only after it
accepted connections, and the first request resumes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from freeze_proxy.gate import AppState

# A connection to a listening app on the same pod's loopback takes well under a millisecond; a
# refused one fails at once. Only a full accept queue (the kernel drops the SYN) makes it wait:
# then the app is not ready either. kubelet's shortest probe timeout is 1 s.
CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool
    cause: str

    @property
    def status(self) -> int:
        return 200 if self.ready else 503


def decide(
    *, stopping: bool, serving: bool, state: AppState | None, app_accepted: bool | None
) -> Verdict | None:
    """The verdict when it needs no connection to the app; None: connect to it now.

    ``state``: the gate's (None without freezing); ``app_accepted``: the app's last result
    (None: never tried).
    """
    if stopping:
        return Verdict(False, "freeze-proxy is shutting down")
    if not serving:
        return Verdict(False, "freeze-proxy does not listen on its serving port")
    if state is None or state is AppState.AWAKE:
        return None
    if app_accepted:
        return Verdict(True, f"the app is {state.value}; it accepted connections before")
    return Verdict(False, f"the app is {state.value} and has not accepted a connection yet")


class AppProbe:
    """Connects to the app's port, once at a time however many probes ask, and keeps the last
    result for ``decide``."""

    def __init__(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.accepted: bool | None = None
        self.error = ""
        self._pending: asyncio.Future[None] | None = None

    def saw_accept(self) -> None:
        """The app accepted a connection (the proxy's own start-up check)."""
        self.accepted, self.error = True, ""

    async def check(self) -> Verdict:
        if self._pending is None:
            pending = self._pending = asyncio.ensure_future(self._connect())
            pending.add_done_callback(lambda _: self._forget(pending))
        await asyncio.shield(self._pending)
        if self.accepted:
            return Verdict(True, "the app accepts connections")
        why = f"the app does not accept connections on port {self.port}: {self.error}"
        return Verdict(False, why)

    def _forget(self, pending: asyncio.Future[None]) -> None:
        if self._pending is pending:
            self._pending = None

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()  # at once: nothing is sent
            self.saw_accept()
        except TimeoutError:
            self.accepted, self.error = False, f"no connection within {self.timeout:g} s"
        except OSError as exc:
            self.accepted, self.error = False, exc.strerror or str(exc)


class Readiness:
    """``decide`` fed from the running proxy, connecting through ``AppProbe`` when it says so."""

    def __init__(
        self,
        app: AppProbe,
        stopping: Callable[[], bool],
        serving: Callable[[], bool],
        state: Callable[[], AppState | None],
    ) -> None:
        self.app = app
        self._stopping = stopping
        self._serving = serving
        self._state = state

    async def verdict(self) -> Verdict:
        decided = decide(
            stopping=self._stopping(),
            serving=self._serving(),
            state=self._state(),
            app_accepted=self.app.accepted,
        )
        return decided if decided is not None else await self.app.check()
