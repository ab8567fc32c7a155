"""The proxy's request framing against two independent parsers: llhttp (httptools) and h11.

The same bytes (valid, near-valid and hostile requests, pipelined) go to freeze_proxy.http1 as the
relay uses it and to each reference parser. Whenever both accept a message they must frame it
identically: same method, target, decoded body and end offset (hence the same next-request
boundary). Where they disagree on acceptance, ours must be the one refusing: a message we accept
that a reference refuses or frames otherwise is what request smuggling is made of.

Classes where we accepted and a reference refused, each fixed in http1.py (tests in
tests/test_http1.py, seen failing first; the inputs are in FOUND below):

- a control character (0x01-0x1f but HTAB, 0x7f) in a header or trailer value: llhttp and Go
  refuse it; a vertical tab or a bare CR is whitespace or a line end to some parsers.
- a request target with a byte outside visible ASCII (a CTL, a tab, 0x80-0xff): llhttp, h11 and Go
  refuse CTLs, h11 everything but visible ASCII (Go's client percent-encodes such bytes).
- a chunk-size line with a bare CR or a CTL in an extension, whitespace after the size
  (``1 ``, ``1 ;e``), an extension not ``;token[=token|quoted-string]``: llhttp refuses all of
  them, and the relay passes chunk lines on as they are, so the app reads what we let through.
- a trailer line without a colon, with a folded line or a CTL: llhttp and h11 refuse it.
- ``Content-Length: 5`` repeated as ``05``: the same number, but h11 and Go compare the text.

Classes where a reference refuses and we accept, not framing questions (allowed, in ALLOWED):

- llhttp refuses a method token it does not know (``get``, ``G@T``, ``PATCHp``): it knows a
  fixed list; RFC 9110, Go and h11 accept any token, and a request's method does not frame its
  body.
- llhttp refuses a repeated Content-Length even with the same text; we relay the one length.

Classes where we refuse and a reference accepts (allowed: stricter is safe): bare LF line ends and
obs-fold (h11), HTTP/1.2 and HTTP/2.0 request lines (h11, llhttp), two spaces in a request line
(llhttp), ``Content-Length: 5, 5`` (h11), Transfer-Encoding with Content-Length (h11 on HTTP/1.0).
h11 is compared up to the first HTTP/1.1 request without a Host header (it requires one, as Go
does; we leave that to the app). An Upgrade or CONNECT ends the comparison: a tunnel follows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import httptools
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from freeze_proxy import http1
from freeze_proxy.http1 import CHUNKED, END_OF_HEAD, LENGTH, NO_BODY, ChunkedScanner, HttpError
from tests.fuzz_budget import Cases, budget, run_fuzz
from tests.proxy_harness import start_harness
from tests.reliability_report import write_figure

pytestmark = pytest.mark.fuzz

# -- one message as each parser frames it ------------------------------------------------------


@dataclass(frozen=True)
class Message:
    method: bytes
    target: bytes
    body: bytes  # decoded
    end: int  # offset just past the message in the whole byte string


@dataclass
class Framing:
    messages: list[Message] = field(default_factory=list)
    # "refused" | "incomplete" (a head) | "in-body" | "done" | "tunnel" | "closed"
    outcome: str = "incomplete"
    why: str = ""


def decode_chunked(raw: bytes) -> bytes:
    """The payload of a chunked body our scanner accepted (its grammar is already checked)."""
    out = []
    pos = 0
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end].split(b";", 1)[0].strip(b" \t"), 16)
        pos = line_end + 2
        if size == 0:
            return b"".join(out)
        out.append(raw[pos : pos + size])
        pos += size + 2


def ours(data: bytes) -> Framing:
    """Frame ``data`` as the relay does: a head up to the blank line, then its body."""
    result = Framing()
    pos = 0
    while pos < len(data):
        end = data.find(END_OF_HEAD, pos)
        if end < 0 or end - pos > http1.MAX_HEAD:
            return result
        try:
            req = http1.parse_request(data[pos:end])
        except HttpError as exc:
            result.outcome, result.why = "refused", str(exc)
            return result
        body_start = end + 4
        if req.framing == NO_BODY:
            body, stop = b"", body_start
        elif req.framing == LENGTH:
            if len(data) - body_start < req.length:
                result.outcome = "in-body"
                return result
            stop = body_start + req.length
            body = data[body_start:stop]
        else:
            assert req.framing == CHUNKED
            try:
                used = ChunkedScanner().feed(data[body_start:])
            except HttpError as exc:
                result.outcome, result.why = "refused", str(exc)
                return result
            if used < 0:
                result.outcome = "in-body"
                return result
            stop = body_start + used
            body = decode_chunked(data[body_start:stop])
        result.messages.append(Message(req.method, req.target, body, stop))
        pos = stop
        if req.upgrade:
            result.outcome = "tunnel"
            return result
        if not req.keep_alive:
            result.outcome = "closed"
            return result
    result.outcome = "done"
    return result


class _LlhttpRecorder:
    def __init__(self) -> None:
        self.url = b""
        self.body = b""
        self.complete = False
        self.keep_alive = False
        self.method = b""
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.url, self.body, self.complete = b"", b"", False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()  # before llhttp resets its flags
        self.method = self.parser.get_method()


def llhttp(data: bytes) -> Framing:
    """Frame ``data`` with llhttp (strict, as httptools sets it), a byte at a time so each
    message's end offset is known."""
    rec = _LlhttpRecorder()
    parser = httptools.HttpRequestParser(rec)
    rec.parser = parser
    result = Framing()
    for i in range(len(data)):
        try:
            parser.feed_data(data[i : i + 1])
        except httptools.HttpParserUpgrade:
            result.outcome = "tunnel"
            return result
        except httptools.HttpParserError as exc:
            result.outcome, result.why = "refused", str(exc)
            return result
        if rec.complete:
            rec.complete = False
            result.messages.append(Message(rec.method, rec.url, rec.body, i + 1))
            if not rec.keep_alive:
                result.outcome = "closed"
                return result
    if not data or (result.messages and result.messages[-1].end == len(data)):
        result.outcome = "done"
    return result


