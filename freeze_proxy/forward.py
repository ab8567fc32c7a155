"""Streaming reverse proxy to the app: HTTP and websockets, no freezing logic.

Bodies stream both ways as chunks arrive (no buffering, no flush interval), hop-by-hop headers are
stripped, the raw path and query are kept, and ``X-Forwarded-*`` are set as a reverse proxy should.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger("freeze_proxy.forward")

# RFC 9110 §7.6.1 plus the legacy ones Go's httputil strips too.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Set by aiohttp itself on the way out; copying them would duplicate or contradict it.
_RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}
_WS_REQUEST_SKIP = HOP_BY_HOP | {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "host",
    "content-length",
}


def end_to_end(headers: CIMultiDictProxy[str], skip: frozenset[str]) -> CIMultiDict[str]:
    """Copy headers except hop-by-hop ones and those the Connection header names."""
    connection = headers.get("Connection")
    if connection:
        skip = skip | {t.strip().lower() for t in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in skip:
            out.add(name, value)
    return out


def add_forwarded(headers: CIMultiDict[str], request: web.BaseRequest) -> None:
    """Append the client to X-Forwarded-For; set -Proto/-Host unless an earlier proxy did."""
    peer = request.remote
    if peer:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    if request.host:
        headers.setdefault("X-Forwarded-Host", request.host)


def make_session() -> aiohttp.ClientSession:
    """The one client session: keep-alive pool, no decompression, cookies or total timeout."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )


def error_response(status: int, message: str, **fields: object) -> web.Response:
    return web.json_response({"error": message, **fields}, status=status)


class Forwarder:
    """Forward one request to the upstream app and stream its answer back."""

    def __init__(self, session: aiohttp.ClientSession, upstream: str) -> None:
        self._session = session
        self._upstream = upstream.rstrip("/")
        self._websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        return await self._http(request)

    async def _http(self, request: web.Request) -> web.StreamResponse:
        headers = end_to_end(request.headers, HOP_BY_HOP)
        add_forwarded(headers, request)
        body = request.content if request.body_exists else None
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=False,
            )
        except aiohttp.ClientError as exc:
            log.warning(
                "upstream request failed", extra={"upstream": self._upstream, "err": str(exc)}
            )
            return error_response(
                502, f"the app at {self._upstream} did not answer: {exc}", cause="upstream"
            )
        async with upstream:
            headers = end_to_end(upstream.headers, _RESPONSE_SKIP)
            content = upstream.content
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            if upstream.content_length is not None and "chunked" not in upstream.headers.get(
                "Transfer-Encoding", ""
            ):
                response.content_length = upstream.content_length
            await response.prepare(request)
            while chunk := await content.readany():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        headers = end_to_end(request.headers, _WS_REQUEST_SKIP)
        add_forwarded(headers, request)
        protocols = _split(request.headers.get("Sec-WebSocket-Protocol", ""))
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            upstream = await self._session.ws_connect(
                url, headers=headers, protocols=protocols, autoping=False, max_msg_size=0
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return error_response(
                502, f"the app at {self._upstream} refused the websocket: {exc}", cause="upstream"
            )
        async with upstream:
            downstream = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (),
                autoping=False,
                max_msg_size=0,
            )
            await downstream.prepare(request)
            self._websockets.add(downstream)
            await _pump_both(downstream, upstream)
            return downstream

    async def close_websockets(self) -> None:
        """Close open websockets (at shutdown): they would otherwise hold the drain open."""
        await asyncio.gather(
            *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in list(self._websockets)),
            return_exceptions=True,
        )


def _split(value: str) -> Iterable[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    async for msg in source:
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type is WSMsgType.ERROR:
            break
    if not sink.closed:
        code = source.close_code or aiohttp.WSCloseCode.OK
        await sink.close(code=code)


async def _pump_both(a: WebSocket, b: WebSocket) -> None:
    """Relay frames both ways until either side closes, then close the other."""
    tasks = [asyncio.ensure_future(_pump(a, b)), asyncio.ensure_future(_pump(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in (a, b):
            if not ws.closed:
                await ws.close()
