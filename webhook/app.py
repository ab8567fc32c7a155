"""The aiohttp application: routes, one log line per review, TLS setup and the serve loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from bounded.connections import (
    ConnectionGuard,
    ServerLimits,
    files_needed,
    guarded_runner,
    listen,
)
from freeze_proxy.addresses import parse_listen
from freeze_proxy.openfiles import fit_open_files
from webhook.admission import BadReview, Mutator, Outcome, parse_review, review_pod
from webhook.cluster_config import DEFAULT_CONFIG_MAP, ConfigWatcher, SettingsBox
from webhook.mutation import MutationSettings, mutate
from webhook.tls import CertReconciler, FileWatcher, LiveTLS

if TYPE_CHECKING:
    from webhook.cluster import KubeCluster

log = logging.getLogger("webhook")

SETTINGS_KEY = web.AppKey("settings", SettingsBox)
MUTATOR_KEY: web.AppKey[Mutator] = web.AppKey("mutator")
# The API server accepts request bodies of at most 3 MiB (and etcd stores objects of 1.5 MiB by
# default), so no AdmissionReview it sends for a pod is bigger. Parsed, a review costs up to ~15x
# its size (many small strings); an 8 MiB one added ~100 MiB RSS against the 256 Mi limit.
MAX_BODY = 3 * 1024 * 1024
# Reviews whose body is being read or processed at once; the others wait (their bodies unread,
# held back by TCP) for at most SLOT_WAIT, less than the webhook's timeoutSeconds (5 s): after
# that the API server has given up and applied the failurePolicy anyway.
DEFAULT_MAX_INFLIGHT = 4
SLOT_WAIT = 4.0
SLOTS_KEY = web.AppKey("slots", asyncio.Semaphore)
DRAINING_KEY = web.AppKey("draining", asyncio.Event)


class InFlight:
    """How many reviews are being handled, and a way to wait until there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until none is left (bound it with ``asyncio.timeout``)."""
        await self._idle.wait()


IN_FLIGHT_KEY = web.AppKey("in_flight", InFlight)


# Its clients are the API servers (Go's transport: idle connections kept 90 s), but anything in
# the cluster can reach the Service: every connection is bounded (bounded.connections).
# - idle 5 m, well above the API server's 90 s, so the API server always closes first: a server
#   closing an idle connection as a review is sent on it fails that review (a POST is not sent
#   again), and with failurePolicy Ignore the pod then runs unfrozen for good;
# - the TLS handshake, then a request head, each within 10 s (--header-timeout);
# - after an answer that leaves body unread (a 413), the rest is read and discarded for 0.5 s
#   before the close, so the client gets the answer rather than a reset (Go waits 0.5 s too);
# - 1024 connections at once (--max-connections): a new one evicts the oldest waiting one.
DEFAULT_LIMITS = ServerLimits(
    max_connections=1024, header_timeout=10.0, idle_timeout=300.0, body_timeout=0.5
)


@dataclass(frozen=True)
class WebhookSettings:
    """Everything __main__ parses; defaults are the names config/ ships."""

    proxy_image: str
    listen: str = "0.0.0.0:8443"
    tls_cert_file: str | None = None
    tls_private_key_file: str | None = None
    namespace: str = "knative-serving"
    service_name: str = "freezer-webhook"
    secret_name: str = "freezer-webhook-certs"
    webhook_config_name: str = "webhook.freeze.extensions.knative.dev"
    kubeconfig: str | None = None
    log_level: str = "INFO"
    reload_interval: float = 10.0
    extra_sans: tuple[str, ...] = ()
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    # On SIGTERM: unready but answering for drain_delay (s), then stop listening and give the
    # reviews in flight up to shutdown_timeout (s) to finish.
    drain_delay: float = 5.0
    shutdown_timeout: float = 10.0
    config_map: str = DEFAULT_CONFIG_MAP  # "" = the built-in sidecar defaults only
    config_refresh: float = 10.0
    limits: ServerLimits = DEFAULT_LIMITS
    mutation: MutationSettings = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mutation", MutationSettings(proxy_image=self.proxy_image))


def _log_outcome(outcome: Outcome) -> None:
    level = logging.WARNING if outcome.warnings else logging.INFO
    if outcome.action == "error":
        return  # admission already logged it with the traceback
    log.log(
        level,
        f"pod {outcome.action}: {outcome.reason}",
        extra={
            "pod": outcome.pod,
            "action": outcome.action,
            "reason": outcome.reason,
            "warnings": outcome.warnings,
        },
    )


async def handle_review(request: web.Request) -> web.Response:
    """POST /defaulting and /mutate: at most ``max_inflight`` bodies in memory at once."""
    in_flight = request.app[IN_FLIGHT_KEY]
    in_flight.enter()
    try:
        return await _admit(request)
    finally:
        in_flight.leave()


async def _admit(request: web.Request) -> web.Response:
    slots = request.app[SLOTS_KEY]
    try:
        async with asyncio.timeout(SLOT_WAIT):
            await slots.acquire()
    except TimeoutError:
        log.warning(
            "too many AdmissionReviews at once; refused this one (the API server applies the "
            "failurePolicy)",
            extra={"action": "503", "wait": f"{SLOT_WAIT:g}s"},
        )
        return web.json_response({"error": "busy"}, status=503)
    try:
        return await _review(request)
    finally:
        slots.release()


class TooLarge(Exception):
    """The body exceeds MAX_BODY."""


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused past ``limit`` bytes (before reading, when Content-Length says
    so). Read from the stream rather than with ``request.read()``, which keeps a copy on the
    request object for as long as the keep-alive connection lives: ~4.5 MiB retained per idle
    API-server connection after a 3 MiB review."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise TooLarge
    return bytes(body)


async def _review(request: web.Request) -> web.Response:
    try:
        raw = await read_body(request)
    except TooLarge:
        log.warning(
            "refused an AdmissionReview bigger than the API server sends",
            extra={"action": "413", "max_bytes": MAX_BODY, "length": request.content_length},
        )
        response = web.json_response(
            {"error": f"AdmissionReview bigger than {MAX_BODY} bytes"}, status=413
        )
        # The rest of the body is not read: the connection cannot carry another request, and
        # left open its handler would hold a SIGTERM for the whole shutdown timeout.
        response.force_close()
        return response
    try:
        review = parse_review(raw)
    except BadReview as err:
        log.warning("rejected bad AdmissionReview", extra={"error": str(err), "action": "400"})
        return web.json_response({"error": str(err)}, status=400)
    outcome = review_pod(review, request.app[SETTINGS_KEY].value, request.app[MUTATOR_KEY])
    _log_outcome(outcome)
    response = web.json_response(outcome.body)
    if request.app[DRAINING_KEY].is_set():
        # The API server's next review then dials anew and reaches a replica that stays.
        response.force_close()
    return response


async def handle_healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves."""
    return web.Response(text="ok")


