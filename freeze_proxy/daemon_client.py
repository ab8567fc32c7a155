"""Talks to the node daemon: pause/resume this pod, authenticated by its projected token.

The token file is re-read when it changes (kubelet rotates it well before it expires) by a
background refresher, so the hot path never touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Protocol

import aiohttp

log = logging.getLogger("freeze_proxy.daemon_client")


class DaemonError(Exception):
    """A pause or resume did not happen; the message names the cause and the fix."""


class FreezeClient(Protocol):
    """What the proxy needs from the node daemon."""

    async def pause(self) -> None: ...

    async def resume(self, budget: float) -> None:
        """Resume, retrying with backoff for at most ``budget`` seconds; raise DaemonError."""
        ...


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

    async def keep_fresh(self, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self.refresh()


class HttpDaemonClient:
    """``POST /freeze`` and ``/thaw`` on the daemon, with header ``Token``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        daemon_url: str,
        token: TokenFile,
        containers: list[str],
        call_timeout: float = 2.0,
    ) -> None:
        base = daemon_url.rstrip("/")
        query = "&".join(f"container={c}" for c in containers)
        suffix = f"?{query}" if query else ""
        self._freeze_url = f"{base}/freeze{suffix}"
        self._thaw_url = f"{base}/thaw{suffix}"
        self._session = session
        self._token = token
        self._call_timeout = call_timeout

    async def pause(self) -> None:
        await self._call(self._freeze_url, self._call_timeout)

    async def resume(self, budget: float) -> None:
        deadline = time.monotonic() + budget
        delay = 0.01
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                await self._call(self._thaw_url, max(0.05, min(self._call_timeout, remaining)))
                if attempt > 1:
                    log.info("resume succeeded after retries", extra={"attempts": attempt})
                return
            except DaemonError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= delay:
                    raise DaemonError(f"resume failed after {attempt} attempts: {exc}") from exc
                log.warning("resume failed, retrying", extra={"attempt": attempt, "err": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _call(self, url: str, limit: float) -> None:
        headers = {"Token": self._token.token}
        try:
            async with self._session.post(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=limit)
            ) as resp:
                if resp.status == 200:
                    await resp.read()
                    return
                if resp.status == 403:
                    # Maybe kubelet rotated the token a moment ago: re-read before the retry.
                    await self._token.refresh()
                text = (await resp.text())[:500]
                raise DaemonError(f"daemon at {url} answered {resp.status}: {text}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DaemonError(
                f"daemon at {url} unreachable ({type(exc).__name__}: {exc}); is the freeze-daemon "
                "DaemonSet running on this node and is --daemon-url (HOST_IP) right?"
            ) from exc