def h11_framing(data: bytes) -> Framing:
    """Frame ``data`` with h11, answering each request so the next one is parsed."""
    result = Framing()
    if not data:  # to h11, receiving b"" means the peer closed
        result.outcome = "done"
        return result
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=http1.MAX_HEAD)
    conn.receive_data(data)
    request: h11.Request | None = None
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            result.outcome, result.why = "refused", str(exc)
            return result
        if event is h11.NEED_DATA:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                result.outcome = "done"
            return result
        if event is h11.PAUSED:
            if conn.their_state is h11.SWITCHED_PROTOCOL or conn.their_state is h11.MUST_CLOSE:
                result.outcome = "tunnel" if request is None else "closed"
            if conn.their_state is h11.MUST_CLOSE:
                result.outcome = "closed"
            return result
        if isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            end = len(data) - len(conn.trailing_data[0])
            result.messages.append(Message(request.method, request.target, body, end))
            if conn.their_state is h11.MUST_CLOSE:
                result.outcome = "closed"
                return result
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
            request = None


# -- hostile requests ---------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"] * 3 + [b"get", b"G@T"]
TARGETS = [b"/", b"/a?b=c&d=%20", b"*", b"http://h.example/x", b"/%00"] * 4
TARGETS += [b"/\x01", b"/\x7f", b"/\xff", b"/a\tb", b"/a\x0bb"]
VERSIONS = [b"HTTP/1.1"] * 18 + [b"HTTP/1.0"] * 6 + [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"]
TE_VALUES = [b"chunked"] * 4 + [
    b"Chunked",
    b"CHUNKED",
    b" chunked",
    b"\tchunked",
    b"chunked ",
    b"chunked, identity",
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked,",
    b",chunked",
    b"chunked;q=1",
    b"xchunked",
    b"identity",
    b"chunked\x0b",
    b"chun ked",
]
TE_NAMES = [b"Transfer-Encoding"] * 6 + [
    b"transfer-encoding",
    b"Transfer-Encoding ",
    b"Transfer_Encoding",
    b" Transfer-Encoding",
    b"Transfer-Encoding\t",
]
CL_NAMES = [b"Content-Length"] * 6 + [b"content-length", b"Content-Length ", b" Content-Length"]
SEPARATORS = [b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]
VALUE_BYTES = st.one_of(
    st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b"\r").replace(b"\n", b"\r")),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.encode),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.encode),
)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=20))
        size = draw(
            st.sampled_from(
                [b"%x" % len(data)] * 6
                + [
                    b"%X" % len(data),
                    b"000%x" % len(data),
                    b"0x%x" % len(data),
                    b" %x" % len(data),
                    b"%x " % len(data),
                    b"+%x" % len(data),
                    b"-%x" % len(data),
                    b"%x" % (len(data) + 1),
                    b"1" + b"0" * 16 + b"%x" % len(data),
                    b"%x;ext=1" % len(data),
                    b'%x;ext="a b"' % len(data),
                    b"%x ;ext" % len(data),
                    b"%x;e\rx" % len(data),
                    b"%x;e\x01" % len(data),
                ]
            )
        )
        parts.append(size + draw(st.sampled_from(SEPARATORS)) + data + b"\r\n")
    last = draw(st.sampled_from([b"0", b"00", b"0;ext", b"000000000000000000", b"0x0", b"0 "]))
    trailer = draw(
        st.sampled_from(
            [b""] * 6 + [b"X-T: 1\r\n", b"X-T: a\rb\r\n", b"bad trailer\r\n", b"X-T: 1\n"]
        )
    )
    end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"", b"\r\n\r\n"]))
    return b"".join(parts) + last + b"\r\n" + trailer + end


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS))
    start = draw(st.sampled_from([b"%s %s %s", b"%s %s %s"] * 6 + [b"%s  %s %s", b"%s %s  %s"]))
    lines = [start % (method, target, version), b"Host: h.example"]
    body = b""
    framing = draw(st.sampled_from(["none", "length", "chunked", "both", "two-lengths", "junk"]))
    if framing in ("length", "both", "two-lengths"):
        body = draw(st.binary(max_size=30))
        value = draw(
            st.sampled_from(
                [b"%d" % len(body)] * 5
                + [
                    b"0%d" % len(body),
                    b"+%d" % len(body),
                    b"-1",
                    b" %d " % len(body),
                    b"%d, %d" % (len(body), len(body)),
                    b"%d,%d" % (len(body), len(body) + 1),
                    b"0x%x" % len(body),
                    b"99999999999999999999999",
                    b"",
                    b"%d\x0b" % len(body),
                ]
            )
        )
        lines.append(draw(st.sampled_from(CL_NAMES)) + b": " + value)
        if framing == "two-lengths":
            other = draw(st.sampled_from([len(body), len(body) + 1, 0]))
            lines.append(b"Content-Length: %d" % other)
    if framing in ("chunked", "both"):
        name = draw(st.sampled_from(TE_NAMES))
        lines.append(name + b": " + draw(st.sampled_from(TE_VALUES)))
        if draw(st.booleans()) and draw(st.booleans()):
            lines.append(b"Transfer-Encoding: " + draw(st.sampled_from(TE_VALUES)))
        body = draw(chunked_body())
    if framing == "junk":
        body = draw(st.binary(max_size=20))
    extra = draw(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [b"Connection: close", b"Connection: keep-alive", b"X-A: 1", b"Accept: */*"] * 6
                    + [
                        b" folded",
                        b"\tfolded",
                        b"X-Nul: a\x00b",
                        b"X-Cr: a\rb",
                        b"X-Ctl: a\x01b",
                        b"X-Del: a\x7fb",
                        b"X-Obs: caf\xc3\xa9",
                        b"X-Empty:",
                        b": no-name",
                        b"No-Colon",
                        b"X-Sp : 1",
                        b"Expect: 100-continue",
                    ]
                ),
                st.builds(lambda v: b"X-R: " + v, VALUE_BYTES),
            ),
            max_size=3,
        )
    )
    positions = draw(st.permutations(range(len(lines) - 1 + len(extra))))
    header_lines = lines[1:] + extra
    ordered = [lines[0]] + [header_lines[i] for i in positions]
    seps = [draw(st.sampled_from(SEPARATORS)) for _ in ordered]
    head = b"".join(line + sep for line, sep in zip(ordered, seps, strict=True))
    return head + draw(st.sampled_from([b"\r\n"] * 20 + [b"\n", b""])) + body


