"""HTTP/1.1 message heads and body framing, as a reverse proxy needs them: pure, no I/O.

The relay (``relay.py``) copies bodies as raw bytes; from a head it only needs to know where the
message ends (RFC 9112 §6.3) and which headers to rewrite (hop-by-hop ones out, ``X-Forwarded-*``
in). Where a message ends is kept in fields, never in the relayed headers: the heads we write
carry framing headers computed from those fields, so no ``Connection`` token can change it.
Anything ambiguous about where a request ends is refused (400) rather than guessed, since a guess
that differs from the app's is request smuggling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 §7.6.1 plus the legacy ones Go's httputil strips too (lower case, as bytes).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
MAX_HEAD = 65536  # bytes: a longer head is refused (431), as a bound on what we buffer
CRLF = b"\r\n"
END_OF_HEAD = b"\r\n\r\n"
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# Control characters but HTAB: llhttp and Go's net/http refuse them in a field value; a vertical
# tab or a bare CR is whitespace or a line end to some parsers (tests/test_http1_differential).
_VALUE_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A request target is visible ASCII (RFC 9112 §3.2, RFC 3986); Go's client percent-encodes the rest.
_NOT_IN_TARGET = re.compile(rb"[^\x21-\x7e]")
# Its four forms (RFC 9112 §3.2): origin (``/p?q``), absolute (``scheme://...``: llhttp wants
# the authority's ``//``, stricter than RFC 3986's ``t:/``), authority (only for CONNECT:
# ``host:port``) and asterisk (``*``, for OPTIONS; Go parses it for any method and leaves the
# answer to the handler). llhttp and Go refuse anything else (``HEAD o``).
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk-size [ chunk-ext ], without the optional whitespace around ";" and "=" (llhttp refuses
# it too): a size line the app may read otherwise is refused, since its bytes are relayed as
# they are.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;%s(?:=(?:%s|%s))?)*" % (_TOKEN, _TOKEN, _QUOTED))


class HttpError(Exception):
    """A message we cannot relay safely; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Body framing: where a message's body ends.
NO_BODY = 0  # nothing follows the head
LENGTH = 1  # exactly ``length`` bytes follow
CHUNKED = 2  # chunked transfer coding: see ChunkedScanner
UNTIL_CLOSE = 3  # the body ends when the sender closes (responses only)


# Framing travels in fields (``Head.framing``/``length``), never as headers: ``end_to_end`` drops
# these and the writers emit them from the fields, so no ``Connection`` token can remove them.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# Named in ``Connection``, these are still relayed: Go keeps the Host in a field, apart from the
# header map, so ``Connection: host`` cannot strip it either.
NEVER_NOMINATED = frozenset({b"host"})
_NOT_RELAYED = HOP_BY_HOP | FRAMING_HEADERS


@dataclass(slots=True)
class Head:
    """One parsed head. ``headers`` keep their original spelling; ``start`` is the first line.

    ``length`` is the Content-Length the relayed head carries: the body's length when
    ``framing`` is LENGTH (0 for an empty body), the app's stated length on a bodiless answer
    (HEAD, 304), -1 for none.
    """

    start: bytes
    headers: list[tuple[bytes, bytes]]
    framing: int
    length: int
    keep_alive: bool
    upgrade: bool  # asks for (request) or grants (101 response) a protocol switch


@dataclass(slots=True)
class RequestHead(Head):
    method: bytes
    target: bytes
    version: bytes


@dataclass(slots=True)
class ResponseHead(Head):
    status: int


def _field(line: bytes) -> tuple[bytes, bytes]:
    """One ``name: value`` line (a header or a trailer), the value without surrounding blanks."""
    name, colon, value = line.partition(b":")
    if not colon or not name or not _TOKEN_CHARS.issuperset(name):
        raise HttpError(400, f"malformed header line {line[:80]!r}")
    if _VALUE_CTL.search(value):
        raise HttpError(400, f"a control character in the value of {name[:40]!r}")
    return name, value.strip(b" \t")


