"""A real HTTP/1.1 test upstream (trio + h11) that plays the services Carapace proxies.

Used by the demo, the end-to-end tests, the benchmarks and
``carapace-debug sse-test serve``. Run it alone with
``python -m carapace.debug.upstream --port P``.

Routes (query parameters in brackets). Every SSE stream numbers its events
1, 2, ... (``id`` and ``seq``), ``count`` being the last id, and honours
``Last-Event-ID: N`` by carrying on at N+1 (so a resumed stream still ends at
``count``):

signal-cli-like
    ``POST /api/v1/rpc``      JSON-RPC 2.0, single object or batch array: ``version``,
                              ``send``, ``listAccounts``; anything else is -32601,
                              unparseable JSON is -32700 (HTTP 200, like signal-cli).
    ``GET /api/v1/check``     200, empty body.
    ``GET /api/v1/events``    [account, interval_ms=1000, count=inf] ``event: receive``
                              events whose data is a signal-cli style envelope plus
                              ``account``, ``seq`` and ``ts`` (``time.time()`` when sent).
generic
    ``GET /sse``              [count=10, interval_ms=100, size, multiline, event, retry,
                              comment, crlf] N events, ids 1..N, then a clean end.
    ``GET /`` and ``/events`` the same stream with the server's own defaults
                              (``stream_count``/``stream_interval_ms``).
    ``GET /sse-buffered``     [count=10, interval_ms=100, hold_ms=500] events stamped
                              when generated but written in bursts every hold_ms: a
                              deliberately buffering upstream.
    ``GET /sse-forever``      [interval_ms=100] never ends.
    ``GET /sse-flood``        [count=10000, size=300, batch=32] events as fast as the
                              client takes them, ``batch`` events per write, each
                              stamped with its own ``ts``: the throughput benchmark.
    ``GET /echo-header-sse``  [name, interval_ms=10, split] 3 events whose data carries the
                              value of request header ``name``; with ``split=N`` the data
                              of events 1 and 2 is the value itself, cut after N
                              characters (a secret split across two events).
    ``ANY /echo...``          200 JSON: method, path (raw target), headers as received,
                              body (text), body_length, body_sha256.
    ``GET /bytes``            [n, chunk=65536, interval_ms=0] n bytes of
                              :func:`pattern_bytes`, with Content-Length.
    ``GET /status/CODE``      answers CODE.
    ``GET /slow``             [delay_ms=1000] answers after the delay.
    ``GET /hang``             never answers (until the client goes away).
    ``GET /stats``            JSON counters (see :class:`UpstreamStats`);
                              ``POST /stats/reset`` zeroes them.

Every accepted socket sets ``TCP_NODELAY``; each SSE event is written with one
``send_all`` the moment it is due; non-streaming responses keep the
connection alive. A client that goes away cancels its request at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

__all__ = [
    "DEFAULT_ACCOUNT",
    "UpstreamServer",
    "UpstreamStats",
    "main",
    "pattern_bytes",
    "serve_upstream",
]

DEFAULT_ACCOUNT = "+15550000001"
FAKE_VERSION = "0.13.x-fake"
MAX_BODY = 64 * 1024 * 1024
_PATTERN_PERIOD = 1 << 20  # the /bytes content repeats every MiB


# --------------------------------------------------------------------------- content


@functools.cache
def _pattern_block() -> bytes:
    """One period of the /bytes content: sha256 of a big-endian counter, block after block."""
    return b"".join(
        hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(_PATTERN_PERIOD // 32)
    )


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The ``n`` bytes that ``GET /bytes`` sends from position ``offset`` on.

    Deterministic pseudo-random content (sha256 blocks of a counter, period
    1 MiB), so a test can check every byte that crossed the tunnel.
    """
    if n <= 0:
        return b""
    block = _pattern_block()
    start = offset % _PATTERN_PERIOD
    reps = (start + n + _PATTERN_PERIOD - 1) // _PATTERN_PERIOD
    return (block * reps)[start : start + n] if reps > 1 else block[start : start + n]


# --------------------------------------------------------------------------- stats


