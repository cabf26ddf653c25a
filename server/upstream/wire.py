"""One upstream connection's HTTP/1.1, client side: a request written from its parts, the
answer parsed by llhttp — with the slice of h11's client interface that ``client.py`` uses.

Sans-IO: :func:`request_bytes` checks and writes a request; a
:class:`ClientConnection` is told what was sent (:meth:`ClientConnection.sent`),
fed what arrives (``receive_data``, ``b""`` at EOF) and asked for events
(``next_event``): a :class:`ResponseHead`, then h11's ``Data`` and
``EndOfMessage``, or ``NEED_DATA``; a malformed answer raises h11's
``RemoteProtocolError``. Its states are h11's (``DONE``/``MUST_CLOSE`` once
the answer is in) and ``trailing_data`` says, as h11's does, whether
anything came after the answer, so the pool never reuses a confused
connection.

Why not h11: on a JSON-RPC call it was about a third of the server's own CPU
(building and validating the request, then parsing the answer's head with
its regexes and state machine); llhttp (Node.js's parser, through httptools)
parses the answer in about a microsecond.

Rules kept from h11: only ``Transfer-Encoding: chunked`` is read (anything
else is refused), HEAD, 1xx, 204 and 304 answers have no body, 1xx heads are
skipped, an answer without a length ends when the upstream closes (and then
the connection is not reused), a head over ``max_head`` bytes is refused,
and the connection is kept only for an HTTP/1.1 answer without
``Connection: close``. llhttp adds its own strictness (no Content-Length
beside Transfer-Encoding, no duplicate lengths, valid tokens and bytes).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import h11
import httptools

from carapace.runtime.http import ChunkFramingBound

__all__ = ["ClientConnection", "InvalidRequest", "ResponseHead", "request_bytes"]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_NO_BODY_STATUS = frozenset({204, 304})
_END = h11.EndOfMessage()


class InvalidRequest(ValueError):
    """The request cannot be written as valid HTTP/1.1 (a bad method, target or header)."""


def request_bytes(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                  body: bytes) -> bytes:
    """The whole request on the wire; ``headers`` must already hold the framing ones."""
    if not _TOKEN.match(method):
        raise InvalidRequest(f"illegal method {method!r}")
    if not target or _TARGET_BAD.search(target):
        raise InvalidRequest(f"illegal request target {target!r}")
    # One regex over all names (tokens joined are a token) and one over all values.
    names = [name for name, _ in headers]
    if headers and (not _TOKEN.match(b"".join(names)) or not all(names)
                    or _VALUE_BAD.search(b"".join([value for _, value in headers]))):
        for name, value in headers:
            if not name or not _TOKEN.match(name):
                raise InvalidRequest(f"illegal header name {name!r}")
            if _VALUE_BAD.search(value):
                raise InvalidRequest(f"illegal value in header {name!r}")
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"\r\n")
    if body:
        lines.append(body)
    return b"".join(lines)


class ResponseHead:
    """An answer's status line and headers (as received: original case, order, repeats)."""

    __slots__ = ("headers", "http_version", "reason", "status_code")

    def __init__(self, status_code: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 http_version: bytes) -> None:
        self.status_code = status_code
        self.reason = reason
        self.headers = headers
        self.http_version = http_version