def _split_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [_field(line) for line in lines]


def _framing(headers: list[tuple[bytes, bytes]], version: bytes) -> tuple[int, int, bool, bool]:
    """(framing, length, keep_alive, upgrade) from the headers; framing and length -1: none
    stated."""
    length = -1
    length_text = b""
    chunked = False
    connection = b""
    upgrade = b""
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            # A repeat must be the same text (as Go and h11 compare): 5 and 05 conflict.
            if not value.isdigit() or (length >= 0 and value != length_text):
                raise HttpError(400, f"invalid Content-Length {value[:40]!r}")
            length, length_text = int(value), value
        elif lname == b"transfer-encoding":
            # Only plain chunked: a coding before it (gzip, chunked) would be lost with the
            # hop-by-hop header, and the receiver would take coded bytes for the body.
            if value.lower() != b"chunked" or chunked:
                raise HttpError(400, f"unsupported Transfer-Encoding {value[:40]!r}: only chunked")
            chunked = True
        elif lname == b"connection":
            connection = connection + b"," + value.lower() if connection else value.lower()
        elif lname == b"upgrade" and not upgrade:
            upgrade = value  # the first, as the one the rewritten head carries
    if chunked and length >= 0:
        raise HttpError(400, "both Transfer-Encoding and Content-Length: ambiguous framing")
    tokens = {t.strip() for t in connection.split(b",")} if connection else set()
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens
    framing = CHUNKED if chunked else LENGTH if length >= 0 else -1
    return framing, length, keep_alive, bool(upgrade) and b"upgrade" in tokens


def _lines(head: bytes) -> list[bytes]:
    lines = head.split(CRLF)
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        # A bare CR or LF is a line break to some parsers and not to others: smuggling.
        raise HttpError(400, "a bare CR, LF or NUL inside a request line or header field")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete header line folding is not accepted")
    return lines


def parse_request(head: bytes) -> RequestHead:
    """Parse a request head (without the blank line). Raise HttpError when it can't be relayed."""
    lines = _lines(head)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, f"unsupported protocol {version[:20]!r}: HTTP/1.x only")
    if not _TOKEN_CHARS.issuperset(method):
        raise HttpError(400, f"malformed method {method[:20]!r}")
    if _NOT_IN_TARGET.search(target):
        raise HttpError(400, f"a request target outside visible ASCII {target[:80]!r}")
    if not (
        target.startswith(b"/")
        or target == b"*"
        or method == b"CONNECT"
        or _ABSOLUTE_FORM.match(target)
    ):
        raise HttpError(400, f"a request target in none of its four forms {target[:80]!r}")
    headers = _split_headers(lines[1:])
    if sum(1 for name, _ in headers if name.lower() == b"host") > 1:
        # RFC 9112 §3.2 (Go and h11 refuse it too): the app might route by one Host and a
        # cache or a policy in front by the other. (A missing Host is left to the app.)
        raise HttpError(400, "more than one Host header")
    framing, length, keep_alive, upgrade = _framing(headers, version)
    if framing < 0:
        framing = NO_BODY  # a request without framing headers has no body (RFC 9112 §6.3)
    elif framing == LENGTH and length == 0:
        framing = NO_BODY
    return RequestHead(
        lines[0], headers, framing, length, keep_alive, upgrade, method, target, version
    )


