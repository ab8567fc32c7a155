"""Talks to the node daemon: pause/resume this pod, authenticated by its projected token.

The token file is re-read when it changes (kubelet rotates it well before it expires) by a
background refresher, so the hot path never touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

from freeze_proxy import contract
from freeze_proxy.addresses import host_port
from freeze_proxy.contract import SEQUENCE_HEADER
from freeze_proxy.http1 import (
    CHUNKED,
    END_OF_HEAD,
    LENGTH,
    UNTIL_CLOSE,
    HttpError,
    ResponseHead,
    parse_response,
)

log = logging.getLogger("freeze_proxy.daemon_client")


class DaemonError(Exception):
    """A pause or resume did not happen (or may not have); the message names cause and fix.

    ``sent``: the call may have reached the daemon, which may still carry it out (no answer came:
    a timeout, a connection lost mid-call). Otherwise nothing was done: ``unreachable`` (no daemon
    took the connection: a node without the DaemonSet, or a wrong URL), an error answer
    (``status``), or the call could not be made (no token yet).
    """

    def __init__(
        self,
        message: str,
        *,
        sent: bool = False,
        status: int | None = None,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.status = status
        self.unreachable = unreachable


class FreezeClient(Protocol):
    """What the proxy needs from the node daemon."""

    async def pause(self) -> None:
        """Pause once; raise DaemonError (its ``sent`` says whether the app may be frozen)."""
        ...

    async def resume(self, budget: float) -> None:
        """Resume, retrying with backoff for at most ``budget`` seconds; raise DaemonError,
        ``unreachable`` only when no attempt found a daemon."""
        ...


class DryRunClient:
    """``--mode dry-run``: the gate decides as usual, but no call leaves the pod (the proxy
    counts what would have happened)."""

    async def pause(self) -> None:
        return None

    async def resume(self, budget: float) -> None:
        return None

    async def close(self) -> None:
        return None


class TokenFile:
    """The pod's projected service-account token, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._token: str | None = None
        self._stamp: tuple[int, int] | None = None

    @property
    def token(self) -> str:
        if self._token is None:
            raise DaemonError(
                f"no service-account token read from {self.path} yet: the projected volume "
                "(audience 'freeze') must be mounted there (the webhook adds it)"
            )
        return self._token

    def _read_if_changed(self) -> bool:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return False
        with open(self.path, encoding="ascii") as f:
            token = f.read().strip()
        if not token:
            raise OSError(f"{self.path} is empty")
        self._token, self._stamp = token, stamp
        return True

    async def refresh(self) -> bool:
        """Re-read the file if it changed (off the event loop); True when a new token was read."""
        try:
            changed = await asyncio.to_thread(self._read_if_changed)
        except OSError as exc:
            log.warning("cannot read the token file", extra={"path": self.path, "err": str(exc)})
            return False
        if changed:
            log.info("token read", extra={"path": self.path})
        return changed

    async def wait_ready(self, poll: float = 0.2) -> None:
        while self._token is None:
            if not await self.refresh():
                await asyncio.sleep(poll)

    # kubelet rotates the projected token at 80 % of its 600 s lifetime (the webhook's
    # expirationSeconds), so a token re-read every 60 s is used at most 540 s after issue, and
    # a 403 re-reads it at once anyway. Each look is a thread hop: every 10 s it was most of what
    # the proxy of a frozen app cost (README, Performance, row 6).
    async def keep_fresh(self, every: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self.refresh()


@dataclass
class _Progress:
    sent: bool = False


class HttpDaemonClient:
    """``POST /freeze`` and ``/thaw`` on the daemon, with header ``Token``, over one keep-alive
    connection (calls are serialized: the gate never overlaps a pause and a resume)."""

    def __init__(
        self,
        daemon_url: str,
        token: TokenFile,
        containers: list[str],
        call_timeout: float = 2.0,
        *,
        mode: str = contract.MODE_FREEZE,
        throttle_cpu: str = contract.DEFAULT_THROTTLE_CPU,
    ) -> None:
        parts = urlsplit(daemon_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--daemon-url must be http://host:port, not {daemon_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._base = daemon_url.rstrip("/")
        base_path = parts.path.rstrip("/")
        params = [f"container={quote(c)}" for c in containers]
        if mode == contract.MODE_THROTTLE:  # the same floor on both: a new daemon needs it
            params += [
                f"{contract.QUERY_MODE}={mode}",
                f"{contract.QUERY_CPU}={quote(throttle_cpu)}",
            ]
        elif mode != contract.MODE_FREEZE:
            raise ValueError(f"the daemon knows modes {contract.DAEMON_MODES}, not {mode!r}")
        query = "&".join(params)
        suffix = f"?{query}" if query else ""
        self._paths = {action: f"{base_path}/{action}{suffix}" for action in ("freeze", "thaw")}
        self._token = token
        self._call_timeout = call_timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def pause(self) -> None:
        await self._call("freeze", self._call_timeout)

    async def resume(self, budget: float) -> None:
        deadline = time.monotonic() + budget
        delay = 0.01
        attempt = 0
        never_reached = True  # no attempt found a daemon: the error says unreachable
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                await self._call("thaw", max(0.05, min(self._call_timeout, remaining)))
                if attempt > 1:
                    log.info("resume succeeded after retries", extra={"attempts": attempt})
                return
            except DaemonError as exc:
                never_reached = never_reached and exc.unreachable
                remaining = deadline - time.monotonic()
                if remaining <= 0.01:  # the whole budget is spent (the last wait is cut short)
                    raise DaemonError(
                        f"resume failed after {attempt} attempts: {exc}",
                        sent=exc.sent,
                        status=exc.status,
                        unreachable=never_reached,
                    ) from exc
                log.warning("resume failed, retrying", extra={"attempt": attempt, "err": str(exc)})
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)

    async def close(self) -> None:
        self._drop()

    async def _call(self, action: str, limit: float) -> None:
        url = f"{self._base}/{action}"
        progress = _Progress()
        try:
            async with self._lock, asyncio.timeout(limit):
                status, body = await self._exchange(self._paths[action], progress)
        except (OSError, TimeoutError, EOFError, ValueError, HttpError) as exc:
            what = (
                f"did not answer within {limit:g} s" if isinstance(exc, TimeoutError) else "failed"
            )
            if progress.sent:
                raise DaemonError(
                    f"daemon at {url} {what} after receiving the call ({type(exc).__name__}: "
                    f"{exc}); it may still carry it out",
                    sent=True,
                ) from exc
            raise DaemonError(
                f"daemon at {url} unreachable ({type(exc).__name__}: {exc}); is the freeze-daemon "
                "DaemonSet running on this node (label knative.dev/container-runtime) and is "
                "--daemon-url (HOST_IP) right?",
                unreachable=True,
            ) from exc
        if status == 200:
            return
        if status == 403:
            # Maybe kubelet rotated the token a moment ago: re-read before the retry.
            await self._token.refresh()
        text = body[:500].decode(errors="replace")
        raise DaemonError(f"daemon at {url} answered {status}: {text}", status=status)

    async def _exchange(self, path: str, progress: _Progress) -> tuple[int, bytes]:
        """One request/response; a stale pooled connection is replaced once (calls are
        idempotent). Any failure drops the connection: its state is unknown. ``progress.sent``
        is set once request bytes have left on a connection."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host_port(self._host, self._port)}\r\n"
            f"Token: {self._token.token}\r\n"
            f"{SEQUENCE_HEADER}: {time.monotonic_ns()}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        try:
            for attempt in (1, 2):
                if self._conn is not None and self._conn[0].at_eof():
                    self._drop()  # the daemon closed it while idle (a restart): never sent on
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = await asyncio.open_connection(self._host, self._port)
                reader, writer = self._conn
                try:
                    writer.write(request)
                    progress.sent = True
                    head = await reader.readuntil(END_OF_HEAD)
                except (ConnectionError, asyncio.IncompleteReadError):
                    self._drop()
                    if reused and attempt == 1:
                        continue
                    raise
                response = parse_response(head[: -len(END_OF_HEAD)], b"POST")
                body = await _read_body(reader, response)
                if not response.keep_alive:
                    self._drop()
                return response.status, body
            raise AssertionError("unreachable")
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


async def _read_body(reader: asyncio.StreamReader, response: ResponseHead) -> bytes:
    if response.framing == LENGTH:
        return await reader.readexactly(response.length)
    if response.framing == UNTIL_CLOSE:
        return await reader.read()
    if response.framing == CHUNKED:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size + 2))
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
            pass
        return b"".join(p[:-2] for p in parts)
    return b""
