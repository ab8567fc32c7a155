"""freeze-daemon: flags and environment → settings → runtime + authenticator → aiohttp server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from freeze_proxy.extras import require_extra

require_extra(
    "freeze-daemon", "daemon", ("grpc", "google.protobuf", "jwt", "kubernetes", "prometheus_client")
)

import aiohttp
from aiohttp import web

from bounded.connections import ServerLimits, files_needed
from daemon.api import METRICS, RUNTIME, THROTTLER, make_app, thaw_on_stop
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
from daemon.lifecycle import thaw_left_frozen
from daemon.limits import LimitSettings
from daemon.runtimes import Runtime
from daemon.runtimes.throttle import Throttler, restore_left_throttled
from daemon.server import serve
from freeze_proxy import jsonlog
from freeze_proxy.addresses import bind_host, parse_listen
from freeze_proxy.durations import format_duration, parse_duration
from freeze_proxy.openfiles import fit_open_files

log = logging.getLogger("daemon")

RUNTIMES = ("containerd", "docker", "cgroup")
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"


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
    review_refusal_ttl: float = 2.0
    outage_thaw_grace: float = 300.0
    docker_socket: str = DEFAULT_DOCKER_SOCKET
    limits: LimitSettings = field(default_factory=LimitSettings)
    server: ServerLimits = field(default_factory=ServerLimits)
    cri_socket: str = "/run/containerd/containerd.sock"  # --runtime cgroup: any CRI runtime's
    cgroup_root: str = "/sys/fs/cgroup"


def _env_default(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _number(kind: Callable[[str], float], minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, not {text}")
        return value

    return parse


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _timeout(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text!r}")
    return seconds


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The flags bounding what a caller may cost (documented in README, 'freeze-daemon')."""
    limits, server = LimitSettings(), ServerLimits()
    group = parser.add_argument_group(
        "limits", "what one caller may cost the daemon (every pod of the node can reach it)"
    )

    def flag(name: str, env: str, default: str, parse: Callable[[str], Any], text: str) -> None:
        group.add_argument(
            name,
            type=parse,
            default=_env_default(env, default),  # argparse applies ``type`` to it
            metavar=env.removeprefix("FREEZE_DAEMON_"),
            help=f"{text} [env {env}] (default {default})",
        )

    count, rate, burst = _number(int, 1), _number(float, 0), _number(float, 1)
    flag("--max-connections", "FREEZE_DAEMON_MAX_CONNECTIONS", str(server.max_connections),
         count, "open connections at most; at the limit a new one evicts the oldest idle or "
         "still-sending one (RLIMIT_NOFILE is raised to fit)")  # fmt: skip
    flag("--header-timeout", "FREEZE_DAEMON_HEADER_TIMEOUT", f"{server.header_timeout:g}s",
         _timeout, "a request head must be complete this soon after its first byte")  # fmt: skip
    flag("--body-timeout", "FREEZE_DAEMON_BODY_TIMEOUT", f"{server.body_timeout:g}s",
         _timeout, "a request body must be complete this soon (else 408)")  # fmt: skip
    flag("--idle-timeout", "FREEZE_DAEMON_IDLE_TIMEOUT", f"{server.idle_timeout:g}s",
         _timeout, "an idle keep-alive connection is closed after this long")  # fmt: skip
    flag("--refusal-rate", "FREEZE_DAEMON_REFUSAL_RATE", f"{limits.refusal_rate:g}", rate,
         "refused tokens per second per source address (per claimed pod once that pod "
         "authenticated); beyond it unknown tokens get 429 unverified; known tokens are never "
         "limited; 0: no limit")  # fmt: skip
    flag("--refusal-burst", "FREEZE_DAEMON_REFUSAL_BURST", f"{limits.refusal_burst:g}", burst,
         "refused tokens a source may send at once before --refusal-rate applies")  # fmt: skip
    flag("--refusal-delay", "FREEZE_DAEMON_REFUSAL_DELAY", f"{limits.refusal_delay:g}s",
         _duration, "a caller over --refusal-rate waits up to this long for its 429 (at most "
         "64 at once): a flooding loop slows to one request per wait; 0: at once")  # fmt: skip
    flag("--freeze-rate", "FREEZE_DAEMON_FREEZE_RATE", f"{limits.freeze_rate:g}", rate,
         "freezes that change a pod's state, per second per pod; beyond it 429 and the pod "
         "stays thawed; thaws are never limited; 0: no limit")  # fmt: skip
    flag("--freeze-burst", "FREEZE_DAEMON_FREEZE_BURST", f"{limits.freeze_burst:g}", burst,
         "freezes a pod may make at once before --freeze-rate applies")  # fmt: skip


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
        "--cri-socket",
        default=os.environ.get("CRI_SOCKET", "/run/containerd/containerd.sock"),
        help="--runtime cgroup: the CRI runtime's socket (CRI-O: /var/run/crio/crio.sock) "
        "[env CRI_SOCKET] (default %(default)s)",
    )
    parser.add_argument(
        "--cgroup-root",
        default="/sys/fs/cgroup",
        help="--runtime cgroup: where the host's cgroup hierarchy is mounted (default %(default)s)",
    )
    parser.add_argument(
        "--containerd-namespace", default="k8s.io", help="containerd namespace (default k8s.io)"
    )
    parser.add_argument(
        "--docker-socket",
        default=os.environ.get("DOCKER_SOCKET", DEFAULT_DOCKER_SOCKET),
        help="Docker Engine API socket, for --runtime docker [env DOCKER_SOCKET] "
        "(default %(default)s)",
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
        "--review-refusal-ttl",
        metavar="DURATION",
        type=_duration,
        default=_env_default("FREEZE_DAEMON_REVIEW_REFUSAL_TTL", "2s"),
        help="how long a TokenReview denial is reused (short: the API server also denies on "
        "transient failures) [env FREEZE_DAEMON_REVIEW_REFUSAL_TTL] (default 2s)",
    )
    parser.add_argument(
        "--outage-thaw-grace",
        metavar="DURATION",
        type=_duration,
        default=_env_default("FREEZE_DAEMON_OUTAGE_THAW_GRACE", "5m"),
        help="while TokenReview is unavailable, thaw on a locally verified token (signature, "
        "issuer, audience, expiry, pod claims) for this long into the outage; freezing always "
        "needs a review; 0 turns it off [env FREEZE_DAEMON_OUTAGE_THAW_GRACE] (default 5m)",
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
    _add_limit_flags(parser)
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
        review_refusal_ttl=args.review_refusal_ttl,
        outage_thaw_grace=args.outage_thaw_grace,
        docker_socket=args.docker_socket,
        limits=LimitSettings(
            refusal_rate=args.refusal_rate,
            refusal_burst=args.refusal_burst,
            freeze_rate=args.freeze_rate,
            freeze_burst=args.freeze_burst,
            body_timeout=args.body_timeout,
            refusal_delay=args.refusal_delay,
        ),
        server=ServerLimits(
            max_connections=args.max_connections,
            header_timeout=args.header_timeout,
            idle_timeout=args.idle_timeout,
            body_timeout=args.body_timeout,
        ),
        cri_socket=args.cri_socket,
        cgroup_root=args.cgroup_root,
    )