def parse_response(head: bytes, request_method: bytes) -> ResponseHead:
    """Parse a response head to a request with ``request_method``."""
    lines = _lines(head)
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if (
        version[:7] != b"HTTP/1."
        or not code.isdigit()
        or len(code) != 3
        or rest[3:4] not in (b"", b" ")
    ):
        raise HttpError(502, f"the app sent a malformed status line {lines[0][:80]!r}")
    status = int(code)
    try:
        headers = _split_headers(lines[1:])
        framing, length, keep_alive, upgrade = _framing(headers, version)
    except HttpError as exc:
        raise HttpError(502, f"the app sent a response we cannot relay: {exc}") from None
    if status < 200 or status == 204:
        framing, length = NO_BODY, -1  # a Content-Length is not allowed here (RFC 9110 §8.6)
    elif request_method == b"HEAD" or status == 304:
        framing = NO_BODY  # a stated length describes the resource: relayed as it is
    elif framing < 0:
        framing = UNTIL_CLOSE
        keep_alive = False
    elif framing == LENGTH and length == 0:
        framing = NO_BODY
    return ResponseHead(
        lines[0], headers, framing, length, keep_alive, status == 101 and upgrade, status
    )


# Methods a client may send twice, and headers that make any request so (as Go's Transport).
# PUT and DELETE are idempotent by RFC 9110 too, yet Go does not resend them: neither do we.
RESENDABLE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
IDEMPOTENCY_KEYS = frozenset({b"idempotency-key", b"x-idempotency-key"})


def may_send_again(request: RequestHead) -> bool:
    """Whether the request may be sent a second time after the app may have read it (a kept-alive
    connection dropped before any answer): only if acting on it twice is harmless."""
    if request.method in RESENDABLE_METHODS:
        return True
    return any(name.lower() in IDEMPOTENCY_KEYS for name, _ in request.headers)


def end_to_end(head: Head) -> list[tuple[bytes, bytes]]:
    """The headers relayed as they are: all but hop-by-hop ones, those the Connection header
    names (except the Host) and the framing ones (the writers emit those from the fields)."""
    skip: set[bytes] | frozenset[bytes] = _NOT_RELAYED
    for name, value in head.headers:
        if name.lower() == b"connection":
            skip = skip | ({t.strip() for t in value.lower().split(b",")} - NEVER_NOMINATED)
    return [(n, v) for n, v in head.headers if n.lower() not in skip]


def serialize(start: bytes, headers: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """A head ready to send: start line, headers, ``extra`` (ready-made header lines), blank."""
    return b"".join([start, CRLF, *(b"%s: %s\r\n" % h for h in headers), extra, CRLF])


def upstream_request(request: RequestHead, peer: bytes) -> bytes:
    """The head sent to the app: end-to-end headers, X-Forwarded-*, our own framing headers."""
    headers = end_to_end(request)
    forwarded_for = b""
    has_proto = False
    host = b""
    has_fwd_host = False
    kept = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        if lname == b"x-forwarded-proto":
            has_proto = True
        elif lname == b"x-forwarded-host":
            has_fwd_host = True
        elif lname == b"host":
            host = value
        kept.append((name, value))
    if peer:
        forwarded_for = forwarded_for + b", " + peer if forwarded_for else peer
    if forwarded_for:
        kept.append((b"X-Forwarded-For", forwarded_for))
    if not has_proto:
        kept.append((b"X-Forwarded-Proto", b"http"))
    if host and not has_fwd_host:
        kept.append((b"X-Forwarded-Host", host))
    # The connection to the app is ours to keep, whatever the client asked for its own: an
    # HTTP/1.0 request asks for keep-alive (persistent for 1.1 by default).
    connection = b"keep-alive" if request.version == b"HTTP/1.0" else b""
    return serialize(request.start, kept, _own_headers(request, connection))


def announces_keep_alive(head: Head) -> bool:
    """Whether the head's Connection header carries ``keep-alive``: how a server answering an
    HTTP/1.0 request says it keeps the connection (else it closes it, said or not)."""
    for name, value in head.headers:
        if name.lower() == b"connection":
            if b"keep-alive" in {t.strip() for t in value.lower().split(b",")}:
                return True
    return False


def status_line(response: ResponseHead) -> bytes:
    """Our own status line for a relayed response: our version, the app's code and reason (an
    intermediary sends its own version, RFC 9110 §6.2)."""
    rest = response.start.partition(b" ")[2]  # "200 OK", or "200" without a reason
    return b"HTTP/1.1 " + rest if len(rest) > 3 else b"HTTP/1.1 " + rest + b" "


def downstream_response(
    response: ResponseHead, keep_alive: bool, http10_client: bool = False
) -> bytes:
    """The head sent back to the client; ``keep_alive`` says whether we keep its connection
    (an HTTP/1.0 client is told so: it would wait for the close otherwise)."""
    if not keep_alive:
        connection = b"close"
    else:
        connection = b"keep-alive" if http10_client else b""
    return serialize(
        status_line(response), end_to_end(response), _own_headers(response, connection)
    )


def interim_response(response: ResponseHead) -> bytes:
    """A 1xx (100 Continue, 103 Early Hints) passed on before the final answer."""
    return serialize(status_line(response), end_to_end(response))


def _own_headers(head: Head, connection: bytes) -> bytes:
    """The headers a relayed head gets from us: its framing (from the fields, whatever the
    headers said), the protocol switch it asks for or grants, else ``Connection: connection``
    unless empty."""
    if head.framing == CHUNKED:
        extra = b"Transfer-Encoding: chunked\r\n"
    elif head.length >= 0:
        extra = b"Content-Length: %d\r\n" % head.length
    else:
        extra = b""
    if head.upgrade:
        upgrade = next(v for n, v in head.headers if n.lower() == b"upgrade")
        return extra + b"Connection: Upgrade\r\nUpgrade: " + upgrade + CRLF
    return extra + b"Connection: " + connection + CRLF if connection else extra


REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


def json_response(status: int, body: bytes, keep_alive: bool = False) -> bytes:
    """A complete response of our own (errors, health) with a JSON body."""
    return own_response(status, body, b"application/json", keep_alive)


def own_response(status: int, body: bytes, content_type: bytes, keep_alive: bool = False) -> bytes:
    """A complete response of our own with a body of ``content_type``."""
    start = b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown"))
    headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))]
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    return serialize(start, headers) + body


