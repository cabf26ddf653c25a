"""The server side of one local HTTP/1.1 connection: llhttp parses, a bytes template writes.

Sans-IO, in h11's shape and with h11's vocabulary: feed bytes with
:meth:`ServerConnection.receive_data`, take events with ``next_event``
(h11's ``Data``, ``EndOfMessage``, ``ConnectionClosed``, ``NEED_DATA``,
``PAUSED``, and a :class:`LocalRequest` head), turn a response into bytes with
``send``; the states are h11's (``IDLE``, ``SEND_BODY``, ``DONE``,
``MUST_CLOSE``, ...) and the errors are h11's ``RemoteProtocolError`` (with
its status hint) and ``LocalProtocolError``.

Why not h11 itself: on a JSON-RPC call through the tunnel h11 took about a
third of the agent's CPU (parsing the request ~25 µs, writing the answer
~25 µs); llhttp (the C parser behind Node.js, through httptools) parses the
same request in ~1 µs, and a response head written from its parts needs no
state machine beyond the few rules below.

Strictness is llhttp's (no obs-fold, no bare LF, no Content-Length together
with Transfer-Encoding, no duplicate Content-Length, valid tokens and header
bytes), plus what h11 refuses and llhttp lets through, checked here:
a Transfer-Encoding other than exactly ``chunked`` (501), a version other
than HTTP/1.0 or 1.1, an HTTP/1.1 request without exactly one ``Host``, and
a head larger than ``max_head_bytes`` (431; also one that arrives in pieces).

Framing of answers, as h11 does it: a ``Content-Length`` answer is sent as
it is; one without a length is chunked to an HTTP/1.1 client and
close-delimited to an HTTP/1.0 one; HEAD, 1xx, 204 and 304 answers have no
body. The connection is kept alive only for HTTP/1.1 without
``Connection: close`` on either side; otherwise the head says
``Connection: close``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence

import h11
import httptools

from carapace.runtime.http import ChunkFramingBound, reason_phrase

__all__ = ["LocalRequest", "ServerConnection"]

_NAME_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""Bytes a header value we write may not hold (CR, LF, NUL and the other controls)."""
_NO_BODY_STATUS = frozenset({204, 304})
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_END = h11.EndOfMessage()
_CLOSED = h11.ConnectionClosed()
_CHUNK_END = b"0\r\n\r\n"

# How the body of the answer being written is framed.
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = range(4)