SIMPLE_NEXT = b"GET /next HTTP/1.1\r\nHost: h.example\r\n\r\n"
PIPELINED = st.one_of(
    request_bytes(),
    st.tuples(request_bytes(), st.sampled_from([SIMPLE_NEXT])).map(b"".join),
    st.tuples(request_bytes(), request_bytes()).map(b"".join),
)

# The inputs that found each class above, kept as explicit examples.
FOUND = [
    b"GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Ctl: a\x01b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;e\rx\r\na\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\rb\r\n\r\n",
]


# A reference refusal of these kinds is not a framing question (see the module docstring).
# (llhttp knows a fixed list of methods: a token it does not know is "Invalid method", one that
# starts like a known one, ``PATCHp``, is "Expected space after method"; found by atheris.)
# h11 requires Host on an HTTP/1.1 request, as Go's server does; we leave that to the app, so
# h11 is compared up to the first message without one (found per message by atheris: a stream
# whose later message had a Host passed the old whole-stream filter).
ALLOWED = {
    "llhttp": (
        "Invalid method encountered",
        "Expected space after method",
        "Duplicate Content-Length",
    ),
    "h11": ("Missing mandatory Host: header",),
}


# Inputs atheris (tests/atheris_fuzz.py) found, now examples of every run: a method llhttp does
# not know, a target in none of the four forms, two Host headers, an empty stream, an absolute
# target without ``//``, a Content-Length trailer.
ATHERIS_FOUND = [
    b"PATCHp / HTTP/1.1\r\nHost: h\r\nContent-Length: 05\r\nX-Obs: caf\xc3\xa9\r\n\r\n12345",
    b"HEAD o HTTP/1.1\r\nHost: h\r\n\r\nDEuE /x?y=% 02THTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost:HTTP/1.1\r\nHost: h\r\n\r\n",
    b"PUT /c HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\nPUT /c HTTP/1.1\r\nHo3t: h\r\n\r\n",
    b"",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nPOST t:/ HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\nContent-Length: 0\r\n\r\n",
]


