"""freeze_proxy.http1: parsing heads, deciding framing, rewriting headers, scanning chunked bodies.

Pure functions only: every test builds bytes, calls the module and checks what a client or the
app would see on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freeze_proxy.http1 import (
    CHUNKED,
    END_OF_HEAD,
    HOP_BY_HOP,
    LENGTH,
    NO_BODY,
    REASONS,
    UNTIL_CLOSE,
    ChunkedScanner,
    Head,
    HttpError,
    RequestHead,
    ResponseHead,
    announces_keep_alive,
    downstream_response,
    end_to_end,
    interim_response,
    json_response,
    may_send_again,
    parse_request,
    parse_response,
    serialize,
    upstream_request,
)

PEER = b"10.1.2.3"


# -- helpers ----------------------------------------------------------------------------------


def request(*headers: bytes, start: bytes = b"GET / HTTP/1.1") -> RequestHead:
    """Parse a request head made of ``start`` and the given header lines."""
    return parse_request(b"\r\n".join([start, *headers]))


def response(
    *headers: bytes, start: bytes = b"HTTP/1.1 200 OK", method: bytes = b"GET"
) -> ResponseHead:
    """Parse a response head (to a ``method`` request) made of ``start`` and header lines."""
    return parse_response(b"\r\n".join([start, *headers]), method)


def refusal(head: bytes) -> HttpError:
    """The HttpError parse_request raises for ``head``."""
    with pytest.raises(HttpError) as caught:
        parse_request(head)
    return caught.value


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of every header called ``name`` (any case), in order."""
    return [v for n, v in headers if n.lower() == name.lower()]


def wire_head(wire: bytes) -> bytes:
    """A serialized head without its blank line, after checking it is exactly one head."""
    assert wire.endswith(END_OF_HEAD)
    assert wire.count(END_OF_HEAD) == 1
    return wire[: -len(END_OF_HEAD)]


def sent_upstream(req: RequestHead, peer: bytes = PEER) -> RequestHead:
    """What the app parses from the head the proxy sends it."""
    return parse_request(wire_head(upstream_request(req, peer)))


def sent_downstream(resp: ResponseHead, keep_alive: bool, method: bytes = b"GET") -> ResponseHead:
    """What the client parses from the head the proxy sends it."""
    return parse_response(wire_head(downstream_response(resp, keep_alive)), method)


def scan(data: bytes, pieces: int = 1) -> int:
    """Feed ``data`` to a fresh ChunkedScanner (in one piece, or byte by byte if pieces > 1):
    the total number of bytes that belong to the body, or -1 if it never ended."""
    scanner = ChunkedScanner()
    chunks = [data] if pieces == 1 else [data[i : i + 1] for i in range(len(data))]
    consumed = 0
    for chunk in chunks:
        n = scanner.feed(chunk)
        if n >= 0:
            return consumed + n
        consumed += len(chunk)
    return -1


# -- parse_request: the request line and headers ----------------------------------------------


@pytest.mark.parametrize(
    ("start", "method", "target", "version"),
    [
        (b"GET / HTTP/1.1", b"GET", b"/", b"HTTP/1.1"),
        (b"POST /a/b?c=d&e=%20 HTTP/1.0", b"POST", b"/a/b?c=d&e=%20", b"HTTP/1.0"),
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*", b"HTTP/1.1"),
        (b"GET http://h.example/x HTTP/1.1", b"GET", b"http://h.example/x", b"HTTP/1.1"),
        (b"CONNECT h.example:443 HTTP/1.1", b"CONNECT", b"h.example:443", b"HTTP/1.1"),
        (b"PROPFIND /dav%2Fdir HTTP/1.1", b"PROPFIND", b"/dav%2Fdir", b"HTTP/1.1"),
    ],
)
def test_request_line_gives_method_target_and_version(
    start: bytes, method: bytes, target: bytes, version: bytes
) -> None:
    req = request(b"Host: h", start=start)
    assert (req.method, req.target, req.version) == (method, target, version)
    assert req.start == start


def test_request_without_headers_is_accepted() -> None:
    req = parse_request(b"GET /health HTTP/1.1")
    assert req.headers == []
    assert req.framing == NO_BODY
    assert req.keep_alive


def test_header_names_keep_their_spelling_and_values_are_trimmed() -> None:
    req = request(
        b"hOsT:   h.example \t", b"X-Empty:", b"X-Colons: a:b:c", b"X-Dup: 1", b"x-dup: 2"
    )
    assert req.headers == [
        (b"hOsT", b"h.example"),
        (b"X-Empty", b""),
        (b"X-Colons", b"a:b:c"),
        (b"X-Dup", b"1"),
        (b"x-dup", b"2"),
    ]


# -- parse_request: keep-alive ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "headers", "keep_alive"),
    [
        (b"HTTP/1.1", [], True),
        (b"HTTP/1.1", [b"Connection: keep-alive"], True),
        (b"HTTP/1.1", [b"Connection: close"], False),
        (b"HTTP/1.1", [b"Connection: CLOSE"], False),
        (b"HTTP/1.1", [b"Connection: keep-alive , close"], False),
        (b"HTTP/1.1", [b"Connection: keep-alive", b"connection: Close"], False),
        (b"HTTP/1.1", [b"Connection: closed"], True),
        (b"HTTP/1.0", [], False),
        (b"HTTP/1.0", [b"Connection: keep-alive"], True),
        (b"HTTP/1.0", [b"Connection: Keep-Alive"], True),
        (b"HTTP/1.0", [b"Connection: x-foo,  keep-alive"], True),
        (b"HTTP/1.0", [b"Connection: close"], False),
        (b"HTTP/1.0", [b"Keep-Alive: timeout=5"], False),
    ],
)
def test_keep_alive_follows_the_version_default_and_connection_header(
    version: bytes, headers: list[bytes], keep_alive: bool
) -> None:
    req = request(b"Host: h", *headers, start=b"GET / " + version)
    assert req.keep_alive is keep_alive


# -- parse_request: framing -------------------------------------------------------------------


