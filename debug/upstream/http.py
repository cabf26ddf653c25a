"""The test upstream's HTTP/1.1 plumbing: one whole request in, one answer out.

A request is read with its body before any handler runs (tests send small
bodies; :data:`MAX_BODY` bounds them). An answer goes out through a
:class:`Responder`, one ``send_all`` per call, because when bytes reach the
wire is what the tunnel's tests and benchmarks measure.
"""

from __future__ import annotations

import json
import math
from typing import Any

import h11
import trio

from carapace.runtime.http import ClientGone, RequestHead, response_head

MAX_BODY = 64 * 1024 * 1024
RECEIVE_SIZE = 65536
"""Bytes asked of the socket per read."""


class BadRequest(Exception):
    """A request this upstream will not serve as asked: answered 400 with the message."""


class Request(RequestHead):
    """A request head with its whole body, and readers of its query parameters.

    Unlike the shared head, headers keep their names' case as sent, since
    ``/echo`` shows them as received, and :meth:`header` gives a repeated
    header's first value.
    """

    def __init__(self, event: h11.Request, body: bytes) -> None:
        super().__init__(event)
        self.path = self.path or "/"  # an absolute-form target ("http://host") asks for /
        self.headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()
        ]
        self.body = body

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), if present."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def q_str(self, name: str, default: str | None = None) -> str | None:
        """Query parameter ``name`` (its last value), else ``default``."""
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def q_int(self, name: str, default: int, lo: int = 0, hi: int = 1 << 62) -> int:
        """An integer in ``lo..hi``; absent or empty gives ``default``, anything else 400."""
        raw = self.q_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name}={raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise BadRequest(f"query parameter {name}={value} is outside {lo}..{hi}")
        return value

    def q_count(self, name: str, default: int | None) -> int | None:
        """A count where ``inf``/``-1`` (or the default ``None``) means unlimited."""
        raw = self.q_str(name)
        if raw is None or raw == "":
            return default
        if raw.lower() in ("inf", "infinite", "-1"):
            return None
        return self.q_int(name, 0)

    def q_ms(self, name: str, default: float) -> float:
        """A duration in milliseconds, 0 to one day; absent or empty gives ``default``."""
        raw = self.q_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name}={raw!r} is not a number") from None
        if not (math.isfinite(value) and 0 <= value <= 86_400_000):
            raise BadRequest(f"query parameter {name}={raw!r} is out of range")
        return value

    def q_flag(self, name: str) -> bool:
        """True for ``1``, ``true``, ``yes`` or ``on``."""
        return (self.q_str(name) or "").lower() in ("1", "true", "yes", "on")

    def last_event_id(self) -> int:
        """The ``Last-Event-ID`` a resuming client sent; 0 when absent, negative or not a number."""
        raw = self.header("last-event-id")
        if raw is None:
            return 0
        try:
            return max(0, int(raw.strip()))
        except ValueError:
            return 0


class Responder:
    """Writes one response on an h11 connection; one ``send_all`` per call.

    A whole answer (:meth:`full`) goes out in one send, head and body
    together, as production servers buffer a small answer: two sends meet
    Nagle's algorithm on any hop that leaves it on (ssh -L's transport does)
    and wait out a delayed ACK there, ~40 ms a request.
    """

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, method: str) -> None:
        self._stream = stream
        self._conn = conn
        self._head_only = method == "HEAD"
        self.started = False
        self.finished = False

    def _encode(self, *events: Any) -> bytes:
        return b"".join(self._conn.send(event) or b"" for event in events)

    async def _send_bytes(self, data: bytes) -> None:
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone() from exc

    def _head(self, status: int, headers: list[tuple[str, str]]) -> h11.Response:
        self.started = True
        return response_head(status, [("Server", "carapace-test-upstream"), *headers])

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self._send_bytes(self._encode(self._head(status, headers)))

    async def write(self, data: bytes) -> None:
        if data and not self._head_only:
            await self._send_bytes(self._encode(h11.Data(data=data)))

    async def end(self) -> None:
        await self._send_bytes(self._encode(h11.EndOfMessage()))
        self.finished = True

    async def full(
        self, status: int, body: bytes = b"", content_type: str | None = "application/json"
    ) -> None:
        no_body = status in (204, 304) or 100 <= status < 200
        headers: list[tuple[str, str]] = []
        if not no_body:
            if content_type and body:
                headers.append(("Content-Type", content_type))
            headers.append(("Content-Length", str(len(body))))
        events: list[Any] = [self._head(status, headers)]
        if body and not no_body and not self._head_only:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self._send_bytes(self._encode(*events))
        self.finished = True

    async def json(self, status: int, obj: Any) -> None:
        await self.full(status, json.dumps(obj).encode() + b"\n")


async def read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    """The next complete request (body included), or None when the client is done."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _answer_protocol_error(stream, conn, exc)
            return None
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data and conn.their_state is h11.IDLE:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                await _answer_protocol_error(stream, conn, ValueError("request body too large"))
                return None
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return Request(request, bytes(body))
        else:  # ConnectionClosed or PAUSED
            return None


async def _answer_protocol_error(
    stream: trio.SocketStream, conn: h11.Connection, exc: Exception
) -> None:
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        status = getattr(exc, "error_status_hint", 400)
        body = json.dumps({"error": str(exc)}).encode()
        try:
            data = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ],
                )
            )
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
