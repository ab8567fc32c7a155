"""The health port: ``/healthz`` (the proxy itself), ``/metrics``, and the probes of the user
container the webhook re-aims here (``contract.probe_path``, answered by ``probes.Prober``).

On a node of frozen pods this port is the proxy's only idle work: kubelet and queue-proxy open
one connection per probe, a few a minute per pod. So it is served by a plain ``asyncio.Protocol``,
like the relay: a probe of a frozen app (answered from its last result), ``/healthz`` and
``/metrics`` are answered in ``data_received`` itself, without a stream reader, writer or task;
only a probe that checks the awake app waits, in a task bounded by the probe's timeout.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, cast

from freeze_proxy import contract, http1
from freeze_proxy.metrics import CONTENT_TYPE
from freeze_proxy.probes import Probe, Prober, Verdict, probe_timeout

if TYPE_CHECKING:
    from freeze_proxy.app import FreezeProxy

# A probe sends its request at once: a connection whose head takes longer (a client holding it
# open) is answered 408 and closed, so it cannot hold a connection forever. The check of the app
# that may follow is bounded by the probe's own timeout (probes.probe_timeout).
HEALTH_TIMEOUT = 2.0
MAX_HEAD = 16384  # a probe's head is a few hundred bytes; a longer one is refused (431)
# Probers open a few connections a minute per pod, each closed after its answer: more than this
# at once is a flood, answered 503 and closed unread, so it cannot grow the proxy's memory.
MAX_CONNECTIONS = 1024
_TOO_MANY = b'{"error": "the health port holds too many connections", "cause": "max-connections"}'
_TIMEOUT_HEADER = contract.PROBE_TIMEOUT_HEADER.lower().encode()
_SERVED = (
    f"{contract.HEALTH_PATH}, {contract.METRICS_PATH}, {contract.READY_PATH}/... and "
    f"{contract.PROBE_PATH}/..."
)


class HealthPort:
    """What every connection to the health port shares."""

    def __init__(
        self,
        proxy: FreezeProxy | None,
        stopping: asyncio.Event,
        prober: Prober,
        app: tuple[str, int],
        own_ports: frozenset[int],
    ) -> None:
        self.proxy = proxy
        self.stopping = stopping
        self.prober = prober
        self.app = app
        self.own_ports = own_ports
        self.checks: set[asyncio.Task[None]] = set()  # probes waiting for a check of the app
        self.connections = 0
        self.max_connections = MAX_CONNECTIONS
        self.refused_connections = 0

    def protocol(self) -> HealthConnection:
        return HealthConnection(self)

    def close(self) -> None:
        """At shutdown: probes still waiting for a check get no answer (their connection
        closes with the loop)."""
        for task in self.checks:
            task.cancel()

    def status(self) -> dict[str, object]:
        """``/healthz``'s body: the proxy's state and counters."""
        out: dict[str, object] = {"status": "stopping" if self.stopping.is_set() else "ok"}
        if self.proxy is not None:
            out.update(
                state=self.proxy.gate.state.value,
                mode=self.proxy.mode,
                daemon=self.proxy.daemon,
                in_flight=self.proxy.gate.in_flight,
                **vars(self.proxy.counters),
            )
        out.update(probe_wakes=self.prober.wakes, probes_from_last_result=self.prober.from_last)
        return out

    def probe(self, target: str, request: http1.RequestHead, local: str | None) -> Probe | None:
        """The probe ``target`` names (None: not a probe path); 400 for a malformed one."""
        try:
            parsed = contract.parse_probe_path(target)
        except ValueError as exc:
            raise http1.HttpError(400, str(exc)) from None
        if parsed is None:
            return None
        whole_path, kind, port, app_target = parsed
        if port in self.own_ports:
            raise http1.HttpError(400, f"port {port} is freeze-proxy's own, not the app's")
        # The original probe reached the app where this one reached us: the pod's IP
        # (kubelet) or 127.0.0.1 (queue-proxy).
        host = self.app[0] if port == 0 else (local or self.app[0])
        return Probe(
            kind,
            host,
            port or self.app[1],
            app_target,
            whole_path=whole_path,
            timeout=probe_timeout(request.headers),
            headers=tuple(
                (name, value)
                for name, value in http1.end_to_end(request)
                if name.lower() != _TIMEOUT_HEADER
            ),
        )

    def verdict_response(self, verdict: Verdict) -> bytes:
        out: dict[str, object] = {"ready": verdict.ready, "cause": verdict.cause}
        if self.proxy is not None:
            out["state"] = self.proxy.gate.state.value
        return http1.json_response(verdict.status, json.dumps(out).encode())


class HealthConnection(asyncio.Protocol):
    """One connection: one request, one answer, closed."""

    __slots__ = ("_buffer", "_port", "_timer", "_transport")

    def __init__(self, port: HealthPort) -> None:
        self._port = port
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        port = self._port
        port.connections += 1
        if port.connections > port.max_connections:
            port.refused_connections += 1
            self._reply(http1.json_response(503, _TOO_MANY))
            return
        self._timer = asyncio.get_running_loop().call_later(HEALTH_TIMEOUT, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._timer is None:
            return  # answered, or answering: the rest is ignored
        self._buffer += data
        end = self._buffer.find(http1.END_OF_HEAD)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._reply(http1.json_response(431, b'{"error": "request head too large"}'))
            return
        self._timer.cancel()
        self._timer = None
        assert self._transport is not None
        self._transport.pause_reading()
        try:
            self._answer(self._buffer[:end])
        except http1.HttpError as exc:
            body = json.dumps({"error": str(exc)}).encode()
            self._reply(http1.json_response(exc.status, body))

    def _answer(self, head: bytes) -> None:
        port = self._port
        request = http1.parse_request(head)
        target = request.target.decode("latin-1")
        path = target.partition("?")[0]
        if path == contract.HEALTH_PATH:
            status = 503 if port.stopping.is_set() else 200
            self._reply(http1.json_response(status, json.dumps(port.status()).encode()))
            return
        if path == contract.METRICS_PATH:
            text = port.proxy.metrics.render() if port.proxy is not None else ""
            self._reply(http1.own_response(200, text.encode(), CONTENT_TYPE.encode()))
            return
        assert self._transport is not None
        local = self._transport.get_extra_info("sockname")
        probe = port.probe(target, request, local[0] if local else None)
        if probe is None:
            body = json.dumps({"error": f"only {_SERVED} are served"}).encode()
            self._reply(http1.json_response(404, body))
            return
        verdict = port.prober.answer_now(probe)
        if verdict is not None:
            self._reply(port.verdict_response(verdict))
            return
        task = asyncio.ensure_future(self._check(probe))
        port.checks.add(task)
        task.add_done_callback(port.checks.discard)

    async def _check(self, probe: Probe) -> None:
        verdict = await self._port.prober.check(probe)
        self._reply(self._port.verdict_response(verdict))

    def _too_slow(self) -> None:
        self._timer = None
        self._reply(http1.json_response(408, b'{"error": "no complete request in time"}'))

    def _reply(self, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(response)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._port.connections -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