class LocalRequest:
    """A request head as a local client sent it (bytes, original case and order)."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 http_version: bytes) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version

    def head_size(self) -> int:
        """About the bytes of the head on the wire (for the header limit)."""
        return len(self.method) + len(self.target) + sum(
            len(name) + len(value) + 4 for name, value in self.headers)


class _Bad(Exception):
    """Raised inside a parser callback: the request breaks a rule llhttp does not check."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServerConnection:
    """One local client's connection, as h11's ``Connection(h11.SERVER)`` would see it."""

    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.our_state: type = h11.IDLE
        self.their_state: type = h11.IDLE
        self.their_http_version: bytes | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[object] = deque()
        self._error: h11.RemoteProtocolError | None = None
        self._upgraded = False
        """llhttp stopped at a CONNECT or Upgrade request: nothing after it is parsed."""
        self._eof = False
        # The message being parsed.
        self._in_message = False
        self._in_head = False
        self._began_in_this_feed = False
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        # The request being answered.
        self._method = b""
        self._keep_alive = True
        self._framing = _NONE
        self._left = 0
        self._body_bytes = 0
        self._chunk_framing = ChunkFramingBound(self.max_head_bytes)

    # -- llhttp's callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = self._in_head = self._began_in_this_feed = True
        self._head_bytes = 0
        self._url = []
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not a trailer (those are read and dropped, as h11 does)
            self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Bad(f"unsupported HTTP version {version!r}")
        host = 0
        for name, value in self._headers:
            if len(name) == 17 and name.lower() == b"transfer-encoding" \
                    and value.lower() != b"chunked":
                raise _Bad("only Transfer-Encoding: chunked is supported", 501)
            if len(name) == 4 and name.lower() == b"host":
                host += 1
        if version == "1.1" and host != 1:
            raise _Bad("an HTTP/1.1 request needs exactly one Host header")
        keep_alive = version == "1.1" and parser.should_keep_alive()
        self._events.append((LocalRequest(
            parser.get_method(), b"".join(self._url), self._headers,
            b"1.1" if version == "1.1" else b"1.0"), keep_alive))

    def on_body(self, body: bytes) -> None:
        self._events.append(h11.Data(data=body))
        self._body_bytes += len(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(_END)

    # -- receiving ----------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed what the client sent; ``b""`` says it closed. Never raises: a protocol
        error comes out of :meth:`next_event` after the events before it."""
        if self._error is not None or self._eof:
            return
        if not data:
            self._eof = True
            if self._in_message and not self._upgraded:
                self._fail("the client closed the connection in the middle of a request")
            else:
                self._events.append(_CLOSED)
            return
        if self._upgraded:
            return
        self._began_in_this_feed = False
        body_before = self._body_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _Bad):
                self._fail(str(cause), cause.status)
            else:
                self._fail(f"malformed HTTP request: {exc}")
        except httptools.HttpParserError as exc:
            self._fail(str(exc) or "malformed HTTP request")
        else:
            if self._in_head and not self._began_in_this_feed:
                # Bounds a head that arrives in pieces (llhttp keeps what it has seen).
                # The read it began in is not counted (where in it the head began is
                # not known, and the rest may be the body before it): a complete head is
                # measured exactly later (LocalRequest.head_size), one still arriving at
                # most one read late.
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._fail("request head too large", 431)
            elif self._in_message and not self._in_head:
                if self._chunk_framing.exceeded(len(data), self._body_bytes - body_before):
                    self._fail(f"{self._chunk_framing.problem()}; send the body in chunks "
                               "with short size lines")

    def _fail(self, message: str, status: int = 400) -> None:
        self._error = h11.RemoteProtocolError(message, error_status_hint=status)

    def next_event(self) -> object:
        """The next event of the request being read (h11's classes), NEED_DATA or PAUSED."""
        events = self._events
        if self.their_state is h11.DONE or self.their_state is h11.MUST_CLOSE:
            return h11.PAUSED if events else h11.NEED_DATA
        if not events:
            if self._error is not None:
                self.their_state = h11.ERROR
                raise self._error
            return h11.NEED_DATA
        event = events.popleft()
        if type(event) is tuple:
            request, keep_alive = event
            self._method = request.method
            self._keep_alive = keep_alive and not self._upgraded_at_end()
            self.their_http_version = request.http_version
            self.their_state = h11.SEND_BODY
            if self.our_state is h11.IDLE:
                self.our_state = h11.SEND_RESPONSE
            return request
        if event is _END:
            self.their_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        elif event is _CLOSED:
            self.their_state = h11.CLOSED
        return event

    def _upgraded_at_end(self) -> bool:
        """Whether llhttp stopped after the request just taken (then nothing follows it)."""
        return self._upgraded and not any(type(e) is tuple for e in self._events)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """For h11 compatibility: parsed ahead, so only whether the client closed."""
        return b"", self._eof

    # -- sending ------------------------------------------------------------------
    def send(self, event: object) -> bytes:
        """The bytes for an h11 ``Response``, ``Data`` or ``EndOfMessage``."""
        kind = type(event)
        if kind is h11.Data:
            return self.send_data(event.data)  # type: ignore[attr-defined]
        if kind is h11.EndOfMessage:
            return self.send_end()
        if kind is h11.Response:
            return self.send_head(event.status_code,  # type: ignore[attr-defined]
                                  event.headers.raw_items())  # type: ignore[attr-defined]
        raise h11.LocalProtocolError(f"cannot send {kind.__name__} here")

    def send_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """A response head; the framing headers are chosen here (see the module doc)."""
        if self.our_state is not h11.SEND_RESPONSE and self.our_state is not h11.IDLE:
            raise h11.LocalProtocolError(f"cannot send a response in state {self.our_state}")
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
        length: bytes | None = None
        names: list[bytes] = []
        values: list[bytes] = []
        for name, value in headers:
            lower = name.lower()
            if lower in _FRAMING:
                if lower == b"content-length":
                    length = value
                continue
            names.append(name)
            values.append(value)
            lines.append(b"%s: %s\r\n" % (name, value))
        # One regex over all names (tokens joined are a token) and one over all values.
        if names and (not _NAME_OK.match(b"".join(names)) or not all(names)
                      or _VALUE_BAD.search(b"".join(values))):
            raise h11.LocalProtocolError("illegal header in the answer")
        keep_alive = self._keep_alive and self.their_state is not h11.ERROR \
            and self.their_http_version is not None
        if length is not None:
            if not length.isdigit():
                raise h11.LocalProtocolError(f"bad Content-Length {length!r}")
            lines.append(b"Content-Length: %s\r\n" % length)
        if status < 200 or status in _NO_BODY_STATUS or self._method == b"HEAD":
            self._framing = _NONE
        elif length is not None:
            self._framing = _LENGTH
            self._left = int(length)
        elif self.their_http_version == b"1.1":
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self._framing = _CHUNKED
        else:
            self._framing = _UNTIL_CLOSE
            keep_alive = False
        if not keep_alive:
            self._keep_alive = False
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.our_state = h11.SEND_BODY
        return b"".join(lines)

    def send_data(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError(f"cannot send body data in state {self.our_state}")
        if not data:
            return b""
        framing = self._framing
        if framing == _CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if framing == _LENGTH:
            if len(data) > self._left:
                raise h11.LocalProtocolError("Too much data for declared Content-Length")
            self._left -= len(data)
            return bytes(data)
        if framing == _UNTIL_CLOSE:
            return bytes(data)
        raise h11.LocalProtocolError("this response has no body")

    def send_end(self) -> bytes:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError(f"cannot end a response in state {self.our_state}")
        if self._framing == _LENGTH and self._left:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        self.our_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        return _CHUNK_END if self._framing == _CHUNKED else b""

    def send_whole(self, status: int, headers: Sequence[tuple[bytes, bytes]],
                   body: bytes) -> bytes:
        """Head, body and end of a complete answer, in one piece."""
        head = self.send_head(status, headers)
        if body and self._framing != _NONE:
            head += self.send_data(body)
        return head + self.send_end()

    def start_next_cycle(self) -> None:
        """Both sides are done and the connection stays open: read the next request."""
        if self.our_state is not h11.DONE or self.their_state is not h11.DONE:
            raise h11.LocalProtocolError("not in a reusable state")
        self.our_state = self.their_state = h11.IDLE
        self._method = b""
        self._keep_alive = True
        self._framing = _NONE