def test_content_length_says_how_long_the_request_body_is() -> None:
    req = request(b"Host: h", b"Content-Length: 42", start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (LENGTH, 42)


@pytest.mark.parametrize("value", [b"0", b"000"])
def test_zero_content_length_means_no_body(value: bytes) -> None:
    req = request(b"Content-Length: " + value, start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (NO_BODY, 0)


def test_request_without_framing_headers_has_no_body() -> None:
    req = request(b"Host: h", start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (NO_BODY, -1)  # -1: no Content-Length to relay


def test_content_length_with_leading_zeros_and_spaces_is_decimal() -> None:
    req = request(b"content-length:  010 ", start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (LENGTH, 10)


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_transfer_encoding_chunked_means_a_chunked_body(value: bytes) -> None:
    req = request(b"Transfer-Encoding: " + value, start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (CHUNKED, -1)


@pytest.mark.parametrize("lengths", [[b"5", b"5"], [b"5", b"5", b"5"]])
def test_identical_duplicate_content_lengths_are_accepted(lengths: list[bytes]) -> None:
    req = request(*(b"Content-Length: " + n for n in lengths), start=b"POST / HTTP/1.1")
    assert (req.framing, req.length) == (LENGTH, 5)


@pytest.mark.parametrize(
    ("headers", "upgrade"),
    [
        ([b"Connection: Upgrade", b"Upgrade: websocket"], True),
        ([b"connection: keep-alive, upgrade", b"upgrade: h2c"], True),
        ([b"Connection: keep-alive", b"Connection: UPGRADE", b"Upgrade: websocket"], True),
        ([b"Upgrade: websocket"], False),  # Connection doesn't list it
        ([b"Connection: Upgrade"], False),  # nothing to upgrade to
        ([b"Connection: Upgrade", b"Upgrade:"], False),
        ([b"Connection: upgraded", b"Upgrade: websocket"], False),
        ([b"Connection: keep-alive", b"Upgrade: websocket"], False),
        ([], False),
    ],
)
def test_upgrade_needs_connection_upgrade_and_an_upgrade_header(
    headers: list[bytes], upgrade: bool
) -> None:
    assert request(b"Host: h", *headers).upgrade is upgrade


# -- parse_request: refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
        [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
        [b"Content-Length: 0", b"transfer-encoding: CHUNKED"],
    ],
)
def test_both_transfer_encoding_and_content_length_are_refused_as_smuggling(
    headers: list[bytes],
) -> None:
    exc = refusal(b"\r\n".join([b"POST / HTTP/1.1", *headers]))
    assert exc.status == 400
    assert "ambiguous" in str(exc)


@pytest.mark.parametrize(
    "lengths",
    [[b"5", b"6"], [b"5", b"5", b"6"], [b"0", b"1"], [b"10", b"1"], [b"5", b"05"], [b"0", b"00"]],
)
def test_conflicting_duplicate_content_lengths_are_refused(lengths: list[bytes]) -> None:
    """Not the same text is a conflict (as Go and h11 see it), even if the same number."""
    head = b"\r\n".join([b"POST / HTTP/1.1", *(b"Content-Length: " + n for n in lengths)])
    assert refusal(head).status == 400


@pytest.mark.parametrize(
    "value",
    [b"abc", b"-1", b"+5", b"", b"5, 5", b"0x10", b"1.0", b"5 5", b"1e3", b"\xd9\xa1", b"5;"],
)
def test_content_length_that_is_not_plain_digits_is_refused(value: bytes) -> None:
    exc = refusal(b"POST / HTTP/1.1\r\nContent-Length: " + value)
    assert exc.status == 400
    assert "Content-Length" in str(exc)


@pytest.mark.parametrize(
    "value",
    [b"gzip", b"chunked, gzip", b"identity", b"", b"chunked;q=1", b"chunked,", b"gzip, chunked"],
)
def test_transfer_encoding_other_than_plain_chunked_is_refused(value: bytes) -> None:
    exc = refusal(b"POST / HTTP/1.1\r\nTransfer-Encoding: " + value)
    assert exc.status == 400
    assert "Transfer-Encoding" in str(exc)


@pytest.mark.parametrize(
    "headers",
    [
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"transfer-encoding: gzip, chunked"],
        [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
    ],
)
def test_a_second_transfer_encoding_header_is_refused(headers: list[bytes]) -> None:
    assert refusal(b"\r\n".join([b"POST / HTTP/1.1", *headers])).status == 400


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nX-Long: a\r\n b",
        b"GET / HTTP/1.1\r\nX-Long: a\r\n\tb",
        b"GET / HTTP/1.1\r\n Host: h",
        b"GET / HTTP/1.1\r\nHost: h\r\n Content-Length: 5",
    ],
)
def test_obsolete_line_folding_is_refused(head: bytes) -> None:
    exc = refusal(head)
    assert exc.status == 400
    assert "folding" in str(exc)


@pytest.mark.parametrize(
    "line",
    [
        b"Host : h",
        b"Content-Length\t: 5",
        b": no-name",
        b"NoColonHere",
        b"Ho st: h",
        b"H\xc3\xb6st: h",
        b"X(y): z",
        b"",
    ],
)
def test_malformed_header_lines_are_refused(line: bytes) -> None:
    exc = refusal(b"GET / HTTP/1.1\r\nAccept: */*\r\n" + line)
    assert exc.status == 400
    assert "header" in str(exc)


@pytest.mark.parametrize(
    "start",
    [
        b"",
        b"GET",
        b"GET /",  # HTTP/0.9 had no version at all
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b" / HTTP/1.1",
        b"GET / HTTP/1.1 extra",
        b"GET\t/ HTTP/1.1",
        b"G(T / HTTP/1.1",
        b"G\xc3\x89T / HTTP/1.1",
    ],
)
def test_malformed_request_lines_are_refused(start: bytes) -> None:
    exc = refusal(start + b"\r\nHost: h")
    assert exc.status == 400


@pytest.mark.parametrize(
    "version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b"HTTP/1.10"]
)
def test_protocol_versions_other_than_http1x_are_refused_with_505(version: bytes) -> None:
    exc = refusal(b"GET / " + version + b"\r\nHost: h")
    assert exc.status == 505
    assert "HTTP/1.x" in str(exc)


@pytest.mark.parametrize(
    "value",
    [
        b"a\nTransfer-Encoding: chunked",
        b"a\rTransfer-Encoding: chunked",
        b"a\x00b",
        b"a\x01b",
        b"a\x0bb",  # vertical tab: whitespace to some parsers
        b"a\x1fb",
        b"a\x7fb",
    ],
)
def test_control_characters_in_a_header_value_are_refused(value: bytes) -> None:
    assert refusal(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nX-Note: " + value).status == 400


def test_a_bare_lf_in_the_request_target_is_refused() -> None:
    assert refusal(b"GET /a\nX:y HTTP/1.1\r\nHost: h").status == 400


def test_a_tab_and_bytes_past_ascii_in_a_header_value_are_kept() -> None:
    req = request(b"Host: h", b"X-Note: caf\xc3\xa9\tau lait")
    assert values(req.headers, b"X-Note") == [b"caf\xc3\xa9\tau lait"]


@pytest.mark.parametrize(
    "target", [b"/\x01", b"/a\tb", b"/a\x0bb", b"/\x7f", b"/\xff", b"/caf\xc3\xa9"]
)
def test_a_request_target_outside_visible_ascii_is_refused(target: bytes) -> None:
    """llhttp, h11 and Go's net/http refuse these (Go's client sends them percent-encoded): a
    target the app would refuse or read otherwise is not relayed (tests/test_http1_differential)."""
    assert refusal(b"GET " + target + b" HTTP/1.1\r\nHost: h").status == 400


@pytest.mark.parametrize(
    ("method", "target"),
    [(b"HEAD", b"o"), (b"GET", b"x/y"), (b"GET", b"?q"), (b"GET", b"1http://h/"),
     (b"POST", b"h"), (b"POST", b"host:80"), (b"POST", b"t:/"), (b"GET", b"**")],
)  # fmt: skip
def test_a_request_target_in_none_of_the_four_forms_is_refused(
    method: bytes, target: bytes
) -> None:
    """RFC 9112 §3.2: origin-form (``/p``), absolute-form (``http://h/p``), authority-form (only
    CONNECT) or ``*``. llhttp and Go refuse the rest (``HEAD o``: found by atheris)."""
    assert refusal(method + b" " + target + b" HTTP/1.1\r\nHost: h").status == 400


@pytest.mark.parametrize(
    ("method", "target"),
    [(b"GET", b"/"), (b"GET", b"/a?b"), (b"GET", b"http://h/p"), (b"GET", b"HTTPS://h"),
     (b"CONNECT", b"h:443"), (b"OPTIONS", b"*")],
)  # fmt: skip
def test_the_four_forms_of_request_target_are_accepted(method: bytes, target: bytes) -> None:
    assert request(b"Host: h", start=method + b" " + target + b" HTTP/1.1").target == target


@pytest.mark.parametrize("second", [b"Host: h", b"host: other", b"HOST:h2"])
def test_a_request_with_two_host_headers_is_refused(second: bytes) -> None:
    """RFC 9112 §3.2: a server MUST answer 400 (Go and h11 do): the app might route by one Host
    and a cache or policy by the other. Found by atheris against h11."""
    assert refusal(b"GET / HTTP/1.1\r\nHost: h\r\n" + second).status == 400


# -- parse_response ---------------------------------------------------------------------------


def test_response_status_line_and_content_length() -> None:
    resp = response(b"Content-Length: 12", start=b"HTTP/1.1 404 Not Found")
    assert resp.status == 404
    assert resp.start == b"HTTP/1.1 404 Not Found"
    assert (resp.framing, resp.length, resp.keep_alive, resp.upgrade) == (LENGTH, 12, True, False)


def test_status_line_without_a_reason_phrase_is_accepted() -> None:
    assert response(b"Content-Length: 0", start=b"HTTP/1.1 200").status == 200


@pytest.mark.parametrize(
    ("method", "status"),
    [
        (b"HEAD", 200),
        (b"HEAD", 404),
        (b"GET", 100),
        (b"GET", 103),
        (b"POST", 199),
        (b"GET", 204),
        (b"GET", 304),
    ],
)
@pytest.mark.parametrize("framing_header", [b"Content-Length: 1234", b"Transfer-Encoding: chunked"])
def test_responses_that_never_have_a_body(
    method: bytes, status: int, framing_header: bytes
) -> None:
    resp = response(framing_header, start=b"HTTP/1.1 %d X" % status, method=method)
    assert resp.framing == NO_BODY
    assert resp.keep_alive


@pytest.mark.parametrize(("method", "status"), [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_bodyless_responses_without_framing_keep_the_connection(method: bytes, status: int) -> None:
    resp = response(start=b"HTTP/1.1 %d X" % status, method=method)
    assert (resp.framing, resp.keep_alive) == (NO_BODY, True)


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_response_without_framing_runs_until_close(version: bytes) -> None:
    resp = response(b"Connection: keep-alive", start=version + b" 200 OK")
    assert resp.framing == UNTIL_CLOSE
    assert resp.keep_alive is False


def test_response_with_zero_content_length_has_no_body_and_keeps_the_connection() -> None:
    resp = response(b"Content-Length: 0")
    assert (resp.framing, resp.length, resp.keep_alive) == (NO_BODY, 0, True)


def test_chunked_response() -> None:
    resp = response(b"Transfer-Encoding: chunked")
    assert (resp.framing, resp.keep_alive) == (CHUNKED, True)


@pytest.mark.parametrize(
    ("start", "headers", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK", [], True),
        (b"HTTP/1.1 200 OK", [b"Connection: close"], False),
        (b"HTTP/1.0 200 OK", [], False),
        (b"HTTP/1.0 200 OK", [b"Connection: Keep-Alive"], True),
    ],
)
def test_response_keep_alive_follows_its_version_and_connection(
    start: bytes, headers: list[bytes], keep_alive: bool
) -> None:
    assert response(b"Content-Length: 3", *headers, start=start).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("start", "headers", "upgrade"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols",
            [b"Connection: upgrade", b"Upgrade: websocket"],
            True,
        ),
        (b"HTTP/1.1 101 Switching Protocols", [b"Connection: Upgrade", b"Upgrade: h2c"], True),
        (b"HTTP/1.1 101 Switching Protocols", [b"Upgrade: websocket"], False),
        (b"HTTP/1.1 101 Switching Protocols", [b"Connection: upgrade"], False),
        (b"HTTP/1.1 200 OK", [b"Connection: upgrade", b"Upgrade: websocket"], False),
        (b"HTTP/1.1 426 Upgrade Required", [b"Connection: upgrade", b"Upgrade: tls"], False),
    ],
)
def test_only_a_101_with_connection_upgrade_grants_an_upgrade(
    start: bytes, headers: list[bytes], upgrade: bool
) -> None:
    resp = response(*headers, start=start)
    assert resp.upgrade is upgrade


def test_a_101_response_has_no_body() -> None:
    resp = response(
        b"Connection: upgrade", b"Upgrade: websocket", start=b"HTTP/1.1 101 Switching Protocols"
    )
    assert resp.framing == NO_BODY


@pytest.mark.parametrize(
    "start",
    [
        b"",
        b"HTTP/1.1",
        b"HTTP/1.1 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2x0 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/2 200 OK",
        b"HTTP/2.0 200 OK",
        b"ICY 200 OK",
        b"200 OK",
        b"http/1.1 200 OK",
    ],
)
def test_malformed_status_lines_are_a_bad_gateway(start: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        parse_response(start + b"\r\nContent-Length: 0", b"GET")
    assert caught.value.status == 502
    assert "status line" in str(caught.value)


@pytest.mark.parametrize(
    "headers",
    [
        [b"Transfer-Encoding: chunked", b"Content-Length: 3"],
        [b"Content-Length: 3", b"Content-Length: 4"],
        [b"Content-Length: -3"],
        [b"Transfer-Encoding: gzip"],
        [b"Bad Header: x"],
        [b"X-Folded: a", b" b"],
    ],
)
def test_responses_with_unrelayable_heads_are_refused(headers: list[bytes]) -> None:
    with pytest.raises(HttpError):
        response(*headers)


@pytest.mark.parametrize("start", [b"HTTP/1.1 2040 OK", b"HTTP/1.1 200OK", b"HTTP/1.1 1000"])
def test_status_codes_that_are_not_exactly_three_digits_are_refused(start: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        parse_response(start + b"\r\nContent-Length: 5", b"GET")
    assert caught.value.status == 502


# -- end_to_end -------------------------------------------------------------------------------

CASINGS: list[Callable[[bytes], bytes]] = [bytes.lower, bytes.upper, bytes.title]


def head_with(headers: list[tuple[bytes, bytes]]) -> Head:
    return Head(b"GET / HTTP/1.1", headers, NO_BODY, 0, True, False)


@pytest.mark.parametrize("case", CASINGS, ids=["lower", "upper", "title"])
def test_every_hop_by_hop_header_is_stripped_in_any_case(case: Callable[[bytes], bytes]) -> None:
    hop = [(case(name), b"v") for name in sorted(HOP_BY_HOP)]
    kept = [(b"Host", b"h"), (b"Accept", b"*/*")]
    headers = [kept[0], *hop, kept[1]]
    assert end_to_end(head_with(headers)) == kept


def test_hop_by_hop_set_is_the_rfc_list_plus_legacy_ones() -> None:
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }


def test_headers_named_in_connection_are_stripped() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"X-Secret ,x-other"),
        (b"x-secret", b"1"),
        (b"X-Keep", b"k"),
        (b"X-OTHER", b"2"),
        (b"connection", b"X-Third"),
        (b"X-Third", b"3"),
        (b"X-Secret", b"again"),
    ]
    assert end_to_end(head_with(headers)) == [(b"Host", b"h"), (b"X-Keep", b"k")]


def test_end_to_end_headers_keep_their_order_spelling_and_duplicates() -> None:
    headers = [
        (b"X-B", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-a", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"TE", b"trailers"),
        (b"set-cookie", b"b=2"),
    ]
    assert end_to_end(head_with(headers)) == [
        (b"X-B", b"2"),
        (b"x-a", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_end_to_end_of_no_headers_is_empty() -> None:
    assert end_to_end(head_with([])) == []


def test_serialize_writes_start_line_headers_extra_lines_and_blank_line() -> None:
    wire = serialize(b"GET / HTTP/1.1", [(b"Host", b"h"), (b"X", b"")], b"Connection: close\r\n")
    assert wire == b"GET / HTTP/1.1\r\nHost: h\r\nX: \r\nConnection: close\r\n\r\n"
    assert serialize(b"HTTP/1.1 204 No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


# -- upstream_request -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "forwarded_for"),
    [
        ([], PEER),
        ([b"X-Forwarded-For: 1.1.1.1"], b"1.1.1.1, " + PEER),
        ([b"x-forwarded-for: 1.1.1.1, 2.2.2.2"], b"1.1.1.1, 2.2.2.2, " + PEER),
        (
            [b"X-Forwarded-For: 1.1.1.1", b"Accept: */*", b"X-FORWARDED-FOR: 2.2.2.2"],
            b"1.1.1.1, 2.2.2.2, " + PEER,
        ),
    ],
)
def test_x_forwarded_for_gets_the_peer_appended(headers: list[bytes], forwarded_for: bytes) -> None:
    up = sent_upstream(request(b"Host: h", *headers))
    assert values(up.headers, b"X-Forwarded-For") == [forwarded_for]


def test_without_a_peer_x_forwarded_for_is_passed_on_unchanged() -> None:
    up = sent_upstream(request(b"X-Forwarded-For: 1.1.1.1", b"X-Forwarded-For: 2.2.2.2"), b"")
    assert values(up.headers, b"X-Forwarded-For") == [b"1.1.1.1, 2.2.2.2"]
    assert values(sent_upstream(request(b"Host: h"), b"").headers, b"X-Forwarded-For") == []


def test_x_forwarded_proto_http_is_added_when_absent() -> None:
    up = sent_upstream(request(b"Host: h"))
    assert values(up.headers, b"X-Forwarded-Proto") == [b"http"]


@pytest.mark.parametrize("name", [b"X-Forwarded-Proto", b"x-forwarded-proto"])
def test_an_existing_x_forwarded_proto_is_kept_as_is(name: bytes) -> None:
    up = sent_upstream(request(b"Host: h", name + b": https"))
    assert values(up.headers, b"X-Forwarded-Proto") == [b"https"]
    assert (name, b"https") in up.headers


def test_x_forwarded_host_is_the_host_when_absent() -> None:
    up = sent_upstream(request(b"host: app.example:8080"))
    assert values(up.headers, b"X-Forwarded-Host") == [b"app.example:8080"]
    assert values(up.headers, b"Host") == [b"app.example:8080"]


def test_an_existing_x_forwarded_host_is_kept_as_is() -> None:
    up = sent_upstream(request(b"Host: internal", b"X-Forwarded-Host: public.example"))
    assert values(up.headers, b"X-Forwarded-Host") == [b"public.example"]


def test_no_host_means_no_x_forwarded_host() -> None:
    up = sent_upstream(request(b"Accept: */*", start=b"GET / HTTP/1.0"))
    assert values(up.headers, b"X-Forwarded-Host") == []


@pytest.mark.parametrize("value", [b"chunked", b"Chunked"])
def test_a_chunked_request_reaches_the_app_with_exactly_one_chunked_coding(value: bytes) -> None:
    req = request(b"Host: h", b"Transfer-Encoding: " + value, start=b"POST /up HTTP/1.1")
    wire = upstream_request(req, PEER)
    assert wire.count(b"Transfer-Encoding: chunked\r\n") == 1
    up = parse_request(wire_head(wire))
    assert values(up.headers, b"Transfer-Encoding") == [b"chunked"]
    assert up.framing == CHUNKED


def test_a_content_length_request_keeps_its_length_and_gets_no_transfer_encoding() -> None:
    up = sent_upstream(request(b"Host: h", b"Content-Length: 7", start=b"PUT /x HTTP/1.1"))
    assert values(up.headers, b"Content-Length") == [b"7"]
    assert values(up.headers, b"Transfer-Encoding") == []
    assert (up.framing, up.length) == (LENGTH, 7)


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"chunked, chunked"])
def test_a_request_transfer_coding_before_chunked_is_not_lost(codings: bytes) -> None:
    try:
        req = request(b"Host: h", b"Transfer-Encoding: " + codings, start=b"POST / HTTP/1.1")
    except HttpError:
        return  # refusing it is fine too
    up = sent_upstream(req)
    assert b", ".join(values(up.headers, b"Transfer-Encoding")) == codings


def test_hop_by_hop_request_headers_do_not_reach_the_app() -> None:
    req = request(
        b"Host: h",
        b"Connection: keep-alive, X-Client-Only",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Proxy-Authorization: Basic eA==",
        b"Proxy-Connection: keep-alive",
        b"X-Client-Only: secret",
        b"Trailer: X-Sum",
        b"X-App: 1",
    )
    up = sent_upstream(req)
    names = {n.lower() for n, _ in up.headers}
    assert names == {
        b"host",
        b"x-app",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }


def test_an_upgrade_request_asks_the_app_for_the_same_upgrade() -> None:
    req = request(
        b"Host: h",
        b"Connection: keep-alive, Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    wire = upstream_request(req, PEER)
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in wire
    up = parse_request(wire_head(wire))
    assert values(up.headers, b"Connection") == [b"Upgrade"]
    assert values(up.headers, b"Upgrade") == [b"websocket"]
    assert values(up.headers, b"Sec-WebSocket-Key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert up.upgrade


def test_an_http10_upgrade_request_still_asks_for_the_upgrade_not_close() -> None:
    req = request(b"Connection: upgrade", b"Upgrade: websocket", start=b"GET /ws HTTP/1.0")
    up = sent_upstream(req)
    assert values(up.headers, b"Connection") == [b"Upgrade"]
    assert up.upgrade


@pytest.mark.parametrize("connection", [[], [b"Connection: keep-alive"], [b"Connection: close"]])
def test_an_http10_request_asks_the_app_to_keep_its_connection(connection: list[bytes]) -> None:
    up = sent_upstream(request(b"Host: h", *connection, start=b"GET / HTTP/1.0"))
    assert values(up.headers, b"Connection") == [b"keep-alive"]
    assert up.keep_alive is True


@pytest.mark.parametrize(
    ("headers", "announced"),
    [
        ([], False),
        ([b"Connection: close"], False),
        ([b"Connection: Keep-Alive"], True),
        ([b"connection: x-a , keep-alive"], True),
        ([b"Connection: x-a", b"Connection: keep-alive"], True),
        ([b"Keep-Alive: timeout=5"], False),
        ([b"Connection: keep-alives"], False),
    ],
)
def test_announces_keep_alive_looks_for_the_connection_option(
    headers: list[bytes], announced: bool
) -> None:
    assert announces_keep_alive(response(b"Content-Length: 0", *headers)) is announced


@pytest.mark.parametrize("connection", [[], [b"Connection: close"], [b"Connection: keep-alive"]])
def test_an_http11_request_reaches_the_app_without_a_connection_header(
    connection: list[bytes],
) -> None:
    up = sent_upstream(request(b"Host: h", *connection))
    assert values(up.headers, b"Connection") == []
    assert up.keep_alive


@pytest.mark.parametrize(
    "start",
    [
        b"GET /a%2Fb?x=1&y=%20z HTTP/1.1",
        b"DELETE /items/42?force HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET http://other.example/p%2F?q HTTP/1.1",
        b"POST /%7Euser/./../x;p=1 HTTP/1.0",
    ],
)
def test_the_request_line_reaches_the_app_unchanged(start: bytes) -> None:
    wire = upstream_request(request(b"Host: h", start=start), PEER)
    assert wire.startswith(start + b"\r\n")
    up = parse_request(wire_head(wire))
    assert up.start == start


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: h",
        b"POST /p?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nX-Forwarded-For: 9.9.9.9",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close",
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket",
        b"PUT / HTTP/1.0\r\nContent-Length: 3",
        b"GET / HTTP/1.1",
    ],
)
def test_the_head_sent_upstream_is_one_valid_head_with_the_same_framing(head: bytes) -> None:
    req = parse_request(head)
    wire = upstream_request(req, PEER)
    assert wire.endswith(b"\r\n\r\n")
    up = parse_request(wire_head(wire))
    assert (up.method, up.target, up.version) == (req.method, req.target, req.version)
    assert (up.framing, up.length, up.upgrade) == (req.framing, req.length, req.upgrade)


def test_end_to_end_request_headers_keep_their_order_before_the_added_ones() -> None:
    req = request(b"Host: h", b"X-Forwarded-For: 1.1.1.1", b"b: 2", b"A: 1", b"b: 3")
    assert sent_upstream(req).headers == [
        (b"Host", b"h"),
        (b"b", b"2"),
        (b"A", b"1"),
        (b"b", b"3"),
        (b"X-Forwarded-For", b"1.1.1.1, " + PEER),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"h"),
    ]


# -- downstream_response ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "app_connection", [[], [b"Connection: keep-alive"], [b"Connection: close"]]
)
def test_closing_the_client_connection_says_connection_close_once(
    app_connection: list[bytes],
) -> None:
    resp = response(b"Content-Length: 2", *app_connection)
    down = sent_downstream(resp, keep_alive=False)
    assert values(down.headers, b"Connection") == [b"close"]
    assert down.keep_alive is False


@pytest.mark.parametrize(
    "app_connection", [[], [b"Connection: close"], [b"Connection: keep-alive"]]
)
def test_keeping_an_http10_clients_connection_tells_it_keep_alive(
    app_connection: list[bytes],
) -> None:
    resp = response(b"Content-Length: 2", *app_connection)
    wire = downstream_response(resp, keep_alive=True, http10_client=True)
    down = parse_response(wire_head(wire), b"GET")
    assert values(down.headers, b"Connection") == [b"keep-alive"]
    closing = parse_response(wire_head(downstream_response(resp, False, True)), b"GET")
    assert values(closing.headers, b"Connection") == [b"close"]


@pytest.mark.parametrize("app_connection", [[], [b"Connection: close"]])
def test_keeping_the_client_connection_sends_no_connection_header(
    app_connection: list[bytes],
) -> None:
    down = sent_downstream(response(b"Content-Length: 2", *app_connection), keep_alive=True)
    assert values(down.headers, b"Connection") == []
    assert down.keep_alive


@pytest.mark.parametrize("keep_alive", [True, False])
def test_a_chunked_response_keeps_exactly_one_chunked_coding(keep_alive: bool) -> None:
    resp = response(b"Transfer-Encoding: chunked", b"Content-Type: text/plain")
    wire = downstream_response(resp, keep_alive)
    assert wire.count(b"Transfer-Encoding: chunked\r\n") == 1
    down = parse_response(wire_head(wire), b"GET")
    assert values(down.headers, b"Transfer-Encoding") == [b"chunked"]
    assert down.framing == CHUNKED


def test_a_content_length_response_keeps_its_length() -> None:
    down = sent_downstream(response(b"Content-Length: 1234"), keep_alive=True)
    assert values(down.headers, b"Content-Length") == [b"1234"]
    assert values(down.headers, b"Transfer-Encoding") == []
    assert (down.framing, down.length) == (LENGTH, 1234)


def test_the_status_code_reason_and_end_to_end_headers_reach_the_client_unchanged() -> None:
    resp = response(
        b"Content-Length: 0",
        b"Set-Cookie: a=1",
        b"Keep-Alive: timeout=5",
        b"Proxy-Authenticate: Basic",
        b"set-cookie: b=2",
        start=b"HTTP/1.1 418 I'm a teapot",
    )
    wire = downstream_response(resp, True)
    assert wire == (
        b"HTTP/1.1 418 I'm a teapot\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("start", "line"),
    [
        (b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"),
        (b"HTTP/1.2 404 Not  Found", b"HTTP/1.1 404 Not  Found"),
        (b"HTTP/1.0 204", b"HTTP/1.1 204 "),
        (b"HTTP/1.1 200 ", b"HTTP/1.1 200 "),
    ],
)
def test_the_client_gets_our_protocol_version_with_the_apps_code_and_reason(
    start: bytes, line: bytes
) -> None:
    wire = downstream_response(response(b"Content-Length: 0", start=start), True)
    assert wire.startswith(line + b"\r\n")
    assert parse_response(wire_head(wire), b"GET").status == int(start[9:12])


def test_an_interim_response_gets_our_version_and_no_framing() -> None:
    resp = response(b"Link: </s.css>", b"Content-Length: 3", start=b"HTTP/1.0 103 Early Hints")
    assert interim_response(resp) == b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"


# -- framing is written from the fields, whatever Connection names ----------------------------


CONNECTION_NAMING_FRAMING = [
    b"Connection: content-length",
    b"Connection: keep-alive, Content-Length",
    b"Connection: transfer-encoding, content-length, host",
]


@pytest.mark.parametrize("connection", CONNECTION_NAMING_FRAMING)
def test_connection_cannot_strip_a_request_content_length(connection: bytes) -> None:
    req = request(b"Host: h", connection, b"Content-Length: 11", start=b"POST / HTTP/1.1")
    up = sent_upstream(req)
    assert values(up.headers, b"Content-Length") == [b"11"]
    assert (up.framing, up.length) == (LENGTH, 11)


@pytest.mark.parametrize("connection", CONNECTION_NAMING_FRAMING)
def test_connection_cannot_strip_a_request_chunked_coding(connection: bytes) -> None:
    req = request(b"Host: h", connection, b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.1")
    up = sent_upstream(req)
    assert values(up.headers, b"Transfer-Encoding") == [b"chunked"]
    assert values(up.headers, b"Content-Length") == []
    assert up.framing == CHUNKED


@pytest.mark.parametrize("connection", CONNECTION_NAMING_FRAMING)
@pytest.mark.parametrize("keep_alive", [True, False])
def test_connection_cannot_strip_a_response_content_length(
    connection: bytes, keep_alive: bool
) -> None:
    down = sent_downstream(response(connection, b"Content-Length: 5"), keep_alive)
    assert values(down.headers, b"Content-Length") == [b"5"]
    assert (down.framing, down.length) == (LENGTH, 5)


@pytest.mark.parametrize("connection", CONNECTION_NAMING_FRAMING)
def test_connection_cannot_strip_the_host(connection: bytes) -> None:
    up = sent_upstream(request(b"Host: app.example", connection))
    assert values(up.headers, b"Host") == [b"app.example"]


@pytest.mark.parametrize("lengths", [[b"05", b"05"], [b"5", b"5", b"5"]])
def test_duplicate_content_lengths_are_relayed_as_the_one_length(lengths: list[bytes]) -> None:
    req = request(*(b"Content-Length: " + n for n in lengths), start=b"PUT / HTTP/1.1")
    assert values(sent_upstream(req).headers, b"Content-Length") == [b"5"]
    resp = response(*(b"Content-Length: " + n for n in lengths))
    assert values(sent_downstream(resp, True).headers, b"Content-Length") == [b"5"]


@pytest.mark.parametrize(("method", "status"), [(b"HEAD", 200), (b"GET", 304)])
def test_a_bodiless_answer_keeps_the_apps_stated_length(method: bytes, status: int) -> None:
    resp = response(b"Content-Length: 1234", start=b"HTTP/1.1 %d X" % status, method=method)
    down = sent_downstream(resp, True, method)
    assert values(down.headers, b"Content-Length") == [b"1234"]
    assert down.framing == NO_BODY


@pytest.mark.parametrize("status", [204, 101])
def test_a_content_length_on_a_204_or_1xx_is_not_relayed(status: int) -> None:
    resp = response(b"Content-Length: 7", start=b"HTTP/1.1 %d X" % status)
    assert values(sent_downstream(resp, True).headers, b"Content-Length") == []


def test_a_request_without_a_body_gets_no_framing_headers() -> None:
    up = sent_upstream(request(b"Host: h"))
    assert values(up.headers, b"Content-Length") == values(up.headers, b"Transfer-Encoding") == []


def test_an_empty_request_body_keeps_its_content_length_zero() -> None:
    up = sent_upstream(request(b"Host: h", b"Content-Length: 0", start=b"POST / HTTP/1.1"))
    assert values(up.headers, b"Content-Length") == [b"0"]


def test_an_until_close_response_tells_the_client_it_will_close() -> None:
    resp = response(b"Content-Type: text/plain")
    assert resp.framing == UNTIL_CLOSE
    down = parse_response(wire_head(downstream_response(resp, False)), b"GET")
    assert values(down.headers, b"Connection") == [b"close"]
    assert down.framing == UNTIL_CLOSE


@pytest.mark.parametrize("keep_alive", [True, False])
def test_a_101_response_grants_the_upgrade_to_the_client(keep_alive: bool) -> None:
    resp = response(
        b"connection: upgrade",
        b"upgrade: websocket",
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        start=b"HTTP/1.1 101 Switching Protocols",
    )
    wire = downstream_response(resp, keep_alive)
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in wire
    assert b"close" not in wire
    down = parse_response(wire_head(wire), b"GET")
    assert values(down.headers, b"Connection") == [b"Upgrade"]
    assert values(down.headers, b"Upgrade") == [b"websocket"]
    assert down.upgrade


def test_a_response_transfer_coding_before_chunked_is_not_lost() -> None:
    try:
        resp = response(b"Transfer-Encoding: gzip, chunked")
    except HttpError:
        return  # refusing it is fine too
    down = sent_downstream(resp, keep_alive=True)
    assert values(down.headers, b"Transfer-Encoding") == [b"gzip, chunked"]


# -- json_response ----------------------------------------------------------------------------


def split_message(message: bytes) -> tuple[ResponseHead, bytes]:
    head, _, body = message.partition(END_OF_HEAD)
    return parse_response(head, b"GET"), body


@pytest.mark.parametrize(("status", "reason"), sorted(REASONS.items()))
def test_json_response_status_line_carries_the_reason(status: int, reason: bytes) -> None:
    message = json_response(status, b'{"error": "x"}')
    assert message.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))
    assert split_message(message)[0].status == status


def test_json_response_with_an_unlisted_status_says_unknown() -> None:
    assert json_response(418, b"{}").startswith(b"HTTP/1.1 418 Unknown\r\n")


@pytest.mark.parametrize("body", [b"", b"{}", b'{"ok": true, "s": "\xc3\xa9t\xc3\xa9"}'])
def test_json_response_content_length_is_the_body_length(body: bytes) -> None:
    resp, sent = split_message(json_response(200, body))
    assert sent == body
    assert values(resp.headers, b"Content-Length") == [b"%d" % len(body)]
    assert values(resp.headers, b"Content-Type") == [b"application/json"]
    assert resp.length == len(body)


def test_json_response_closes_the_connection_unless_kept_alive() -> None:
    closing, _ = split_message(json_response(503, b"{}"))
    assert values(closing.headers, b"Connection") == [b"close"]
    assert closing.keep_alive is False
    kept, _ = split_message(json_response(200, b"{}", keep_alive=True))
    assert values(kept.headers, b"Connection") == []
    assert kept.keep_alive


# -- ChunkedScanner ---------------------------------------------------------------------------

BODY = (
    b"5;ext=1\r\nhello\r\n"
    b'7;name="quoted;value"\r\n, world\r\n'
    b"A\r\n\r\n12345678\r\n"  # chunk data may contain CRLF
    b"0;last\r\n"
    b"X-Checksum: abc\r\n"
    b"X-Other: 1\r\n"
    b"\r\n"
)


def test_scanner_finds_the_end_of_a_body_with_extensions_and_trailers() -> None:
    assert scan(BODY) == len(BODY)


def test_scanner_finds_the_end_of_the_smallest_body() -> None:
    assert scan(b"0\r\n\r\n") == 5


def test_scanner_does_not_count_bytes_after_the_end() -> None:
    following = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n0\r\n\r\n"
    assert scan(BODY + following) == len(BODY)
    assert scan(BODY + following, pieces=len(BODY + following)) == len(BODY)


def test_scanner_needs_more_until_the_last_byte_arrives() -> None:
    scanner = ChunkedScanner()
    for i in range(len(BODY) - 1):
        assert scanner.feed(BODY[i : i + 1]) == -1
    assert scanner.feed(BODY[-1:] + b"extra") == 1


@pytest.mark.parametrize("incomplete", [b"", b"5", b"5\r", b"5\r\nhel", b"5\r\nhello\r\n0\r\n"])
def test_scanner_reports_minus_one_for_an_incomplete_body(incomplete: bytes) -> None:
    assert ChunkedScanner().feed(incomplete) == -1


@pytest.mark.parametrize(
    "body",
    [
        b"A\r\n0123456789\r\n0\r\n\r\n",
        b"a\r\n0123456789\r\n0\r\n\r\n",
        b"1F\r\n" + b"x" * 31 + b"\r\n0\r\n\r\n",
        b"00000000000000a\r\n0123456789\r\n000\r\n\r\n",
        b"FF\r\n" + b"y" * 255 + b"\r\n0\r\n\r\n",
    ],
)
def test_scanner_reads_hex_sizes_in_either_case_and_with_leading_zeros(body: bytes) -> None:
    assert scan(body + b"tail") == len(body)
    assert scan(body + b"tail", pieces=len(body) + 4) == len(body)


def test_scanner_can_be_reused_for_the_next_body() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"3\r\nabc\r\n0\r\n\r\nrest") == len(b"3\r\nabc\r\n0\r\n\r\n")
    assert scanner.feed(b"2\r\nxy\r\n0\r\n\r\n") == len(b"2\r\nxy\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"0x10\r\n",
        b"-1\r\n",
        b"+1\r\n",
        b"1_0\r\n",
        b"\r\n",
        b";ext\r\n",
        b" 1\r\n",
        b"g\r\n",
        b"1 2\r\n",
        b"1" * 16 + b"\r\n",  # more than 15 hex digits
        b"3\r\nabcd\r\n",  # data longer than declared
        b"3\r\nabcX\r\n",
        b"3\r\nabc\n",  # LF only after data
        b"3\nabc\r\n",  # LF only after the size
        b"0\r\n\n",  # LF only to end the trailers
        b"0\r\nX-T: 1\n\r\n",  # LF only after a trailer
        # Found by tests/test_http1_differential.py: llhttp refuses these, we relayed them.
        b"1;e\rx\r\na\r\n0\r\n\r\n",  # a bare CR: a line end to some parsers
        b"1;e\x01\r\na\r\n0\r\n\r\n",
        b"1 \r\na\r\n0\r\n\r\n",  # whitespace after the size
        b"1 ;e\r\na\r\n0\r\n\r\n",
        b"1;e=a b\r\na\r\n0\r\n\r\n",
        b"1;\r\na\r\n0\r\n\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\nX-T: a\rb\r\n\r\n",
        b"0\r\nX-T: a\x01\r\n\r\n",
        b"0\r\n folded\r\n\r\n",
        b"0\r\n: no-name\r\n\r\n",
        # Found by atheris (tests/atheris_fuzz.py): llhttp refuses a framing field in the
        # trailers; RFC 9110 §6.5.1 forbids framing and routing fields there.
        b"0\r\nContent-Length: 0\r\n\r\n",
        b"0\r\ncontent-length: 5\r\n\r\n",
        b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"0\r\nX-T: 1\r\nHost: other\r\n\r\n",
        b"0\r\nTrailer: X\r\n\r\n",
    ],
)
@pytest.mark.parametrize("pieces", [1, 2], ids=["whole", "byte-by-byte"])
def test_scanner_refuses_malformed_chunked_bodies(data: bytes, pieces: int) -> None:
    with pytest.raises(HttpError) as caught:
        scan(data, pieces=pieces)
    assert caught.value.status == 400