# Framing and routing fields, which RFC 9110 §6.5.1 forbids in trailers: llhttp refuses a
# Content-Length there, and an app that merged one into its headers would frame or route by it.
_NOT_IN_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"trailer"})


class ChunkedScanner:
    """Finds where a chunked body ends, without decoding it (the bytes are relayed as they are).

    ``feed(data)`` returns how many bytes of ``data`` belong to the body, or -1 when all of it
    does and more is needed. Trailer fields are passed through.
    """

    __slots__ = ("_line", "_remaining", "_state")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""

    def feed(self, data: bytes) -> int:
        pos = 0
        end = len(data)
        while pos < end:
            if self._state == self._DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > 8192:
                    raise HttpError(400, "chunk-size or trailer line too long")
                return -1
            line = self._line + data[pos:newline]
            self._line = b""
            pos = newline + 1
            if len(line) > 8192:
                raise HttpError(400, "chunk-size or trailer line too long")
            if line[-1:] != b"\r":
                raise HttpError(400, "a chunked body line does not end in CRLF")
            line = line[:-1]
            if self._state == self._SIZE:
                match = _SIZE_LINE.fullmatch(line)
                if match is None:
                    raise HttpError(400, f"malformed chunk size line {line[:40]!r}")
                size = int(match.group(1), 16)
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._state, self._remaining = self._DATA, size
            elif self._state == self._DATA_END:
                if line:
                    raise HttpError(400, "chunk data longer than its declared size")
                self._state = self._SIZE
            elif not line:  # _TRAILER: the blank line ends the message
                self._state = self._SIZE
                return pos
            elif line[:1] in (b" ", b"\t"):
                raise HttpError(400, "obsolete line folding in a trailer is not accepted")
            else:  # a trailer the app would refuse or split otherwise is refused
                name = _field(line)[0].lower()
                if name in _NOT_IN_TRAILERS:
                    raise HttpError(400, f"a {name.decode()} field in the trailers")
        return -1