# Valid shapes every parser must frame alike, and the relay must pass on as framed.
VALID = [
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5;ext=1\r\nhello\r\n7;n="q;v"\r\n, world\r\n0\r\nX-T: 1\r\n\r\n'
    b"PUT /c HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\nDELETE /x?y=%20 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nok",
    b"PATCH /p HTTP/1.1\r\nHost: h\r\nContent-Length: 05\r\nX-Obs: caf\xc3\xa9\r\n\r\n12345",
]


def _agrees(ref_name: str, ref: Framing, our: Framing, data: bytes) -> None:
    """Every message we frame, the reference frames the same; a message we accept that the
    reference refuses or frames otherwise fails the test."""
    mine_all = our.messages
    if ref.why in ALLOWED.get(ref_name, ()):
        mine_all = mine_all[: len(ref.messages)]  # up to the message it refused
    if ref.outcome == "closed":  # h11 closes after an HTTP/1.0 request, keep-alive or not
        mine_all = mine_all[: len(ref.messages)]
    for k, mine in enumerate(mine_all):
        assert k < len(ref.messages), (
            f"we accept message {k} that {ref_name} does not ({ref.outcome}: {ref.why}): {data!r}"
        )
        assert mine == ref.messages[k], f"{ref_name} frames message {k} otherwise: {data!r}"
    if (
        our.outcome == "in-body"
        and mine_all == our.messages
        and len(ref.messages) > len(our.messages)
    ):
        # We would read on into what the reference takes for the next request.
        pytest.fail(f"{ref_name} ends message {len(our.messages)} where we read on: {data!r}")