def make_runtime(settings: Settings) -> Runtime:
    """The configured backend, imported only when chosen (its dependencies are heavy)."""
    if settings.runtime == "containerd":
        from daemon.runtimes.containerd import ContainerdRuntime

        return ContainerdRuntime(
            settings.containerd_socket, namespace=settings.containerd_namespace
        )
    if settings.runtime == "cgroup":
        from daemon.runtimes.cgroup import CgroupRuntime

        return CgroupRuntime(settings.cri_socket, cgroup_root=settings.cgroup_root)
    if settings.runtime == "docker":
        from daemon.runtimes.docker import DockerRuntime

        return DockerRuntime(settings.docker_socket)
    raise ValueError(f"unknown runtime {settings.runtime!r}: supported: {', '.join(RUNTIMES)}")


def make_throttler(settings: Settings) -> Throttler | None:
    """Throttle mode's CRI client on the backend's CRI socket; None for docker (no CRI)."""
    if settings.runtime == "docker":
        return None
    from daemon.runtimes.cri import CriLookup

    if settings.runtime == "containerd":
        socket, flag = settings.containerd_socket, "--containerd-socket"
    else:
        socket, flag = settings.cri_socket, "--cri-socket"
    return Throttler(CriLookup(socket, runtime=settings.runtime, socket_flag=flag))


