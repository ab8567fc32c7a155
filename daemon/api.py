"""The daemon's HTTP surface: two wire protocols onto one freeze/thaw path.

- ``POST /freeze`` and ``POST /thaw`` with header ``Token`` (the original freeze-proxy protocol);
- ``POST /`` with ``{"action": "pause" | "resume"}`` and header ``Token`` (Knative's
  container-freezer protocol, called by queue-proxy);
- ``GET /healthz``; ``GET /metrics`` (Prometheus, no token: see daemon.metrics).

On its way out (:func:`thaw_on_stop`) the daemon refuses new freezes and thaws every pod it
holds frozen: a frozen app whose daemon is gone could never be woken.

The pod acted on is the one the token proves (see daemon.auth); the request can only narrow the
containers of that pod (``?container=NAME``). Every answer is JSON; errors say cause and fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.auth import Authenticator, AuthUnavailable
from daemon.claims import Identity, TokenRefused, unverified_claims
from daemon.leftovers import Held, HeldFrozen
from daemon.limits import Action, Admission, LimitSettings, PodStates
from daemon.metrics import CONTENT_TYPE, DaemonMetrics, backend_name
from daemon.ordering import CallOrder, parse_sequence
from daemon.runtimes import (
    NEVER_FROZEN,
    ContainerNotFound,
    ContainersFailed,
    Runtime,
    RuntimeBackendError,
)
from daemon.runtimes.throttle import Throttler
from freeze_proxy import contract
from freeze_proxy.contract import SEQUENCE_HEADER

log = logging.getLogger("daemon.api")

_STATE: dict[Action, str] = {"freeze": "frozen", "thaw": "thawed"}
_KNATIVE_ACTIONS: dict[str, Action] = {"pause": "freeze", "resume": "thaw"}
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ALLOWED_QUERY = frozenset({"container", contract.QUERY_MODE, contract.QUERY_CPU})
MAX_BODY = 4096  # the only body is {"action": "..."}


class _BadRequest(Exception):
    """A malformed request: answered 400 with this message."""


class _BodyTimeout(Exception):
    """The body did not arrive in time: answered 408, connection closed."""


class _ClientGone(Exception):
    """The client closed the connection before its request was complete."""


class _Unchanged(Exception):
    """The pod already is in the wanted state, as this daemon set it: no runtime call."""

    def __init__(self, containers: list[str]) -> None:
        super().__init__(containers)
        self.containers = containers


class _Stopping(Exception):
    """The daemon is stopping: a freeze is refused (503), it would outlive the daemon."""


class _FreezeLimited(Exception):
    """The pod changed to frozen too often: answered 429, the pod stays thawed."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class _Tarpit:
    """A rate-limited caller waits for its 429 (until a token is due, at most ``longest``): a
    flooding loop then sends one request per wait instead of thousands a second. At most
    ``room`` callers wait at once (they hold connections); beyond that the 429 is immediate."""

    def __init__(self, longest: float, room: int = 64) -> None:
        self._room = room
        self._longest = longest
        self._waiting = 0

    async def hold(self, seconds: float) -> None:
        if self._waiting >= self._room or seconds <= 0:
            return
        self._waiting += 1
        try:
            await asyncio.sleep(min(seconds, self._longest))
        finally:
            self._waiting -= 1