@pytest.mark.parametrize("prefix", [b"1;", b"0\r\nX-Trailer: "], ids=["size-line", "trailer"])
def test_scanner_refuses_a_line_over_8_kib_while_buffering_it(prefix: bytes) -> None:
    scanner = ChunkedScanner()
    buffered = len(prefix) - (prefix.rfind(b"\n") + 1)  # the part of the prefix on the line
    filler = b"a" * (8192 - buffered)
    assert scanner.feed(prefix + filler) == -1  # exactly 8 KiB buffered is still fine
    with pytest.raises(HttpError) as caught:
        scanner.feed(b"a")
    assert caught.value.status == 400
    assert "too long" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"1;" + b"a" * 9000 + b"\r\nx\r\n0\r\n\r\n", b"0\r\nX-T: " + b"a" * 9000 + b"\r\n\r\n"],
    ids=["size-line", "trailer"],
)
def test_scanner_refuses_a_line_over_8_kib_arriving_in_one_piece(data: bytes) -> None:
    with pytest.raises(HttpError):
        scan(data)


# -- ChunkedScanner: property -----------------------------------------------------------------

_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~",
    min_size=1,
    max_size=8,
).map(str.encode)
_VISIBLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16).map(
    str.encode
)


@st.composite
def _size_line(draw: st.DrawFn, size: int) -> bytes:
    digits = b"%x" % size
    if draw(st.booleans()):
        digits = digits.upper()
    digits = b"0" * draw(st.integers(0, 3)) + digits
    extensions = draw(st.lists(st.tuples(_TOKEN, st.one_of(st.none(), _TOKEN)), max_size=3))
    for name, value in extensions:
        digits += b";" + name + (b"" if value is None else b"=" + value)
    return digits + b"\r\n"


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """(a complete chunked body, bytes that follow it, cut points into body + following)."""
    body = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=300), max_size=8)):
        body += draw(_size_line(len(data))) + data + b"\r\n"
    body += draw(_size_line(0))
    for name, value in draw(st.lists(st.tuples(_TOKEN, _VISIBLE), max_size=4)):
        body += name + b": " + value + b"\r\n"
    body += b"\r\n"
    following = draw(st.binary(max_size=64))
    total = len(body) + len(following)
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=20)))
    return body, following, cuts