class StartupError(Exception):
    """The daemon cannot start as configured; the message says what to fix."""


async def build_app(settings: Settings) -> web.Application:
    """Wire keys, TokenReview and the runtime into the app; cleanup closes what was opened."""
    kube: KubeAccess | None = None
    session: aiohttp.ClientSession | None = None
    runtime: Runtime | None = None
    throttler: Throttler | None = None

    async def close(_: web.Application | None = None) -> None:
        if runtime is not None:
            await runtime.close()
        if throttler is not None:
            await throttler.close()
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
                refusal_ttl=settings.review_refusal_ttl,
            )
        authenticator = PodTokenAuthenticator(
            JwtVerifier(keys, audience=settings.audience),
            reviewer,
            outage_thaw_grace=settings.outage_thaw_grace,
        )
        try:
            runtime = make_runtime(settings)
            throttler = make_throttler(settings)
        except (ImportError, ValueError) as e:  # ValueError: e.g. no cgroup freezer found
            raise StartupError(f"the {settings.runtime} backend cannot be loaded: {e}") from e
    except BaseException:
        await close()
        raise

    app = make_app(authenticator, runtime, settings.limits, throttler)
    app[METRICS].count_key_fetches(lambda: (keys.fetches, keys.failed_fetches))
    if reviewer is not None:
        made = reviewer
        app[METRICS].count_reviews(lambda: (made.answered_calls, made.failed_calls))

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
            **(
                {"cri_socket": settings.cri_socket, "cgroup_root": settings.cgroup_root}
                if settings.runtime == "cgroup"
                else {}
            ),
            "docker_socket": settings.docker_socket if settings.runtime == "docker" else None,
            "audience": settings.audience,
            "keys": settings.jwks_file or "api-server",
            "issuer": settings.issuer or "discovered",
            "token_review": settings.token_review,
            "review_cache_ttl_s": settings.review_cache_ttl if settings.token_review else None,
            "outage_thaw_grace": format_duration(settings.outage_thaw_grace)
            if settings.token_review
            else None,
            "max_connections": settings.server.max_connections,
            "header_timeout": format_duration(settings.server.header_timeout),
            "body_timeout": format_duration(settings.server.body_timeout),
            "idle_timeout": format_duration(settings.server.idle_timeout),
            "refusal_rate": settings.limits.refusal_rate,
            "freeze_rate": settings.limits.freeze_rate,
        },
    )
    return app


async def run(settings: Settings) -> None:
    """Build the app, thaw what a dead predecessor left paused, serve until SIGTERM/SIGINT,
    then thaw what this daemon froze before exiting."""
    app = await build_app(settings)
    await thaw_left_frozen(app[RUNTIME])
    if (throttler := app[THROTTLER]) is not None:
        await restore_left_throttled(throttler)
    # A wildcard host listens on every address family (IPv4, and IPv6 where the node has it).
    await serve(
        app,
        [bind_host(settings.host)],
        settings.port,
        settings.server,
        on_stop=lambda: thaw_on_stop(app),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``freeze-daemon`` / ``python -m daemon``."""
    settings = parse_args(argv)
    jsonlog.setup("freeze-daemon", settings.log_level)
    fit_open_files(files_needed(settings.server))
    try:
        asyncio.run(run(settings))
    except (StartupError, OSError) as e:
        log.error(f"freeze-daemon cannot start: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