class _Throttled:
    """A log line at most once per ``every`` seconds, with how many were left out meanwhile."""

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._next = 0.0
        self._skipped = 0

    def log(self, logger: logging.Logger, level: int, msg: str, **extra: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._every
        logger.log(level, msg, extra={**extra, "suppressed_since_last": self._skipped})
        self._skipped = 0


class _PodLocks:
    """One lock per pod so a pause and a resume of one pod never interleave in the runtime."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, pod_uid: str, call: Callable[[], Awaitable[list[str]]]) -> list[str]:
        lock, users = self._locks.get(pod_uid, (asyncio.Lock(), 0))
        self._locks[pod_uid] = (lock, users + 1)
        try:
            async with lock:
                return await call()
        finally:
            lock, users = self._locks[pod_uid]
            if users <= 1:
                del self._locks[pod_uid]
            else:
                self._locks[pod_uid] = (lock, users - 1)


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
RUNTIME = web.AppKey("runtime", Runtime)
POD_LOCKS = web.AppKey("pod_locks", _PodLocks)
ADMISSION = web.AppKey("admission", Admission)
POD_STATES = web.AppKey("pod_states", PodStates)
_LIMITED_LOG = web.AppKey("limited_log", _Throttled)
_TARPIT = web.AppKey("tarpit", _Tarpit)
CALL_ORDER = web.AppKey("call_order", CallOrder)
HELD_FROZEN = web.AppKey("held_frozen", HeldFrozen)
THROTTLER: web.AppKey[Throttler | None] = web.AppKey("throttler")
METRICS = web.AppKey("metrics", DaemonMetrics)
_ACTION = "freeze.action"  # the request's action once known (for the calls counter)


class Lifecycle:
    """Whether the daemon is stopping (set once, by :func:`thaw_on_stop`)."""

    stopping: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


class _OutOfOrder(Exception):
    """A later call for this pod was already carried out (see daemon.ordering)."""

    def __init__(self, newer: int) -> None:
        self.newer = newer


def _error(
    status: int, message: str, *, retry_after: float | None = None, **fields: Any
) -> web.Response:
    headers = None if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return web.json_response({"error": message, **fields}, status=status, headers=headers)


def _containers(request: web.Request) -> list[str]:
    """The ``?container=`` narrowing: validated names, deduplicated, in order."""
    unknown = set(request.query) - _ALLOWED_QUERY
    if unknown:
        raise _BadRequest(
            f"unknown query parameter(s) {sorted(unknown)}: "
            f"only 'container' (repeatable), '{contract.QUERY_MODE}' and '{contract.QUERY_CPU}' "
            "are allowed"
        )
    names: list[str] = []
    for name in request.query.getall("container", []):
        if not _DNS1123_LABEL.fullmatch(name):
            raise _BadRequest(
                f"invalid container name {name!r}: must be a DNS-1123 label "
                "(lowercase letters, digits and '-', at most 63 characters)"
            )
        if name in NEVER_FROZEN:
            raise _BadRequest(f"container {name!r} is never frozen: it keeps the pod reachable")
        if name not in names:
            names.append(name)
    return names


def _mode(request: web.Request) -> tuple[str, int]:
    """``?mode=freeze|throttle`` (default freeze) and, for throttle, ``&cpu=`` (the floor in
    millicores, default 10m): validated, so junk is a 400 naming the fix."""
    modes = request.query.getall(contract.QUERY_MODE, [contract.MODE_FREEZE])
    cpus = request.query.getall(contract.QUERY_CPU, [contract.DEFAULT_THROTTLE_CPU])
    if len(modes) > 1 or len(cpus) > 1:
        raise _BadRequest(f"'{contract.QUERY_MODE}' and '{contract.QUERY_CPU}' may appear once")
    mode = modes[0]
    if mode not in contract.DAEMON_MODES:
        raise _BadRequest(
            f"unknown mode {mode!r}: {' or '.join(contract.DAEMON_MODES)} (dry-run never calls "
            "the daemon)"
        )
    if mode == contract.MODE_FREEZE:
        if contract.QUERY_CPU in request.query:
            raise _BadRequest(f"'{contract.QUERY_CPU}' is for mode={contract.MODE_THROTTLE} only")
        return mode, 0
    if request.app.get(THROTTLER) is None:
        raise _BadRequest(
            "mode=throttle needs a CRI runtime backend: this daemon runs --runtime docker; use "
            "mode freeze on this node, or a containerd/cgroup daemon"
        )
    try:
        return mode, contract.parse_millicores(cpus[0])
    except ValueError as e:
        raise _BadRequest(str(e)) from None


def _token(request: web.Request) -> str:
    token = request.headers.get("Token", "").strip()
    if not token:
        raise _BadRequest(
            "missing Token header: send the pod's projected service-account token "
            "(audience freeze) in header 'Token'"
        )
    return token


async def _knative_action(request: web.Request) -> Action:
    try:
        async with asyncio.timeout(request.app[ADMISSION].settings.body_timeout):
            raw = await request.read()
    except TimeoutError:
        raise _BodyTimeout from None
    except ConnectionResetError:
        raise _ClientGone from None
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        body = None
    action = body.get("action") if isinstance(body, dict) else None
    if not isinstance(action, str) or action not in _KNATIVE_ACTIONS:
        raise _BadRequest('bad body: expected JSON {"action": "pause"} or {"action": "resume"}')
    return _KNATIVE_ACTIONS[action]


async def _act(request: web.Request, action: Action | None) -> web.Response:
    """The one freeze/thaw path both protocols share: validate, authenticate, call the runtime.

    ``action`` None means the Knative protocol: it is in the JSON body.
    """
    response = await _answer(request, action)
    request.app[METRICS].call(request.get(_ACTION), response.status)
    return response


async def _answer(request: web.Request, action: Action | None) -> web.Response:
    started = time.perf_counter()
    request[_ACTION] = action
    try:
        if action is None:
            action = request[_ACTION] = await _knative_action(request)
        token = _token(request)
        containers = _containers(request)
        mode, millicores = _mode(request)
        try:
            sequence = parse_sequence(request.headers.get(SEQUENCE_HEADER))
        except ValueError as e:
            raise _BadRequest(str(e)) from e
    except _BadRequest as e:
        if not request.headers.get("Token", "").strip():
            request.app[METRICS].refused("missing_token")
        log.warning(
            "bad request", extra={"path": request.path, "error": str(e), "outcome": "bad_request"}
        )
        return _error(400, str(e))
    except _BodyTimeout:
        timeout = request.app[ADMISSION].settings.body_timeout
        log.info(
            "request body too slow", extra={"remote": request.remote, "outcome": "body_timeout"}
        )
        response = _error(408, f"the request body did not arrive within {timeout:g}s")
        response.force_close()
        return response
    except _ClientGone:
        log.info(
            "client went away mid-request",
            extra={"path": request.path, "remote": request.remote, "outcome": "client_gone"},
        )
        return _error(400, "the connection closed before the request body was complete")

    if action == "freeze" and request.app[LIFECYCLE].stopping:
        return _stopping_answer(None)
    identity_or_answer = await _authenticate(request, action, token)
    if isinstance(identity_or_answer, web.Response):
        return identity_or_answer
    identity = identity_or_answer

    who = _who(identity)
    runtime_started = time.perf_counter()

    try:
        done = await _carry_out(
            request.app, action, identity.pod_uid, containers, who, sequence, mode, millicores
        )
    except _Stopping:
        return _stopping_answer(identity.pod_uid)
    except _OutOfOrder as e:
        log.warning(
            f"{action} refused: a later call for this pod was already carried out",
            extra={
                "action": action,
                **who,
                "sequence": sequence,
                "newer": e.newer,
                "outcome": "out_of_order",
            },
        )
        return _error(
            409,
            f"{action} not carried out: a later call for this pod ({SEQUENCE_HEADER} {e.newer}) "
            f"was already carried out, and this one ({sequence}) is older; nothing was changed",
            cause="out-of-order",
            pod_uid=identity.pod_uid,
            sequence=sequence,
            newer=e.newer,
        )
    except _Unchanged as unchanged:
        log.debug(
            f"pod already {_STATE[action]}", extra={"action": action, **who, "outcome": "unchanged"}
        )
        return web.json_response(
            {
                "pod_uid": identity.pod_uid,
                "containers": unchanged.containers,
                "state": _STATE[action],
                "took_ms": _ms(started),
                "unchanged": True,
            }
        )
    except _FreezeLimited as limited:
        settings = request.app[ADMISSION].settings
        request.app[_LIMITED_LOG].log(
            log, logging.WARNING, "freeze rate-limited", action=action, **who, outcome="limited"
        )
        return _error(
            429,
            f"pod {identity.pod_uid} froze too often (at most {settings.freeze_rate:g}/s, "
            f"burst {settings.freeze_burst:g}): it stays thawed; retry later",
            retry_after=limited.retry_after,
            pod_uid=identity.pod_uid,
        )
    except ContainerNotFound as e:
        return _failed(404, action, who, containers, started, f"not found on this node: {e}")
    except ContainersFailed as e:  # a list frozen all-or-none, thawed best effort
        return _failed(
            502,
            action,
            who,
            containers,
            started,
            f"the container runtime failed: {e}",
            container=e.container,
            failed=e.failed,
            **({"thawed_back": e.thawed_back} if action == "freeze" else {}),
            **({"not_thawed_back": e.not_thawed_back} if e.not_thawed_back else {}),
        )
    except RuntimeBackendError as e:  # RuntimeFailure, or any other backend error
        return _failed(502, action, who, containers, started, f"the container runtime failed: {e}")
    except Exception as e:
        log.exception("runtime raised unexpectedly", extra={"action": action, **who})
        return _failed(
            502,
            action,
            who,
            containers,
            started,
            f"the container runtime failed unexpectedly: {type(e).__name__}: {e}",
        )
    if not done:
        # Never 200 when nothing happened.
        return _failed(404, action, who, containers, started, "no container of this pod to act on")
    took_ms = _ms(started)
    state = _state(action, mode)
    log.info(
        f"{state} pod",
        extra={
            "action": action,
            "mode": mode,
            **who,
            "containers": done,
            "took_ms": took_ms,
            "runtime_ms": _ms(runtime_started),
            "outcome": state,
        },
    )
    return web.json_response(
        {
            "pod_uid": identity.pod_uid,
            "containers": done,
            "state": state,
            **({"mode": mode} if mode != contract.MODE_FREEZE else {}),
            "took_ms": took_ms,
        }
    )


def _state(action: Action, mode: str) -> str:
    if mode == contract.MODE_THROTTLE:
        return "throttled" if action == "freeze" else "restored"
    return _STATE[action]


async def _authenticate(
    request: web.Request, action: Action, token: str
) -> Identity | web.Response:
    """The pod the token proves, or the answer to give (403, 429, 503).

    Tokens that never authenticated here are first admitted by the refusal limiter (see
    daemon.limits.Admission), so a flood of bad tokens costs a cheap 429, not a verification.
    """
    admission = request.app[ADMISSION]
    source = request.remote or "unknown"
    claimed_pod, expires_at = unverified_claims(token.strip().removeprefix("Bearer ").strip())
    ticket = admission.admit(
        hashlib.sha256(token.encode()).digest(), source, claimed_pod, time.time()
    )
    if not ticket.allowed:
        request.app[METRICS].refused("rate_limited")
        request.app[_LIMITED_LOG].log(
            log, logging.WARNING, "refused tokens rate-limited", remote=source, outcome="limited"
        )
        await request.app[_TARPIT].hold(ticket.retry_after)
        return _error(
            429,
            f"too many refused tokens from {source}: at most "
            f"{admission.settings.refusal_rate:g}/s; retry later",
            retry_after=ticket.retry_after,
        )
    try:
        identity = await request.app[AUTHENTICATOR].authenticate(token, thaw=action == "thaw")
    except TokenRefused as e:
        request.app[METRICS].refused("refused")
        log.warning(
            "token refused",
            extra={"action": action, "reason": e.reason, "remote": source, "outcome": "refused"},
        )
        return _error(403, f"token refused: {e.reason}")
    except AuthUnavailable as e:
        request.app[METRICS].refused("unavailable")
        admission.unavailable(ticket, time.time())
        log.error(
            "cannot check token",
            extra={"action": action, "error": str(e), "outcome": "auth_unavailable"},
        )
        return _error(503, f"cannot check the token right now: {e.cause}; retry later")
    if expires_at is not None:
        admission.authenticated(ticket, identity.pod_uid, expires_at, time.time())
    return identity


def _stopping_answer(pod_uid: str | None) -> web.Response:
    log.info(
        "freeze refused: the daemon is stopping",
        extra={"action": "freeze", "pod_uid": pod_uid, "outcome": "stopping"},
    )
    return _error(
        503,
        "freeze not carried out: this freeze-daemon is stopping (it thaws what it froze on its "
        "way out); the app stays awake; retry later, a new daemon may be starting",
        cause="stopping",
        pod_uid=pod_uid,
    )


async def _carry_out(
    app: web.Application,
    action: Action,
    pod_uid: str,
    containers: list[str],
    who: dict[str, Any],
    sequence: int | None,
    mode: str = contract.MODE_FREEZE,
    millicores: int = 0,
) -> list[str]:
    """The runtime call for one pod, under that pod's lock (see :func:`_apply`); in throttle
    mode the Throttler's (daemon/runtimes/throttle.py) instead of the runtime's."""
    runtime = app[RUNTIME]
    call: Callable[[str, list[str]], Awaitable[list[str]]]
    call = runtime.pause if action == "freeze" else runtime.resume
    if mode == contract.MODE_THROTTLE:
        throttler = app[THROTTLER]
        assert throttler is not None  # _mode refused the call otherwise
        verb = throttler.throttle if action == "freeze" else throttler.restore

        async def throttle_call(pod: str, names: list[str]) -> list[str]:
            return await verb(pod, names, millicores)

        call = throttle_call

    return await app[POD_LOCKS].run(
        pod_uid, lambda: _apply(app, action, pod_uid, containers, call, sequence, who, mode)
    )


async def _apply(
    app: web.Application,
    action: Action,
    pod_uid: str,
    containers: list[str],
    call: Callable[[str, list[str]], Awaitable[list[str]]],
    sequence: int | None,
    who: dict[str, Any],
    mode: str = contract.MODE_FREEZE,
) -> list[str]:
    """Under the pod's lock: refuse a freeze once the daemon is stopping (checked here, so none
    slips in behind the stop's thaw of this pod), refuse a call a later one overtook (while it
    authenticated, say), skip what is already so, limit freezes, call the runtime, and remember
    the state only when the call fully succeeded; a freeze marks the pod held frozen before it
    starts, a successful thaw clears it. Throttle mode keeps its own record of what it holds
    (the Throttler) and is never a no-op: each call asks the runtime."""
    if action == "freeze" and app[LIFECYCLE].stopping:
        raise _Stopping
    if sequence is not None:
        newer = app[CALL_ORDER].admit(pod_uid, sequence, time.monotonic())
        if newer is not None:
            raise _OutOfOrder(newer)
    states = app[POD_STATES]
    throttle = mode == contract.MODE_THROTTLE
    unchanged = None if throttle else states.noop(pod_uid, containers, action)
    if unchanged is not None:
        raise _Unchanged(unchanged)
    if action == "freeze":
        allowed, retry_after = app[ADMISSION].may_freeze(pod_uid, time.time())
        if not allowed:
            raise _FreezeLimited(retry_after)
    states.forget(pod_uid)  # until the call returns, the state is unknown
    if action == "freeze" and not throttle:
        app[HELD_FROZEN].freezing(pod_uid, who, containers)  # even a failed freeze may freeze
    started = time.perf_counter()
    try:
        done = await call(pod_uid, containers)
    finally:
        app[METRICS].runtime_call(action, time.perf_counter() - started)
    if done and not throttle:
        states.record(pod_uid, containers, action, done)
        if action == "thaw":
            app[HELD_FROZEN].thawed(pod_uid, containers)
    return done


# How long the stop may spend thawing, in total: the DaemonSet's terminationGracePeriodSeconds
# (config/400-daemon-containerd.yaml) covers it plus the drain of calls in flight.
STOP_THAW_BUDGET = 5.0


async def thaw_on_stop(app: web.Application, budget: float = STOP_THAW_BUDGET) -> dict[str, str]:
    """Refuse freezes from now on, then thaw every pod this daemon holds frozen — through the
    runtime and the pods' locks, as a proxy's thaw would — for at most ``budget`` seconds in
    all. Logs each pod; returns pod UID -> outcome (``stop_thawed``, ``stop_thaw_not_found``,
    ``stop_thaw_failed``, ``stop_thaw_timeout``)."""
    app[LIFECYCLE].stopping = True
    held = app[HELD_FROZEN].pods()
    outcomes: dict[str, str] = {}

    async def thaw(pod: Held) -> None:
        who = {"pod_uid": pod.pod_uid, **pod.who}
        started = time.perf_counter()
        try:
            for narrowing in pod.narrowings:
                with contextlib.suppress(_Unchanged):  # already thawed, as this daemon set it
                    await _carry_out(app, "thaw", pod.pod_uid, list(narrowing), dict(pod.who), None)
        except ContainerNotFound as e:
            outcomes[pod.pod_uid] = "stop_thaw_not_found"
            log.info(
                "stopping: pod held frozen is gone from this node",
                extra={**who, "outcome": "stop_thaw_not_found", "error": str(e)},
            )
        except Exception as e:
            outcomes[pod.pod_uid] = "stop_thaw_failed"
            log.error(
                "stopping: cannot thaw a pod this daemon froze; it stays frozen until a daemon "
                "starts on this node again (it thaws what it finds paused in our pods)",
                extra={**who, "outcome": "stop_thaw_failed", "error": f"{type(e).__name__}: {e}"},
            )
        else:
            outcomes[pod.pod_uid] = "stop_thawed"
            log.info(
                "stopping: thawed a pod this daemon froze",
                extra={**who, "outcome": "stop_thawed", "took_ms": _ms(started)},
            )

    throttler = app[THROTTLER]
    throttled = [] if throttler is None else throttler.held_pods()

    async def restore(pod_uid: str) -> None:
        assert throttler is not None
        try:
            await app[POD_LOCKS].run(pod_uid, lambda: throttler.restore_pod(pod_uid))
        except ContainerNotFound:
            outcomes.setdefault(pod_uid, "stop_restored")  # restored meanwhile by its proxy
        except Exception as e:
            outcomes[pod_uid] = "stop_restore_failed"
            log.error(
                "stopping: cannot restore the CPU limits of a pod this daemon throttled; a "
                "daemon starting on this node restores them",
                extra={"pod_uid": pod_uid, "outcome": "stop_restore_failed", "error": str(e)},
            )
        else:
            outcomes.setdefault(pod_uid, "stop_restored")
            log.info(
                "stopping: restored the CPU limits of a pod this daemon throttled",
                extra={"pod_uid": pod_uid, "outcome": "stop_restored"},
            )

    log.info(
        "stopping: freezes are refused; thawing the pods held frozen",
        extra={"pods": len(held), "throttled_pods": len(throttled)},
    )
    try:
        async with asyncio.timeout(budget):
            await asyncio.gather(*(thaw(pod) for pod in held), *(restore(uid) for uid in throttled))
    except TimeoutError:
        for uid in throttled:
            outcomes.setdefault(uid, "stop_restore_timeout")
        for pod in held:
            if pod.pod_uid not in outcomes:
                outcomes[pod.pod_uid] = "stop_thaw_timeout"
                log.error(
                    f"stopping: thawing took over {budget:g} s in all: this pod may stay frozen "
                    "until a daemon starts on this node again",
                    extra={"pod_uid": pod.pod_uid, **pod.who, "outcome": "stop_thaw_timeout"},
                )
    return outcomes


def _who(identity: Identity) -> dict[str, Any]:
    return {
        "pod_uid": identity.pod_uid,
        "pod_name": identity.pod_name,
        "namespace": identity.namespace,
    }


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _failed(
    status: int,
    action: Action,
    who: dict[str, Any],
    containers: list[str],
    started: float,
    message: str,
    **fields: Any,
) -> web.Response:
    """Log and answer a failed call; ``fields`` (which container failed...) go into both."""
    took_ms = _ms(started)
    outcome = "not_found" if status == 404 else "runtime_error"
    log.log(
        logging.ERROR if fields.get("not_thawed_back") else logging.WARNING,
        f"{action} failed",
        extra={
            "action": action,
            **who,
            "containers": containers,
            "took_ms": took_ms,
            "outcome": outcome,
            "error": message,
            **fields,
        },
    )
    return _error(status, message, pod_uid=who["pod_uid"], containers=containers, **fields)


async def _freeze(request: web.Request) -> web.Response:
    return await _act(request, "freeze")


async def _thaw(request: web.Request) -> web.Response:
    return await _act(request, "thaw")


async def _knative(request: web.Request) -> web.Response:
    return await _act(request, None)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


_HTTP_ERRORS = {
    404: "no such endpoint: use POST /freeze, POST /thaw, POST /, GET /healthz or GET /metrics",
    413: f"request body too large (max {MAX_BODY} bytes)",
}


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Routing errors (404, 405, 413) as JSON too, so every answer has one shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status == 405 and isinstance(e, web.HTTPMethodNotAllowed):
            allowed = sorted(e.allowed_methods)
            return _error(
                405,
                f"method {request.method} not allowed on {request.path}: use {', '.join(allowed)}",
                allowed=allowed,
            )
        if e.status < 400:
            raise
        return _error(e.status, _HTTP_ERRORS.get(e.status, e.reason))


def make_app(
    authenticator: Authenticator,
    runtime: Runtime,
    limits: LimitSettings | None = None,
    throttler: Throttler | None = None,
) -> web.Application:
    """The daemon's aiohttp application; closes nothing it was given (the caller owns them).
    Without a ``throttler``, ``mode=throttle`` is refused (400)."""
    app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY)
    app[AUTHENTICATOR] = authenticator
    app[RUNTIME] = runtime
    app[POD_LOCKS] = _PodLocks()
    app[ADMISSION] = Admission(limits or LimitSettings())
    app[POD_STATES] = PodStates()
    app[_LIMITED_LOG] = _Throttled()
    app[_TARPIT] = _Tarpit(app[ADMISSION].settings.refusal_delay)
    app[CALL_ORDER] = CallOrder()
    app[HELD_FROZEN] = HeldFrozen()
    app[THROTTLER] = throttler
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = DaemonMetrics(backend_name(runtime))
    app.router.add_post("/freeze", _freeze)
    app.router.add_post("/thaw", _thaw)
    app.router.add_post("/", _knative)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