async def handle_readyz(request: web.Request) -> web.Response:
    """Readiness: 503 once SIGTERM started the drain."""
    if request.app[DRAINING_KEY].is_set():
        return web.Response(status=503, text="draining")
    return web.Response(text="ok")


def create_app(
    settings: MutationSettings,
    mutator: Mutator = mutate,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> web.Application:
    """The routes only; TLS and the certificate loop live in ``serve``."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SLOTS_KEY] = asyncio.Semaphore(max_inflight)
    app[DRAINING_KEY] = asyncio.Event()
    app[IN_FLIGHT_KEY] = InFlight()
    app[SETTINGS_KEY] = SettingsBox(settings)
    app[MUTATOR_KEY] = mutator
    app.router.add_post("/defaulting", handle_review)
    app.router.add_post("/mutate", handle_review)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    return app


async def _kube(settings: WebhookSettings) -> KubeCluster | None:
    """The API client: required for the TLS bootstrap, optional with cert files (then only the
    ConfigMap is read through it, and without API access the built-in defaults apply)."""
    from webhook.cluster import KubeCluster

    try:
        return await asyncio.to_thread(KubeCluster.from_config, settings.kubeconfig)
    except Exception as err:
        if not (settings.tls_cert_file and settings.tls_private_key_file):
            raise
        if settings.config_map:
            log.warning(
                "no access to the API server; the ConfigMap is not read, built-in sidecar "
                "defaults apply (give --kubeconfig, or --config-map '' to silence this)",
                extra={"error": str(err)},
            )
        return None


async def _first_tls(
    settings: WebhookSettings, tls: LiveTLS, cluster: KubeCluster | None
) -> asyncio.Task[None]:
    """Load the first certificate (retrying), then return the task that keeps it fresh."""
    if settings.tls_cert_file and settings.tls_private_key_file:
        watcher = FileWatcher(
            settings.tls_cert_file, settings.tls_private_key_file, tls, settings.reload_interval
        )
        while not watcher.check():  # noqa: ASYNC110 - polling files, nothing to wait on
            await asyncio.sleep(1.0)
        return asyncio.create_task(watcher.run())
    assert cluster is not None
    reconciler = CertReconciler(
        cluster,
        tls,
        settings.namespace,
        settings.service_name,
        settings.secret_name,
        settings.webhook_config_name,
        extra_sans=settings.extra_sans,
    )
    task = asyncio.create_task(reconciler.run())
    while not tls.loaded:
        if task.done():
            task.result()
        await asyncio.sleep(0.2)
    return task


async def _start(
    settings: WebhookSettings, tls: LiveTLS, box: SettingsBox
) -> list[asyncio.Task[None]]:
    """TLS loaded and the ConfigMap read once (bounded); the tasks that keep both current."""
    needs_api = not (settings.tls_cert_file and settings.tls_private_key_file)
    cluster = await _kube(settings) if needs_api or settings.config_map else None
    tasks = [await _first_tls(settings, tls, cluster)]
    if cluster is not None and settings.config_map:
        watcher = ConfigWatcher(
            cluster, settings.namespace, settings.config_map, box, settings.config_refresh
        )
        await watcher.refresh()
        tasks.append(asyncio.create_task(watcher.run()))
    return tasks


async def serve(settings: WebhookSettings) -> None:
    """Run until SIGTERM/SIGINT."""
    host, port = parse_listen(settings.listen)
    tls = LiveTLS()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(settings.mutation, max_inflight=settings.max_inflight)
    first = asyncio.create_task(_start(settings, tls, app[SETTINGS_KEY]))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({first, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        first.cancel()
        return
    keepers = first.result()
    fit_open_files(files_needed(settings.limits))
    guard = ConnectionGuard(settings.limits)
    runner = guarded_runner(app, guard, settings.shutdown_timeout)
    await runner.setup()
    server = await listen(runner, guard, host or None, port, tls=tls.context)
    log.info(
        "freeze-webhook serving",
        extra={"listen": settings.listen, "proxy_image": settings.proxy_image},
    )
    try:
        await stopper
        # The API server keeps sending reviews here until it learns that this pod is going
        # (endpoints, kube-proxy): answer them, unready, each on a connection closed after use.
        app[DRAINING_KEY].set()
        log.info(
            "SIGTERM: draining, then stopping",
            extra={
                "drain_delay": f"{settings.drain_delay:g}s",
                "shutdown_timeout": f"{settings.shutdown_timeout:g}s",
            },
        )
        await asyncio.sleep(settings.drain_delay)
        # Stop listening, then let the reviews in flight finish (their bodies still arriving:
        # aiohttp's cleanup alone stops reading from every connection, so a review half
        # received would never complete).
        server.close()
        in_flight = app[IN_FLIGHT_KEY]
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning(
                "reviews still in flight after the shutdown timeout; closing them",
                extra={"in_flight": in_flight.count},
            )
    finally:
        for keeper in keepers:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await runner.cleanup()
        await server.wait_closed()
        log.info("freeze-webhook stopped")
