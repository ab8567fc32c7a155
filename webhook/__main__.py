"""freeze-webhook: flags and env -> WebhookSettings -> serve (nothing else lives here)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from freeze_proxy.extras import require_extra

require_extra("freeze-webhook", "webhook", ("kubernetes", "cryptography"))

from freeze_proxy import jsonlog
from freeze_proxy.addresses import parse_listen
from freeze_proxy.durations import format_duration, parse_duration
from webhook.app import DEFAULT_LIMITS, DEFAULT_MAX_INFLIGHT, WebhookSettings, serve
from webhook.certs import san_entry
from webhook.cluster_config import DEFAULT_CONFIG_MAP


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: list[str] | None = None) -> WebhookSettings:
    """Flags win over env; --proxy-image is required one way or the other."""
    p = argparse.ArgumentParser(
        prog="freeze-webhook",
        description="Admission webhook that injects freeze-proxy into Knative revision pods.",
    )
    p.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT for HTTPS")
    p.add_argument("--tls-cert-file", default=None, help="serve this cert (reloaded on change)")
    p.add_argument("--tls-private-key-file", default=None, help="key for --tls-cert-file")
    p.add_argument(
        "--proxy-image",
        default=os.environ.get("FREEZE_PROXY_IMAGE"),
        help="freeze-proxy image to inject [env FREEZE_PROXY_IMAGE]",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("SYSTEM_NAMESPACE", "knative-serving"),
        help="namespace of the Service/Secret [env SYSTEM_NAMESPACE]",
    )
    p.add_argument("--service-name", default="freezer-webhook")
    p.add_argument("--secret-name", default="freezer-webhook-certs")
    p.add_argument("--webhook-config-name", default="webhook.freeze.extensions.knative.dev")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster service account")
    p.add_argument(
        "--extra-san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="also put this DNS name or IP address on the bootstrapped serving certificate "
        "(repeatable; e.g. when the API server reaches the webhook by clientConfig.url)",
    )
    p.add_argument(
        "--max-inflight-reviews",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        metavar="N",
        help="AdmissionReviews read and processed at once (each up to 3 MiB, ~15x that parsed); "
        "the others wait up to 4s, then get 503",
    )
    p.add_argument(
        "--drain-delay",
        type=_duration,
        default="5s",
        help="on SIGTERM, keep answering (unready, closing each connection after use) this long "
        "while the API server learns that the pod is going; then stop listening",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_duration,
        default="10s",
        help="after the drain delay, how long the reviews in flight may take to finish",
    )
    p.add_argument(
        "--config-map",
        default=DEFAULT_CONFIG_MAP,
        help="ConfigMap (in --namespace) with the cluster's sidecar defaults: resources, grace, "
        "timeouts; '' = the built-in defaults only",
    )
    p.add_argument(
        "--config-refresh",
        type=_duration,
        default="10s",
        help="how often the ConfigMap is read again (admission never waits for it)",
    )
    limits = DEFAULT_LIMITS
    p.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        metavar="N",
        help="client connections at once; a new one evicts the oldest waiting one",
    )
    p.add_argument(
        "--header-timeout",
        type=_duration,
        default=format_duration(limits.header_timeout),
        help="a TLS handshake, and a request head from its first byte, must end within this",
    )
    p.add_argument(
        "--idle-timeout",
        type=_duration,
        default=format_duration(limits.idle_timeout),
        help="an idle kept-alive connection is closed after this (keep it above the API "
        "server's 90s)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--reload-interval", type=float, default=10.0, help="seconds between cert-file checks"
    )
    args = p.parse_args(argv)
    if not args.proxy_image:
        p.error("--proxy-image (or env FREEZE_PROXY_IMAGE) is required")
    if args.max_inflight_reviews < 1:
        p.error("--max-inflight-reviews must be at least 1")
    if args.max_connections < 1:
        p.error("--max-connections must be at least 1")
    for name in ("header_timeout", "idle_timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        p.error("--tls-cert-file and --tls-private-key-file go together")
    try:
        parse_listen(args.listen)
    except ValueError as err:
        p.error(str(err))
    if args.extra_san and args.tls_cert_file:
        p.error("--extra-san applies to the bootstrapped certificate, not to --tls-cert-file")
    for name in args.extra_san:
        try:
            san_entry(name)
        except ValueError as err:
            p.error(f"--extra-san: {err}")
    return WebhookSettings(
        proxy_image=args.proxy_image,
        listen=args.listen,
        tls_cert_file=args.tls_cert_file,
        tls_private_key_file=args.tls_private_key_file,
        namespace=args.namespace,
        service_name=args.service_name,
        secret_name=args.secret_name,
        webhook_config_name=args.webhook_config_name,
        kubeconfig=args.kubeconfig,
        log_level=args.log_level,
        reload_interval=args.reload_interval,
        extra_sans=tuple(args.extra_san),
        max_inflight=args.max_inflight_reviews,
        drain_delay=args.drain_delay,
        shutdown_timeout=args.shutdown_timeout,
        config_map=args.config_map,
        config_refresh=args.config_refresh,
        limits=dataclasses.replace(
            limits,
            max_connections=args.max_connections,
            header_timeout=args.header_timeout,
            idle_timeout=args.idle_timeout,
        ),
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    jsonlog.setup("freeze-webhook", settings.log_level)
    asyncio.run(serve(settings))
    sys.exit(0)


if __name__ == "__main__":
    main()