def check_stream(data: bytes) -> None:
    """The bytes as a (pipelined) request stream: every message we frame, both references frame
    alike (the check the test below and the atheris run, tests/atheris_fuzz.py, share)."""
    our = ours(data)
    _agrees("llhttp", llhttp(data), our, data)
    _agrees("h11", h11_framing(data), our, data)


def test_our_framing_is_llhttps_and_h11s_where_we_accept() -> None:
    cases = Cases()

    @budget(400)
    @given(PIPELINED)
    def check(data: bytes) -> None:
        cases()
        check_stream(data)

    for found in FOUND + VALID + ATHERIS_FOUND:
        check = example(found)(check)
    run_fuzz("http1_differential", cases, check)


@pytest.mark.parametrize("data", FOUND)
def test_found_smuggling_shapes_are_refused(data: bytes) -> None:
    assert ours(data).outcome == "refused"
    assert llhttp(data).outcome == "refused"


# -- the same bytes through the real relay -------------------------------------------------------


def _at_least(seen: list[Message], n: int) -> bool:
    return len(seen) >= n


class RawApp(asyncio.Protocol):
    """The app: frames what the proxy sends with llhttp and answers each request at once."""

    def __init__(self, seen: list[Message]) -> None:
        self.seen = seen
        self.rec = _LlhttpRecorder()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        self.rec.on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.rec.on_url(url)

    def on_body(self, body: bytes) -> None:
        self.rec.on_body(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.seen.append(Message(method, self.rec.url, self.rec.body, 0))
        assert self.transport is not None
        body = b"" if method == b"HEAD" else b"ok"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.seen.append(
                Message(b"<the app could not parse what the proxy sent>", b"", data, 0)
            )
            assert self.transport is not None
            self.transport.close()


async def test_the_app_sees_exactly_the_requests_we_framed(tmp_path: Path) -> None:
    seen: list[Message] = []
    h = await start_harness(tmp_path, start_app=False)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RawApp(seen), "127.0.0.1", h.app_port)
    proxy_port = int(h.proxy_url.rsplit(":", 1)[1])
    cases = Cases()
    relayed = 0
    try:
        samples: list[bytes] = []

        @budget(60)
        @given(PIPELINED)
        def collect(data: bytes) -> None:
            samples.append(data)

        collect()
        for data in samples + FOUND + VALID:
            if b"pgrade" in data or b"Expect" in data:
                continue  # a tunnel or an interim answer: not a framing question
            if llhttp(data).why == "Invalid method encountered":
                continue  # the app's parser (llhttp) knows no such method
            cases()
            seen.clear()
            our = ours(data)
            expected = [(m.method, m.target, m.body) for m in our.messages]
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(data)
            if our.outcome in ("done",):
                writer.write(b"GET /end HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                expected.append((b"GET", b"/end", b""))
            if our.outcome in ("done", "refused", "closed"):
                await asyncio.wait_for(reader.read(), 5)  # the proxy closes after its answer
            else:  # incomplete: the proxy waits for more; the complete ones were relayed
                await h.wait_for(partial(_at_least, seen, len(expected)))
            writer.close()
            await h.wait_for(partial(_at_least, seen, len(expected)))
            got = [(m.method, m.target, m.body) for m in seen]
            assert got == expected, f"for {data!r}"
            relayed += len(our.messages)
    finally:
        server.close()
        await h.close()
    assert relayed >= 2 * len(VALID), "the sample relayed too few requests to say anything"
    run_fuzz("http1_relay_sample", cases, lambda: None)
    write_figure(
        "http1_relay_sample", fuzz="http1_relay_sample", cases=cases.n, failures=0, requests=relayed
    )