@settings(max_examples=300, deadline=None)
@given(chunked_streams())
def test_scanner_ends_exactly_at_the_body_end_however_the_bytes_are_split(
    stream: tuple[bytes, bytes, list[int]],
) -> None:
    body, following, cuts = stream
    data = body + following
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in pairwise(bounds)]
    scanner = ChunkedScanner()
    consumed = 0
    for piece in pieces:
        n = scanner.feed(piece)
        if n < 0:
            consumed += len(piece)
            assert consumed < len(body)
            continue
        assert 0 <= n <= len(piece)
        consumed += n
        break
    else:
        pytest.fail("the scanner never found the end of a complete body")
    assert consumed == len(body)


# -- may_send_again ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE"])
def test_safe_methods_may_be_sent_again(method: bytes) -> None:
    assert may_send_again(request(b"Host: h", start=method + b" / HTTP/1.1"))


@pytest.mark.parametrize(
    "method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"CONNECT", b"get", b"PROPFIND"]
)
def test_other_methods_are_never_sent_twice(method: bytes) -> None:
    assert not may_send_again(request(b"Host: h", start=method + b" / HTTP/1.1"))


@pytest.mark.parametrize(
    "key",
    [b"Idempotency-Key: k", b"idempotency-key: k", b"X-Idempotency-Key: k", b"X-IDEMPOTENCY-KEY:"],
)
def test_an_idempotency_key_lets_any_request_be_sent_again(key: bytes) -> None:
    assert may_send_again(request(b"Host: h", key, start=b"POST /charge HTTP/1.1"))


def test_a_similar_header_is_no_idempotency_key() -> None:
    req = request(b"Idempotency: k", b"X-Idempotency-Keys: k", start=b"POST / HTTP/1.1")
    assert not may_send_again(req)
