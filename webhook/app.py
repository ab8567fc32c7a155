"""The aiohttp application: routes, one log line per review, TLS setup and the serve loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

from aiohttp import web

from freeze_proxy.addresses import parse_listen
from webhook.admission import BadReview, Mutator, Outcome, parse_review, review_pod
from webhook.mutation import MutationSettings, mutate
from webhook.tls import CertReconciler, FileWatcher, LiveTLS

log = logging.getLogger("webhook")

SETTINGS_KEY = web.AppKey("settings", MutationSettings)
MUTATOR_KEY: web.AppKey[Mutator] = web.AppKey("mutator")
MAX_BODY = 8 * 1024 * 1024  # pods with big env/config still fit; the API server caps at 3 MiB


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
    """POST /defaulting and /mutate."""
    raw = await request.read()
    try:
        review = parse_review(raw)
    except BadReview as err:
        log.warning("rejected bad AdmissionReview", extra={"error": str(err), "action": "400"})
        return web.json_response({"error": str(err)}, status=400)
    outcome = review_pod(review, request.app[SETTINGS_KEY], request.app[MUTATOR_KEY])
    _log_outcome(outcome)
    return web.json_response(outcome.body)


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(settings: MutationSettings, mutator: Mutator = mutate) -> web.Application:
    """The routes only; TLS and the certificate loop live in ``serve``."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS_KEY] = settings
    app[MUTATOR_KEY] = mutator
    app.router.add_post("/defaulting", handle_review)
    app.router.add_post("/mutate", handle_review)
    app.router.add_get("/healthz", handle_healthz)
    return app


async def _first_tls(settings: WebhookSettings, tls: LiveTLS) -> asyncio.Task[None]:
    """Load the first certificate (retrying), then return the task that keeps it fresh."""
    if settings.tls_cert_file and settings.tls_private_key_file:
        watcher = FileWatcher(
            settings.tls_cert_file, settings.tls_private_key_file, tls, settings.reload_interval
        )
        while not watcher.check():  # noqa: ASYNC110 - polling files, nothing to wait on
            await asyncio.sleep(1.0)
        return asyncio.create_task(watcher.run())
    from webhook.cluster import KubeCluster

    cluster = await asyncio.to_thread(KubeCluster.from_config, settings.kubeconfig)
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


async def serve(settings: WebhookSettings) -> None:
    """Run until SIGTERM/SIGINT."""
    host, port = parse_listen(settings.listen)
    tls = LiveTLS()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    first = asyncio.create_task(_first_tls(settings, tls))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({first, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        first.cancel()
        return
    keeper = first.result()
    runner = web.AppRunner(create_app(settings.mutation), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context)
    await site.start()
    log.info(
        "freeze-webhook serving",
        extra={"listen": settings.listen, "proxy_image": settings.proxy_image},
    )
    try:
        await stopper
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await runner.cleanup()
        log.info("freeze-webhook stopped")