class ClientConnection:
    """The client side of one keep-alive connection, one request/answer cycle at a time."""

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.our_state: type = h11.IDLE
        self.their_state: type = h11.IDLE
        self._eof = False
        self._new_cycle()

    def _new_cycle(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: deque[object] = deque()
        self._pieces: list[bytes] = []
        self._body_bytes = 0
        self._framing = ChunkFramingBound(self.max_head)
        """Body bytes of the current read: one ``Data`` per read, however many chunks
        it held (an event stream sends one chunk per event)."""
        self._error: h11.RemoteProtocolError | None = None
        self._head = True  # reading a head (an answer's, or a 1xx one's)
        self._head_bytes = 0
        self._reason: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._until_close = False
        self._complete = False
        self._stray = False
        """Something came after the answer: this connection must not carry another."""
        self._keep_alive = True
        self._head_request = False

    # -- what was sent ----------------------------------------------------------------
    def sent(self, method: bytes) -> None:
        """A whole request (:func:`request_bytes`) went out: now read its answer."""
        if self.our_state is not h11.IDLE:
            raise h11.LocalProtocolError("a request is already under way")
        self._head_request = method == b"HEAD"
        self.our_state = h11.DONE
        self.their_state = h11.SEND_RESPONSE

    # -- llhttp's callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            self._stray = True
        self._head = True
        self._reason = []
        self._headers = []

    def on_status(self, status: bytes) -> None:
        self._reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head:  # not a trailer (read and dropped, as h11 does)
            self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._head = False
        self._head_bytes = 0
        parser = self._parser
        status = parser.get_status_code()
        if self._complete:
            return
        if status < 200:
            if status == 101:
                raise _Refused("the upstream switched protocols")
            self._informational = True  # 100 Continue and friends: the real head follows
            return
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refused(f"unsupported HTTP version {version!r}")
        length = chunked = False
        for name, value in self._headers:
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise _Refused("only Transfer-Encoding: chunked is supported")
                chunked = True
            elif len(name) == 14 and name.lower() == b"content-length":
                length = True
        self._keep_alive = version == "1.1" and parser.should_keep_alive()
        self._events.append(ResponseHead(status, b"".join(self._reason), self._headers,
                                         version.encode()))
        if self._head_request or status in _NO_BODY_STATUS:
            self._events.append(_END)
            self._complete = True
        elif not length and not chunked:
            self._until_close = True
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._stray = True  # a body after a HEAD answer's head, or after the end
        else:
            self._pieces.append(body)
            self._body_bytes += len(body)

    def _flush_body(self) -> None:
        pieces = self._pieces
        if pieces:
            self._events.append(h11.Data(data=pieces[0] if len(pieces) == 1
                                         else b"".join(pieces)))
            pieces.clear()

    def on_message_complete(self) -> None:
        self._flush_body()
        if self._informational:
            self._informational = False
        elif not self._complete:
            self._events.append(_END)
            self._complete = True

    # -- receiving ---------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed what arrived (``b""``: the upstream closed). Errors wait for next_event."""
        if self._error is not None:
            return
        if not data:
            self._eof = True
            if self._until_close and not self._complete:
                self._events.append(_END)
                self._complete = True
            elif not self._complete:
                self._fail("the upstream closed the connection before the end of its answer")
            return
        if self._complete:
            self._stray = True
            return
        body_before = self._body_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            self._fail(str(cause) if isinstance(cause, _Refused) else f"malformed answer: {exc}")
        except httptools.HttpParserUpgrade:
            self._fail("the upstream switched protocols")
        except httptools.HttpParserError as exc:
            if self._complete:
                self._stray = True  # garbage after a complete answer
            else:
                self._fail(f"malformed answer: {exc}")
        else:
            self._flush_body()
            if self._head:
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head:
                    self._fail(f"answer head over {self.max_head} bytes")
            elif not self._complete:
                if self._framing.exceeded(len(data), self._body_bytes - body_before):
                    self._fail(self._framing.problem())

    def _fail(self, message: str) -> None:
        self._flush_body()  # what arrived before the fault is still delivered, as h11 does
        self._error = h11.RemoteProtocolError(message)

    def next_event(self) -> object:
        """The next event of the answer: a head, ``Data``, ``EndOfMessage``, ``NEED_DATA``
        (or ``PAUSED`` once it is all read)."""
        events = self._events
        if not events:
            if self.their_state is h11.DONE or self.their_state is h11.MUST_CLOSE:
                return h11.PAUSED
            if self._error is not None:
                self.their_state = h11.ERROR
                raise self._error
            return h11.NEED_DATA
        event = events.popleft()
        if event is _END:
            keep = self._keep_alive and not self._until_close
            self.their_state = h11.DONE if keep else h11.MUST_CLOSE
        return event

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """As h11's: (bytes after the answer, whether the upstream closed)."""
        return (b"?" if self._stray or self._events else b""), self._eof

    def start_next_cycle(self) -> None:
        """The answer was read to its end and the connection stays: ready for a request."""
        if self.our_state is not h11.DONE or self.their_state is not h11.DONE:
            raise h11.LocalProtocolError("not in a reusable state")
        self.our_state = self.their_state = h11.IDLE
        self._new_cycle()


class _Refused(Exception):
    """Raised in a parser callback: the answer breaks a rule llhttp does not check."""
