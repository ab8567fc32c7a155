"""Serving the daemon's app on a hostPort every pod of the node can reach: bounded connections
(``bounded.connections``: a head timeout, an idle timeout, a connection cap that evicts the
oldest waiting connection, so held connections cannot lock a pod's wake out; a refused one is
retried by the proxy's resume)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from bounded.connections import ConnectionGuard, ServerLimits, guarded_runner, listen

# After the listeners close, how long calls in flight may take to be answered (aiohttp's
# default is 60 s: more than the DaemonSet's terminationGracePeriodSeconds).
SHUTDOWN_TIMEOUT = 5.0


async def serve(
    app: web.Application,
    hosts: Sequence[str | None],
    port: int,
    limits: ServerLimits,
    *,
    stop: asyncio.Event | None = None,
    on_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Serve ``app`` on ``hosts``:``port`` until SIGTERM/SIGINT (or ``stop``), then clean up.

    ``on_stop`` runs after the signal while the daemon still listens (its thaw on the way out:
    proxies' thaws are still answered meanwhile); then the listeners close and calls in flight
    get ``SHUTDOWN_TIMEOUT`` seconds."""
    guard = ConnectionGuard(limits)
    runner = guarded_runner(app, guard, SHUTDOWN_TIMEOUT)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    servers: list[asyncio.Server] = []
    try:
        for host in hosts:
            servers.append(await listen(runner, guard, host, port))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if on_stop is not None:
            await on_stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for server in servers:
            server.close()
        await runner.cleanup()
        for server in servers:
            await server.wait_closed()
