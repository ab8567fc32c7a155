"""``freeze-proxy``: flags and environment → Settings → run. Nothing else lives here."""

from __future__ import annotations

import sys
from types import ModuleType

uvloop: ModuleType | None
try:
    import uvloop  # the `fast` extra: more throughput under heavy load, +6.7 MiB RSS
except ImportError:
    uvloop = None
    # The proxy never speaks TLS, and asyncio imports ssl only if it can: not loading OpenSSL
    # keeps ~4.6 MiB out of every pod's sidecar (README, "Performance"). Before asyncio!
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import argparse
import asyncio
import os

from freeze_proxy import contract, jsonlog, relay
from freeze_proxy.addresses import host_port, parse_listen
from freeze_proxy.app import Settings, serve
from freeze_proxy.durations import format_duration, parse_duration
from freeze_proxy.openfiles import fit_open_files

DEFAULT_GRACE = contract.DEFAULT_GRACE  # README, "Idle grace"


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, like 10s (got {text!r})")
    return seconds


def _connections(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {text!r})")
    return n


def _millicores(text: str) -> str:
    try:
        contract.parse_millicores(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.strip()


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    host_ip = env.get(contract.ENV_HOST_IP, "127.0.0.1")
    p = argparse.ArgumentParser(
        prog="freeze-proxy",
        description="Reverse proxy that freezes the app when no request is in flight "
        "and resumes it before forwarding the next one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        contract.FLAG_LISTEN,
        default=f"0.0.0.0:{contract.PROXY_PORT}",
        help="address for app traffic",
    )
    p.add_argument(
        contract.FLAG_HEALTH_LISTEN,
        default=f"0.0.0.0:{contract.HEALTH_PORT}",
        help=f"address serving GET {contract.HEALTH_PATH} and the probes of the app "
        f"({contract.READY_PATH}/..., {contract.PROBE_PATH}/...)",
    )
    p.add_argument(contract.FLAG_UPSTREAM, default=contract.DEFAULT_UPSTREAM, help="the app's URL")
    p.add_argument(
        "--daemon-url",
        default=f"http://{host_port(host_ip, contract.DAEMON_PORT)}",
        help="the node's freeze-daemon (default from env HOST_IP)",
    )
    p.add_argument(
        "--token-file",
        default=contract.TOKEN_FILE,
        help="projected service-account token (audience freeze); re-read when it changes",
    )
    p.add_argument(
        "--state-file",
        default=contract.STATE_FILE,
        help="exists while the app may be frozen, so a restarted proxy resumes it first; its "
        "directory should survive container restarts (the webhook mounts an emptyDir)",
    )
    p.add_argument(
        contract.FLAG_CONTAINER,
        action="append",
        default=None,
        help="container to freeze (repeatable; the webhook passes one per container; env "
        "USER_CONTAINER: one name; default: every container of the pod except queue-proxy, "
        "freeze-proxy and mesh proxies)",
    )
    p.add_argument(
        "--grace",
        type=_duration,
        default=env.get(contract.ENV_GRACE, DEFAULT_GRACE),
        help="idle time before pausing, e.g. 0, 250ms, 1m30s (Go's format); a request within it "
        "cancels the pause (env FREEZE_GRACE)",
    )
    p.add_argument(
        contract.FLAG_RESUME_TIMEOUT,
        type=_duration,
        default=contract.DEFAULT_RESUME_TIMEOUT,
        help="how long a request waits for a failing resume (retried with backoff) before 503",
    )
    p.add_argument(
        contract.FLAG_DRAIN_TIMEOUT,
        type=_duration,
        default=contract.DEFAULT_DRAIN_TIMEOUT,
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    p.add_argument(
        "--no-freeze",
        action="store_true",
        help="only proxy; never pause (a kill switch, and the benchmarks' baseline)",
    )
    p.add_argument(
        contract.FLAG_MODE,
        choices=contract.MODES,
        default=contract.MODE_FREEZE,
        help="what an idle app gets: freeze (the cgroup freezer), throttle (its CPU quota "
        "lowered to --throttle-cpu, restored on wake) or dry-run (nothing: /metrics and the "
        "log count the pauses and resumes it would make; the daemon is never called)",
    )
    p.add_argument(
        contract.FLAG_THROTTLE_CPU,
        type=_millicores,
        default=contract.DEFAULT_THROTTLE_CPU,
        help="--mode throttle: the CPU floor, a Kubernetes quantity from 10m to 999m",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive_duration,
        default=format_duration(relay.HEADER_TIMEOUT),
        help="a request head must be complete this long after its first byte, else 408 and "
        "the connection is closed (queue-proxy sends a head in one write)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_duration,
        default=format_duration(relay.IDLE_TIMEOUT),
        help="a client connection with no request in progress is closed after this long; keep "
        "it well above queue-proxy's own keep-alive (90s), so queue-proxy always closes first",
    )
    p.add_argument(
        "--max-connections",
        type=_connections,
        default=relay.MAX_CONNECTIONS,
        help="client connections at once on --listen; one more gets 503 and is closed",
    )
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    for flag, value in (("--listen", args.listen), ("--health-listen", args.health_listen)):
        try:
            parse_listen(value, flag)
        except ValueError as exc:
            p.error(str(exc))
    containers = args.container
    if containers is None:
        user = env.get(contract.ENV_USER_CONTAINER)
        containers = [user] if user else []
    jsonlog.setup("freeze-proxy", args.log_level)
    return Settings(
        listen=args.listen,
        health_listen=args.health_listen,
        upstream=args.upstream,
        daemon_url=args.daemon_url,
        token_file=args.token_file,
        state_file=args.state_file,
        containers=containers,
        grace=args.grace,
        resume_timeout=args.resume_timeout,
        drain_timeout=args.drain_timeout,
        freeze=not args.no_freeze,
        mode=args.mode,
        throttle_cpu=args.throttle_cpu,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_args(argv)
    except ValueError as exc:  # a bad FREEZE_GRACE in the environment
        sys.exit(f"freeze-proxy: {exc}")
    fit_open_files(relay.files_needed(settings.max_connections))
    if uvloop is None:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
