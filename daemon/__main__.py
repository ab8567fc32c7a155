"""freeze-daemon: flags and environment → settings → runtime + authenticator → aiohttp server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from freeze_proxy.extras import require_extra

require_extra("freeze-daemon", "daemon", ("grpc", "google.protobuf", "jwt", "kubernetes"))

import aiohttp
from aiohttp import web

from daemon.api import make_app
from daemon.auth import (
    ApiServerJwks,
    AuthUnavailable,
    JwksFile,
    JwtVerifier,
    KeyCache,
    KeyFetcher,
    KubeAccess,
    KubernetesTokenReview,
    PodTokenAuthenticator,
    TokenReviewer,
    connect_kubernetes,
)
from daemon.runtimes import Runtime
from freeze_proxy import jsonlog
from freeze_proxy.addresses import bind_host, parse_listen
from freeze_proxy.durations import parse_duration

log = logging.getLogger("daemon")

RUNTIMES = ("containerd",)


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is configured with, already validated."""

    host: str
    port: int
    runtime: str
    containerd_socket: str
    containerd_namespace: str
    audience: str
    jwks_file: str | None
    issuer: str | None
    token_review: bool
    review_cache_ttl: float
    kubeconfig: str | None
    log_level: str


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read flags (falling back to the environment where noted) and check they fit together."""
    parser = argparse.ArgumentParser(
        prog="freeze-daemon",
        description="Node daemon: pauses and resumes the containers of the pod whose "
        "service-account token calls it (POST /freeze, /thaw, or / with a Knative action).",
    )
    parser.add_argument(
        "--listen", metavar="HOST:PORT", default="0.0.0.0:8080", help="(default %(default)s)"
    )
    parser.add_argument(
        "--runtime",
        default=os.environ.get("RUNTIME_TYPE", "containerd"),
        help=f"container runtime: {', '.join(RUNTIMES)} [env RUNTIME_TYPE] (default %(default)s)",
    )
    parser.add_argument(
        "--containerd-socket",
        default=os.environ.get("CONTAINERD_SOCKET", "/run/containerd/containerd.sock"),
        help="containerd gRPC socket [env CONTAINERD_SOCKET] (default %(default)s)",
    )
    parser.add_argument(
        "--containerd-namespace", default="k8s.io", help="containerd namespace (default k8s.io)"
    )
    parser.add_argument(
        "--audience", default="freeze", help="token audience to accept (default %(default)s)"
    )
    parser.add_argument(
        "--jwks-file",
        metavar="PATH",
        help="verify tokens locally against this JWKS (the API server's /openid/v1/jwks); "
        "needs --issuer. Without it the keys are fetched from the API server.",
    )
    parser.add_argument(
        "--issuer",
        metavar="URL",
        help="expected token issuer (the API server's --service-account-issuer); "
        "default: from the API server's /.well-known/openid-configuration",
    )
    parser.add_argument(
        "--token-review",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="confirm each token with a (cached) TokenReview; --no-token-review needs "
        "--jwks-file and --issuer (default on)",
    )
    parser.add_argument(
        "--review-cache-ttl",
        metavar="DURATION",
        default="30s",
        help="how long a TokenReview outcome is reused (never past the token's exp); a deleted "
        "pod's token keeps working this long after its last review, plus the API server's own "
        "~10 s cache; 0 reviews every call (default %(default)s)",
    )
    parser.add_argument(
        "--kubeconfig", metavar="PATH", help="kubeconfig file (default: in-cluster config)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default %(default)s)",
    )
    args = parser.parse_args(argv)

    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        parser.error(str(e))
    try:
        review_cache_ttl = parse_duration(args.review_cache_ttl)
    except ValueError as e:
        parser.error(f"--review-cache-ttl: {e}")
    if args.runtime not in RUNTIMES:
        parser.error(
            f"unknown runtime {args.runtime!r}: supported runtimes are {', '.join(RUNTIMES)}"
        )
    if args.jwks_file and not args.issuer:
        parser.error("--jwks-file needs --issuer (the issuer the keys in that file sign as)")
    if not args.token_review and not (args.jwks_file and args.issuer):
        parser.error(
            "--no-token-review needs --jwks-file and --issuer: without TokenReview the daemon "
            "can only trust tokens it can verify locally against known keys"
        )
    return Settings(
        host=host,
        port=port,
        runtime=args.runtime,
        containerd_socket=args.containerd_socket,
        containerd_namespace=args.containerd_namespace,
        audience=args.audience,
        jwks_file=args.jwks_file,
        issuer=args.issuer,
        token_review=args.token_review,
        review_cache_ttl=review_cache_ttl,
        kubeconfig=args.kubeconfig,
        log_level=args.log_level,
    )


def make_runtime(settings: Settings) -> Runtime:
    """The configured backend, imported only when chosen (its dependencies are heavy)."""
    if settings.runtime == "containerd":
        from daemon.runtimes.containerd import ContainerdRuntime

        return ContainerdRuntime(
            settings.containerd_socket, namespace=settings.containerd_namespace
        )
    raise ValueError(f"unknown runtime {settings.runtime!r}: supported: {', '.join(RUNTIMES)}")


class StartupError(Exception):
    """The daemon cannot start as configured; the message says what to fix."""


async def build_app(settings: Settings) -> web.Application:
    """Wire keys, TokenReview and the runtime into the app; cleanup closes what was opened."""
    kube: KubeAccess | None = None
    session: aiohttp.ClientSession | None = None
    runtime: Runtime | None = None

    async def close(_: web.Application | None = None) -> None:
        if runtime is not None:
            await runtime.close()
        if session is not None:
            await session.close()
        if kube is not None:
            await kube.close()

    try:
        if settings.token_review or not settings.jwks_file:
            try:
                kube = await connect_kubernetes(settings.kubeconfig)
            except Exception as e:
                where = settings.kubeconfig or "in-cluster service account"
                raise StartupError(f"cannot load Kubernetes config ({where}): {e}") from e
        fetch: KeyFetcher
        if settings.jwks_file:
            fetch = JwksFile(settings.jwks_file)
        else:
            assert kube is not None
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=kube.ssl_context))
            fetch = ApiServerJwks(
                session, kube.server, kube.headers, discover_issuer=settings.issuer is None
            )
        keys = KeyCache(fetch, issuer=settings.issuer)
        if settings.jwks_file:
            try:
                await keys.issuer()  # a bad file stops the daemon here, not every request
            except AuthUnavailable as e:
                raise StartupError(str(e)) from e
        reviewer: TokenReviewer | None = None
        if settings.token_review:
            assert kube is not None
            reviewer = TokenReviewer(
                KubernetesTokenReview(kube.api_client),
                audience=settings.audience,
                ttl=settings.review_cache_ttl,
            )
        authenticator = PodTokenAuthenticator(
            JwtVerifier(keys, audience=settings.audience), reviewer
        )
        try:
            runtime = make_runtime(settings)
        except ImportError as e:
            raise StartupError(f"the {settings.runtime} backend cannot be loaded: {e}") from e
    except BaseException:
        await close()
        raise

    app = make_app(authenticator, runtime)

    async def warm_keys(_: web.Application) -> None:
        try:
            await keys.issuer()
        except AuthUnavailable as e:
            log.warning("service-account keys not loaded yet; will retry", extra={"error": str(e)})

    app.on_startup.append(warm_keys)
    app.on_cleanup.append(close)
    log.info(
        "freeze-daemon starting",
        extra={
            "listen": f"{settings.host}:{settings.port}",
            "runtime": settings.runtime,
            "containerd_socket": settings.containerd_socket,
            "audience": settings.audience,
            "keys": settings.jwks_file or "api-server",
            "issuer": settings.issuer or "discovered",
            "token_review": settings.token_review,
            "review_cache_ttl_s": settings.review_cache_ttl if settings.token_review else None,
        },
    )
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``freeze-daemon`` / ``python -m daemon``."""
    settings = parse_args(argv)
    jsonlog.setup("freeze-daemon", settings.log_level)
    try:
        web.run_app(
            build_app(settings),
            host=bind_host(settings.host),  # a wildcard: every address family (IPv4 and IPv6)
            port=settings.port,
            print=None,
            access_log=None,
            handle_signals=True,
        )
    except (StartupError, OSError) as e:
        log.error(f"freeze-daemon cannot start: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