@dataclass
class UpstreamStats:
    """Counters served at ``GET /stats``.

    ``open_streams``/``cancelled_streams`` count SSE responses only (a stream
    is cancelled when its client goes away before the stream's end);
    ``open_requests``/``cancelled_requests`` count every request the same way.
    """

    total_requests: int = 0
    open_streams: int = 0
    cancelled_streams: int = 0
    completed_streams: int = 0
    events_sent: int = 0
    open_requests: int = 0
    cancelled_requests: int = 0
    open_connections: int = 0
    total_connections: int = 0
    rpc_calls: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rpc_calls"] = dict(self.rpc_calls)
        d["paths"] = dict(self.paths)
        return d

    def reset(self) -> None:
        """Zero the totals; the ``open_*`` gauges keep describing what is open now."""
        fresh = UpstreamStats(
            open_streams=self.open_streams,
            open_requests=self.open_requests,
            open_connections=self.open_connections,
        )
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class UpstreamServer:
    """What :func:`serve_upstream` hands to ``task_status.started()``."""

    host: str
    port: int
    stats: UpstreamStats

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path


# --------------------------------------------------------------------------- HTTP plumbing


class _BadRequest(Exception):
    pass


class _ClientGone(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str  # raw request target, decoded latin-1
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]  # as received, decoded latin-1
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def q_str(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def q_int(self, name: str, default: int, lo: int = 0, hi: int = 1 << 62) -> int:
        raw = self.q_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _BadRequest(f"query parameter {name}={raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise _BadRequest(f"query parameter {name}={value} is outside {lo}..{hi}")
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
        raw = self.q_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise _BadRequest(f"query parameter {name}={raw!r} is not a number") from None
        if not (math.isfinite(value) and 0 <= value <= 86_400_000):
            raise _BadRequest(f"query parameter {name}={raw!r} is out of range")
        return value

    def q_flag(self, name: str) -> bool:
        return (self.q_str(name) or "").lower() in ("1", "true", "yes", "on")

    def last_event_id(self) -> int:
        raw = self.header("last-event-id")
        if raw is None:
            return 0
        try:
            return max(0, int(raw.strip()))
        except ValueError:
            return 0


class _Responder:
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
                raise _ClientGone() from exc

    def _head(self, status: int, headers: list[tuple[str, str]]) -> h11.Response:
        self.started = True
        all_headers = [("Server", "carapace-test-upstream"), *headers]
        return h11.Response(status_code=status, headers=all_headers, reason=_reason(status))

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


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_Handler = Callable[["Upstream", _Request, _Responder], Awaitable[None]]


def _sse_block(
    *,
    data: str | None,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
    comments: tuple[str, ...] = (),
    crlf: bool = False,
) -> bytes:
    lines: list[str] = [f": {c}" for c in comments]
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    if data is not None:
        lines.extend(f"data: {line}" for line in data.split("\n"))
    eol = "\r\n" if crlf else "\n"
    return (eol.join(lines) + eol + eol).encode()


_SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
]


# --------------------------------------------------------------------------- the server


class Upstream:
    """Request routing and counters; one instance serves every connection."""

    def __init__(
        self,
        *,
        stream_count: int | None = None,
        stream_interval_ms: float = 100.0,
        account: str = DEFAULT_ACCOUNT,
        access_log: bool = False,
    ) -> None:
        self.stream_count = stream_count
        self.stream_interval_ms = stream_interval_ms
        self.account = account
        self.access_log = access_log
        self.stats = UpstreamStats()

    # ---- connections

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        except OSError:
            pass
        self.stats.open_connections += 1
        self.stats.total_connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while await self._one_request(stream, conn):
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone):
            pass
        except Exception:  # a bug in a handler must not take the whole server down
            traceback.print_exc()
        finally:
            self.stats.open_connections -= 1

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> _Request | None:
        """The next complete request (body included), or None when the client is done."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(stream, conn, exc)
                return None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                    )
                try:
                    data = await stream.receive_some(65536)
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
                    await self._protocol_error(stream, conn, ValueError("request body too large"))
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                target = request.target.decode("latin-1")
                parts = urlsplit(target)
                return _Request(
                    method=request.method.decode("latin-1").upper(),
                    target=target,
                    path=parts.path or "/",
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers=[
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in request.headers.raw_items()
                    ],
                    body=bytes(body),
                )
            else:  # ConnectionClosed or PAUSED
                return None

    async def _protocol_error(
        self, stream: trio.SocketStream, conn: h11.Connection, exc: Exception
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

    async def _one_request(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """Serve one request; True when the connection may carry another."""
        req = await self._read_request(stream, conn)
        if req is None:
            return False
        self.stats.total_requests += 1
        self.stats.open_requests += 1
        self.stats.paths[req.path] += 1
        if self.access_log:
            print(f"upstream: {req.method} {req.target}", file=sys.stderr, flush=True)
        resp = _Responder(stream, conn, req.method)
        client_gone = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch_for_disconnect() -> None:
                    # The only reader while the handler runs: EOF means the
                    # client went away, so cancel whatever the handler awaits.
                    nonlocal client_gone
                    while True:
                        try:
                            data = await stream.receive_some(65536)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        if not data:
                            client_gone = True
                            nursery.cancel_scope.cancel()
                            return
                        conn.receive_data(data)  # a pipelined request: keep it for later

                nursery.start_soon(watch_for_disconnect)
                try:
                    await self._dispatch(req, resp)
                except _ClientGone:
                    client_gone = True
                nursery.cancel_scope.cancel()
        finally:
            self.stats.open_requests -= 1
            if not resp.finished:
                self.stats.cancelled_requests += 1
        if client_gone or not resp.finished:
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _dispatch(self, req: _Request, resp: _Responder) -> None:
        try:
            handler, methods = self._route(req.path)
            if handler is None:
                await resp.json(
                    404,
                    {
                        "error": f"no route for {req.path}",
                        "routes": [*sorted(_ROUTES), "/echo...", "/status/CODE"],
                    },
                )
            elif methods and req.method not in methods:
                await resp.json(405, {"error": f"{req.method} not allowed on {req.path}"})
            else:
                await handler(self, req, resp)
        except _BadRequest as exc:
            if resp.started:
                raise _ClientGone() from exc  # cannot answer any more; drop the connection
            await resp.json(400, {"error": str(exc)})

    @staticmethod
    def _route(path: str) -> tuple[_Handler | None, tuple[str, ...]]:
        if path in _ROUTES:
            return _ROUTES[path]
        if path.startswith("/echo"):
            return _echo, ()
        if path.startswith("/status/"):
            return _status, ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
        return None, ()

    # ---- SSE helpers

    async def stream_events(
        self,
        resp: _Responder,
        blocks: Callable[[int], bytes],
        *,
        first: int,
        count: int | None,
        interval_ms: float,
    ) -> None:
        """Send ``blocks(i)`` for i = first, first+1, ... (up to id ``count``), on schedule.

        Event ``first`` goes out at once, each next one ``interval_ms`` later
        (deadline based, so the rate does not drift); each with one send_all.
        """
        await self.sse_start(resp)
        try:
            start = trio.current_time()
            i = first
            while count is None or i <= count:
                await trio.sleep_until(start + (i - first) * interval_ms / 1000.0)
                await resp.write(blocks(i))
                self.stats.events_sent += 1
                i += 1
            await resp.end()
        finally:
            self.sse_done(resp)

    async def sse_start(self, resp: _Responder) -> None:
        self.stats.open_streams += 1
        await resp.start(200, list(_SSE_HEADERS))

    def sse_done(self, resp: _Responder) -> None:
        self.stats.open_streams -= 1
        if resp.finished:
            self.stats.completed_streams += 1
        else:
            self.stats.cancelled_streams += 1


# --------------------------------------------------------------------------- route handlers


def _jsonrpc_error(code: int, message: str, id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id}


def _rpc_one(up: Upstream, call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict) or call.get("jsonrpc") != "2.0":
        return _jsonrpc_error(-32600, "Invalid Request")
    method = call.get("method")
    if not isinstance(method, str):
        return _jsonrpc_error(-32600, "Invalid Request", call.get("id"))
    up.stats.rpc_calls[method] += 1
    params = call.get("params") or {}
    result: Any
    if method == "version":
        result = {"version": FAKE_VERSION}
    elif method == "send":
        recipients = params.get("recipient", []) if isinstance(params, dict) else []
        if isinstance(recipients, str):
            recipients = [recipients]
        result = {
            "timestamp": int(time.time() * 1000),
            "results": [
                {"recipientAddress": {"number": r}, "type": "SUCCESS"}
                for r in recipients
                if isinstance(r, str)
            ],
        }
    elif method == "listAccounts":
        result = [{"number": up.account}]
    else:
        return _jsonrpc_error(-32601, "Method not found", call.get("id"))
    if "id" not in call:
        return None  # a notification gets no answer
    return {"jsonrpc": "2.0", "result": result, "id": call["id"]}


async def _rpc(up: Upstream, req: _Request, resp: _Responder) -> None:
    try:
        payload = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        await resp.json(200, _jsonrpc_error(-32700, "Parse error"))
        return
    if isinstance(payload, list):
        if not payload:
            await resp.json(200, _jsonrpc_error(-32600, "Invalid Request"))
            return
        answers = [a for a in (_rpc_one(up, c) for c in payload) if a is not None]
        if answers:
            await resp.json(200, answers)
        else:
            await resp.full(200, b"")
        return
    answer = _rpc_one(up, payload)
    if answer is None:
        await resp.full(200, b"")
    else:
        await resp.json(200, answer)


async def _check(up: Upstream, req: _Request, resp: _Responder) -> None:
    await resp.full(200, b"")


async def _signal_events(up: Upstream, req: _Request, resp: _Responder) -> None:
    account = req.q_str("account") or up.account
    count = req.q_count("count", None)
    interval = req.q_ms("interval_ms", 1000.0)

    def block(n: int) -> bytes:
        ts = time.time()
        ms = int(ts * 1000)
        envelope = {
            "source": "+15559999999",
            "sourceNumber": "+15559999999",
            "sourceUuid": "00000000-0000-4000-8000-000000000001",
            "sourceName": "Fake Sender",
            "sourceDevice": 1,
            "timestamp": ms,
            "serverReceivedTimestamp": ms,
            "serverDeliveredTimestamp": ms,
            "dataMessage": {
                "timestamp": ms,
                "message": f"fake message {n}",
                "expiresInSeconds": 0,
                "viewOnce": False,
            },
        }
        data = {"envelope": envelope, "account": account, "seq": n, "ts": ts}
        return _sse_block(data=json.dumps(data), id=str(n), event="receive")

    await up.stream_events(
        resp, block, first=req.last_event_id() + 1, count=count, interval_ms=interval
    )


def _padded_json(seq: int, ts: float, size: int, multiline: bool) -> str:
    """Event data: ``{"seq", "ts", "pad"}`` padded to about ``size`` bytes."""
    if multiline:
        base = f'{{"seq": {seq},\n"ts": {ts!r},\n"pad": ""}}'
    else:
        base = json.dumps({"seq": seq, "ts": ts, "pad": ""})
    pad = max(0, size - len(base))
    return base[:-2] + "x" * pad + base[-2:]


async def _sse_generic(
    up: Upstream,
    req: _Request,
    resp: _Responder,
    *,
    count: int | None,
    interval_ms: float,
) -> None:
    size = req.q_int("size", 0, 0, 16 * 1024 * 1024)
    multiline = req.q_flag("multiline")
    event = req.q_str("event") or None
    retry = req.q_int("retry", 0) if req.q_str("retry") else None
    comment = req.q_flag("comment")
    crlf = req.q_flag("crlf")
    first = req.last_event_id() + 1

    def block(seq: int) -> bytes:
        return _sse_block(
            data=_padded_json(seq, time.time(), size, multiline),
            id=str(seq),
            event=event,
            retry=retry if seq == first else None,
            comments=(f"comment {seq}",) if comment else (),
            crlf=crlf,
        )

    await up.stream_events(resp, block, first=first, count=count, interval_ms=interval_ms)


async def _sse(up: Upstream, req: _Request, resp: _Responder) -> None:
    await _sse_generic(
        up, req, resp, count=req.q_count("count", 10), interval_ms=req.q_ms("interval_ms", 100.0)
    )


async def _sse_default(up: Upstream, req: _Request, resp: _Responder) -> None:
    await _sse_generic(
        up,
        req,
        resp,
        count=req.q_count("count", up.stream_count),
        interval_ms=req.q_ms("interval_ms", up.stream_interval_ms),
    )


async def _sse_forever(up: Upstream, req: _Request, resp: _Responder) -> None:
    await _sse_generic(up, req, resp, count=None, interval_ms=req.q_ms("interval_ms", 100.0))


async def _sse_flood(up: Upstream, req: _Request, resp: _Responder) -> None:
    # No timer and no per-event write: the per-event path (sleep_until, h11,
    # send_all) tops out near 10,000 events/s, far below what a benchmark of
    # the tunnel needs from its upstream.
    count = req.q_int("count", 10_000, 0)
    size = req.q_int("size", 300, 0, 1024 * 1024)
    batch = req.q_int("batch", 32, 1, 100_000)
    first = req.last_event_id() + 1
    # The same bytes as _sse_block(data=_padded_json(...), id=...), formatted in one go.
    pad = "x" * max(0, size - len(json.dumps({"seq": count, "ts": time.time(), "pad": ""})))
    up.stats.open_streams += 1
    await resp.start(200, list(_SSE_HEADERS))
    try:
        i = first
        while i <= count:
            last = min(count, i + batch - 1)
            await resp.write("".join([
                f'id: {seq}\ndata: {{"seq": {seq}, "ts": {time.time()!r}, "pad": "{pad}"}}\n\n'
                for seq in range(i, last + 1)
            ]).encode())
            up.stats.events_sent += last - i + 1
            i = last + 1
        await resp.end()
    finally:
        up.stats.open_streams -= 1
        if resp.finished:
            up.stats.completed_streams += 1
        else:
            up.stats.cancelled_streams += 1


async def _sse_buffered(up: Upstream, req: _Request, resp: _Responder) -> None:
    count = req.q_count("count", 10)
    interval = req.q_ms("interval_ms", 100.0) / 1000.0
    hold = req.q_ms("hold_ms", 500.0) / 1000.0
    first = req.last_event_id() + 1
    await up.sse_start(resp)
    try:
        start = trio.current_time()
        pending: list[bytes] = []
        next_flush = start + hold
        i = first
        while count is None or i <= count:
            due = start + (i - first) * interval
            if hold > 0 and next_flush <= due:
                await trio.sleep_until(next_flush)
                if pending:
                    await resp.write(b"".join(pending))  # the whole burst, one write
                    up.stats.events_sent += len(pending)
                    pending.clear()
                next_flush += hold
                continue
            await trio.sleep_until(due)
            block = _sse_block(data=_padded_json(i, time.time(), 0, False), id=str(i))
            if hold > 0:
                pending.append(block)
            else:
                await resp.write(block)
                up.stats.events_sent += 1
            i += 1
        if pending:
            await trio.sleep_until(next_flush)
            await resp.write(b"".join(pending))
            up.stats.events_sent += len(pending)
        await resp.end()
    finally:
        up.sse_done(resp)


async def _echo_header_sse(up: Upstream, req: _Request, resp: _Responder) -> None:
    name = req.q_str("name") or ""
    value = req.header(name) if name else None
    first = req.last_event_id() + 1

    split = req.q_int("split", 0, 0, 1 << 20)

    def block(seq: int) -> bytes:
        if split and value is not None and seq in (1, 2):
            return _sse_block(data=value[:split] if seq == 1 else value[split:], id=str(seq))
        data = {"seq": seq, "ts": time.time(), "header": name, "value": value}
        return _sse_block(data=json.dumps(data), id=str(seq))

    await up.stream_events(
        resp, block, first=first, count=3, interval_ms=req.q_ms("interval_ms", 10.0)
    )


async def _echo(up: Upstream, req: _Request, resp: _Responder) -> None:
    await resp.json(
        200,
        {
            "method": req.method,
            "path": req.target,
            "headers": [[k, v] for k, v in req.headers],
            "body": req.body.decode("utf-8", "replace"),
            "body_length": len(req.body),
            "body_sha256": hashlib.sha256(req.body).hexdigest(),
        },
    )


async def _bytes(up: Upstream, req: _Request, resp: _Responder) -> None:
    n = req.q_int("n", 1024, 0, 1 << 40)
    chunk = req.q_int("chunk", 65536, 1, 16 * 1024 * 1024)
    interval = req.q_ms("interval_ms", 0.0) / 1000.0
    await resp.start(
        200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
    )
    sent = 0
    while sent < n:
        if interval and sent:
            await trio.sleep(interval)
        size = min(chunk, n - sent)
        await resp.write(pattern_bytes(size, sent))
        sent += size
    await resp.end()


async def _status(up: Upstream, req: _Request, resp: _Responder) -> None:
    raw = req.path[len("/status/") :]
    try:
        code = int(raw)
    except ValueError:
        raise _BadRequest(f"/status/{raw}: not a status code") from None
    if not 200 <= code <= 599:
        raise _BadRequest(f"/status/{code}: must be 200..599")
    await resp.json(code, {"status": code})


async def _slow(up: Upstream, req: _Request, resp: _Responder) -> None:
    delay = req.q_ms("delay_ms", 1000.0)
    await trio.sleep(delay / 1000.0)
    await resp.json(200, {"delay_ms": delay})


async def _hang(up: Upstream, req: _Request, resp: _Responder) -> None:
    await trio.sleep_forever()


async def _stats(up: Upstream, req: _Request, resp: _Responder) -> None:
    await resp.json(200, up.stats.as_dict())


async def _stats_reset(up: Upstream, req: _Request, resp: _Responder) -> None:
    up.stats.reset()
    await resp.json(200, up.stats.as_dict())


_GET = ("GET", "HEAD")
_ROUTES: dict[str, tuple[_Handler, tuple[str, ...]]] = {
    "/api/v1/rpc": (_rpc, ("POST",)),
    "/api/v1/check": (_check, _GET),
    "/api/v1/events": (_signal_events, _GET),
    "/": (_sse_default, _GET),
    "/events": (_sse_default, _GET),
    "/sse": (_sse, _GET),
    "/sse-buffered": (_sse_buffered, _GET),
    "/sse-forever": (_sse_forever, _GET),
    "/sse-flood": (_sse_flood, _GET),
    "/echo-header-sse": (_echo_header_sse, _GET),
    "/bytes": (_bytes, _GET),
    "/slow": (_slow, _GET),
    "/hang": (_hang, _GET),
    "/stats": (_stats, _GET),
    "/stats/reset": (_stats_reset, ("POST",)),
}


# --------------------------------------------------------------------------- entry points


async def serve_upstream(
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[UpstreamServer] = trio.TASK_STATUS_IGNORED,
    stream_count: int | None = None,
    stream_interval_ms: float = 100.0,
    account: str = DEFAULT_ACCOUNT,
    access_log: bool = False,
) -> None:
    """Serve the test upstream on ``host:port`` (0 picks a free port) until cancelled.

    ``task_status.started()`` receives an :class:`UpstreamServer` with the real
    port and the live :class:`UpstreamStats`. ``stream_count`` (None: never
    ends) and ``stream_interval_ms`` are the defaults of ``/`` and ``/events``;
    ``account`` is what ``listAccounts`` and ``/api/v1/events`` report.
    """
    upstream = Upstream(
        stream_count=stream_count,
        stream_interval_ms=stream_interval_ms,
        account=account,
        access_log=access_log,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    server = UpstreamServer(host=host, port=int(bound[1]), stats=upstream.stats)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, upstream.handle_connection, listeners)
        task_status.started(server)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m carapace.debug.upstream",
        description="A test HTTP upstream: fake signal-cli JSON-RPC and events, SSE test "
        "streams, echo, bytes, status, slow and hanging routes, /stats.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--count", type=int, default=None, help="events on / and /events")
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--account", default=DEFAULT_ACCOUNT)
    parser.add_argument("--access-log", action="store_true", help="one stderr line per request")
    args = parser.parse_args(argv)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: UpstreamServer = await nursery.start(
                functools.partial(
                    serve_upstream,
                    args.host,
                    args.port,
                    stream_count=args.count,
                    stream_interval_ms=args.interval_ms,
                    account=args.account,
                    access_log=args.access_log,
                )
            )
            print(f"test upstream listening on {server.base_url}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
