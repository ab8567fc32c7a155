"""The daemon's HTTP surface: two wire protocols onto one freeze/thaw path.

- ``POST /freeze`` and ``POST /thaw`` with header ``Token`` (the original freeze-proxy protocol);
- ``POST /`` with ``{"action": "pause" | "resume"}`` and header ``Token`` (Knative's
  container-freezer protocol, called by queue-proxy);
- ``GET /healthz``.

The pod acted on is the one the token proves (see daemon.auth); the request can only narrow the
containers of that pod (``?container=NAME``). Every answer is JSON; errors say cause and fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

from daemon.auth import Authenticator, AuthUnavailable
from daemon.claims import Identity, TokenRefused
from daemon.ordering import SEQUENCE_HEADER, CallOrder, parse_sequence
from daemon.runtimes import (
    NEVER_FROZEN,
    ContainerNotFound,
    Runtime,
    RuntimeBackendError,
)

log = logging.getLogger("daemon.api")

Action = Literal["freeze", "thaw"]
_STATE: dict[Action, str] = {"freeze": "frozen", "thaw": "thawed"}
_KNATIVE_ACTIONS: dict[str, Action] = {"pause": "freeze", "resume": "thaw"}
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ALLOWED_QUERY = frozenset({"container"})
MAX_BODY = 4096  # the only body is {"action": "..."}


class _BadRequest(Exception):
    """A malformed request: answered 400 with this message."""


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
CALL_ORDER = web.AppKey("call_order", CallOrder)


class _OutOfOrder(Exception):
    """A later call for this pod was already carried out (see daemon.ordering)."""

    def __init__(self, newer: int) -> None:
        self.newer = newer


def _error(status: int, message: str, **fields: Any) -> web.Response:
    return web.json_response({"error": message, **fields}, status=status)


def _containers(request: web.Request) -> list[str]:
    """The ``?container=`` narrowing: validated names, deduplicated, in order."""
    unknown = set(request.query) - _ALLOWED_QUERY
    if unknown:
        raise _BadRequest(
            f"unknown query parameter(s) {sorted(unknown)}: "
            "only 'container' (repeatable) is allowed"
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


def _token(request: web.Request) -> str:
    token = request.headers.get("Token", "").strip()
    if not token:
        raise _BadRequest(
            "missing Token header: send the pod's projected service-account token "
            "(audience freeze) in header 'Token'"
        )
    return token


async def _knative_action(request: web.Request) -> Action:
    raw = await request.read()
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
    started = time.perf_counter()
    try:
        if action is None:
            action = await _knative_action(request)
        token = _token(request)
        containers = _containers(request)
        try:
            sequence = parse_sequence(request.headers.get(SEQUENCE_HEADER))
        except ValueError as e:
            raise _BadRequest(str(e)) from e
    except _BadRequest as e:
        log.warning(
            "bad request", extra={"path": request.path, "error": str(e), "outcome": "bad_request"}
        )
        return _error(400, str(e))

    try:
        identity = await request.app[AUTHENTICATOR].authenticate(token)
    except TokenRefused as e:
        log.warning(
            "token refused",
            extra={
                "action": action,
                "reason": e.reason,
                "remote": request.remote,
                "outcome": "refused",
            },
        )
        return _error(403, f"token refused: {e.reason}")
    except AuthUnavailable as e:
        log.error(
            "cannot check token",
            extra={"action": action, "error": str(e), "outcome": "auth_unavailable"},
        )
        return _error(503, f"cannot check the token right now: {e}; retry later")

    runtime = request.app[RUNTIME]
    call = runtime.pause if action == "freeze" else runtime.resume
    who = _who(identity)
    runtime_started = time.perf_counter()

    async def in_order() -> list[str]:
        # Under the pod's lock, so a call overtaken while authenticating is refused here.
        if sequence is not None:
            newer = request.app[CALL_ORDER].admit(identity.pod_uid, sequence, time.monotonic())
            if newer is not None:
                raise _OutOfOrder(newer)
        return await call(identity.pod_uid, containers)

    try:
        done = await request.app[POD_LOCKS].run(identity.pod_uid, in_order)
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
    except ContainerNotFound as e:
        return _failed(404, action, who, containers, started, f"not found on this node: {e}")
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
    log.info(
        f"{_STATE[action]} pod",
        extra={
            "action": action,
            **who,
            "containers": done,
            "took_ms": took_ms,
            "runtime_ms": _ms(runtime_started),
            "outcome": _STATE[action],
        },
    )
    return web.json_response(
        {
            "pod_uid": identity.pod_uid,
            "containers": done,
            "state": _STATE[action],
            "took_ms": took_ms,
        }
    )


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
) -> web.Response:
    took_ms = _ms(started)
    outcome = "not_found" if status == 404 else "runtime_error"
    log.warning(
        f"{action} failed",
        extra={
            "action": action,
            **who,
            "containers": containers,
            "took_ms": took_ms,
            "outcome": outcome,
            "error": message,
        },
    )
    return _error(status, message, pod_uid=who["pod_uid"], containers=containers)


async def _freeze(request: web.Request) -> web.Response:
    return await _act(request, "freeze")


async def _thaw(request: web.Request) -> web.Response:
    return await _act(request, "thaw")


async def _knative(request: web.Request) -> web.Response:
    return await _act(request, None)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


_HTTP_ERRORS = {
    404: "no such endpoint: use POST /freeze, POST /thaw, POST / or GET /healthz",
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


def make_app(authenticator: Authenticator, runtime: Runtime) -> web.Application:
    """The daemon's aiohttp application; closes nothing it was given (the caller owns both)."""
    app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY)
    app[AUTHENTICATOR] = authenticator
    app[RUNTIME] = runtime
    app[POD_LOCKS] = _PodLocks()
    app[CALL_ORDER] = CallOrder()
    app.router.add_post("/freeze", _freeze)
    app.router.add_post("/thaw", _thaw)
    app.router.add_post("/", _knative)
    app.router.add_get("/healthz", _healthz)
    return app
