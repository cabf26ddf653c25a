"""The server's HTTP/1.1 client for upstreams: trio, llhttp, and an O(1) keep-alive pool.

Why not httpx: profiled under ``make bench``, httpx and httpcore took about
half of the server's CPU at JSON-RPC concurrency 32, a quarter of it in
httpcore's pool scan
(``_assign_requests_to_connections``, O(open connections) per request), and
with thousands of open SSE streams each holding a pooled connection, opening
the next stream got slower with every one already open. This client does the
one thing the server needs — send a request, stream the answer back — with
llhttp parsing the answers (``wire.py``, which keeps h11's client interface
and rules: h11 itself was a third of the server's CPU per call) and a pool
whose every operation is O(1).

Use::

    async with UpstreamClient() as client:
        resp = await client.request("GET", "http://127.0.0.1:8080/x", headers, b"", timeout=30)
        try:
            async for chunk in resp.body(idle_timeout=30):
                ...
        finally:
            await resp.aclose()

Rules, in the order a request meets them:

- **URL.** ``http://`` or ``https://``, host, optional port, path and query;
  or a ``(base, target)`` pair, the base parsed once and cached. The target
  goes out as given (a proxy does not re-encode it).
- **Headers.** The caller's, in order, minus ``Host``, ``Content-Length`` and
  ``Transfer-Encoding`` (this client frames the request itself); ``Host``
  comes from the URL (without a default port). Nothing is added that the
  caller did not send — no ``User-Agent``, no ``Accept-Encoding``: a request
  without ``Accept-Encoding`` gets an uncompressed answer. Bodies go with
  ``Content-Length`` (also ``0`` for an empty POST, PUT or PATCH).
- **Pool.** Per (scheme, host, port) a deque of idle connections, used last
  in, first out, so a burst's connections stay warm and the rest age out.
  A new connection opens when none is idle; this client puts no cap on open
  connections (each open SSE stream holds one): the server caps them per
  agent and per tool before a request gets here (``server/shares.py``), and
  at most ``max_idle_per_origin`` idle ones are kept. An idle connection older than
  ``idle_expiry`` seconds is closed when its origin is next used (or at
  :meth:`UpstreamClient.aclose`): there is no timer task, so an origin that
  is never used again keeps at most ``max_idle_per_origin`` sockets until
  then. Every operation on the pool is O(1) (amortised for the expiry).
- **Reuse.** Before an idle connection is reused, one ``poll()`` with a zero
  timeout checks that the upstream has not closed it (or sent anything)
  meanwhile; a readable idle socket is closed, not reused. That leaves the
  race where the upstream closes the connection in the microseconds between
  that check and our request reaching it. A request that fails on a *reused*
  connection before a single byte of answer is retried once on a fresh one
  if (a) writing it failed — the upstream had already dropped the
  connection, so it cannot have read the request — or (b) its method is
  idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE). A POST that loses
  that race is *not* retried: the upstream may have acted on it (signal-cli
  may have sent the message) before it died, and RFC 9112 §9.3.1 forbids a
  proxy to retry a non-idempotent request; it fails as unavailable (502).
  When writing a request to a *fresh* connection fails, its answer is still
  read if the upstream sent one before hanging up (a 413 to a body it would
  not take); that connection is never pooled.
- **Response.** llhttp frames it: Content-Length, chunked, or read until close;
  HEAD, 1xx, 204 and 304 have no body; 1xx heads are skipped. The body is
  passed through raw (``Content-Encoding`` is not undone here; see
  :class:`ContentDecoder` for callers that must read it).
  One read's worth of body is one chunk, however many chunks of the chunked
  encoding it held (an event stream sends one per event).
- **Returning a connection.** :meth:`UpstreamResponse.aclose` puts it back
  in the pool only if the answer was read to its end and both sides allow
  keep-alive (h11's states are DONE/DONE, nothing unread); otherwise, and on
  cancellation or any error, the socket is closed.
- **Sockets.** ``TCP_NODELAY`` on every one; https through
  :class:`trio.SSLStream` with ``ssl.create_default_context()`` (or the
  context given), certificate and host name checked.
- **Timeouts.** ``timeout`` bounds everything up to the response head:
  connect, TLS, sending, a retry, waiting for the head
  (:class:`UpstreamTimeout`). ``body(idle_timeout)`` bounds each wait for
  the next chunk; ``None`` waits for ever (event streams).
- **Errors.** :class:`UpstreamUnavailable` — refused, DNS, TLS, reset, or
  closed before the head, or a head that cannot be parsed; :class:`UpstreamTimeout`
  — no head in time, or a body idle too long; :class:`UpstreamBroken` — the
  body broke off (closed early, reset, or malformed framing). All are
  :class:`UpstreamError`.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import h11
import trio

from carapace.runtime.sockets import receive_some, send_all

from .errors import UpstreamBroken, UpstreamTimeout, UpstreamUnavailable
from .wire import ClientConnection, InvalidRequest, ResponseHead, request_bytes

__all__ = ["UpstreamClient", "UpstreamResponse"]

READ_SIZE = 65536
"""Bytes asked of the socket per read (and so the largest body chunk)."""

MAX_HEAD = 100 * 1024
"""Largest response head accepted (as httpcore)."""

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods retried once on a fresh connection when a reused one dies before answering."""

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


# ---------------------------------------------------------------------------
# URLs


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: bytes
    prefix: str
    """The base URL's path (no trailing slash), put before every target."""


@functools.lru_cache(maxsize=1024)
def parse_base(base: str) -> Origin:
    """Scheme, host, port and path prefix of an ``http(s)://host[:port][/path]`` URL."""
    parts = urlsplit(base)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UpstreamUnavailable(f"not an http(s) URL: {base!r}")
    host = parts.hostname
    if not host:
        raise UpstreamUnavailable(f"no host in URL {base!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise UpstreamUnavailable(f"bad port in URL {base!r}") from None
    shown = host if host.isascii() else host.encode("idna").decode("ascii")
    if ":" in shown:
        shown = f"[{shown}]"
    if port != _DEFAULT_PORTS[scheme]:
        shown = f"{shown}:{port}"
    return Origin(scheme, host, port, shown.encode("ascii"), parts.path.rstrip("/"))


def split_url(url: str) -> tuple[str, str]:
    """``http://h:1/a?b`` → (``http://h:1``, ``/a?b``); the target is ``/`` if empty."""
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    cut = len(url)
    for sep in "/?#":
        i = url.find(sep, start)
        if 0 <= i < cut:
            cut = i
    target = url[cut:].split("#", 1)[0]
    if not target.startswith("/"):
        target = "/" + target
    return url[:cut], target


# ---------------------------------------------------------------------------
# Connections


class _Connection:
    """One socket to an upstream and its h11 state."""

    __slots__ = ("_poller", "broken", "h11", "idle_since", "origin", "reused", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType,
                 origin: Origin) -> None:
        self.stream = stream
        self.sock = sock
        self.origin = origin
        # h11's client interface over llhttp (wire.py): h11 was a third of the server's
        # CPU per JSON-RPC call.
        self.h11 = ClientConnection(MAX_HEAD)
        self.idle_since = 0.0
        self.reused = False
        self.broken = False
        """Sending failed: whatever h11 thinks, this socket carries no further request."""
        self._poller: select.poll | None = None
        """Made on the first reuse and kept: one system call per check, no allocation."""

    def close(self) -> None:
        """Close the socket now (synchronous: safe in a cancelled or shielded finally)."""
        self.sock.close()

    def readable(self) -> bool:
        """Whether the idle socket has something to read: EOF, a reset, or stray bytes."""
        try:
            poller = self._poller
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class _Retry(Exception):
    """A reused connection died before answering and the request may be sent again."""


# ---------------------------------------------------------------------------
# Responses


class UpstreamResponse:
    """A response head, and its body as it arrives (:meth:`body`). Always :meth:`aclose` it."""

    __slots__ = ("_client", "_conn", "_done", "headers", "http_version", "reason", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection, head: ResponseHead) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self._done = False
        self.status: int = head.status_code
        self.reason: bytes = head.reason
        self.http_version: bytes = head.http_version
        self.headers: list[tuple[bytes, bytes]] = head.headers
        """As received: original case, order and repeats (for hop-by-hop filtering)."""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    @property
    def complete(self) -> bool:
        """Whether the body has been read to its end."""
        return self._done

    def body(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (raw: still content-encoded, never empty).

        ``idle_timeout`` bounds each wait for the next chunk
        (:class:`UpstreamTimeout`); ``None`` waits as long as it takes.
        """
        return _Body(self, idle_timeout)

    async def read(self, idle_timeout: float | None = None) -> bytes:
        """The whole rest of the body (for small answers and tests)."""
        return b"".join([chunk async for chunk in self.body(idle_timeout)])

    def next_chunk_nowait(self) -> bytes | None:
        """The next body chunk if it has already arrived, or None at the end of the body.

        Raises :class:`trio.WouldBlock` when getting it needs a read.
        """
        conn = self._conn
        if self._done or conn is None:
            return None
        h = conn.h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                self.close()
                raise UpstreamBroken(f"the answer broke off: {exc}") from None
            if type(event) is h11.Data:
                if event.data:
                    return bytes(event.data)
            elif event is h11.NEED_DATA:
                raise trio.WouldBlock
            else:  # EndOfMessage, ConnectionClosed or PAUSED: nothing more will come
                self._done = True
                return None

    async def next_chunk(self, idle_timeout: float | None = None,
                         read_size: int = READ_SIZE) -> bytes | None:
        """The next body chunk, or None at the end of the body; ``read_size`` bytes are
        asked of the socket per read (larger for a bulk body: fewer reads)."""
        while True:
            try:
                return self.next_chunk_nowait()
            except trio.WouldBlock:
                pass
            conn = self._conn
            assert conn is not None  # next_chunk_nowait() returns None once it is gone
            data: bytes | bytearray | None = None
            try:
                if idle_timeout is None:
                    data = await receive_some(conn.stream, read_size)
                else:
                    with trio.move_on_after(idle_timeout):
                        data = await receive_some(conn.stream, read_size)
                    if data is None:
                        raise UpstreamTimeout(f"no body bytes for {idle_timeout:g} s")
            except _CONNECTION_ERRORS as exc:
                self.close()
                raise UpstreamBroken(f"the answer broke off: {exc!r}") from None
            except BaseException:  # a timeout, or cancelled: the rest stays unread
                self.close()
                raise
            conn.h11.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    def close(self) -> None:
        """Give the connection back (a clean, finished keep-alive answer) or close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._finished(conn, self._done)

    async def aclose(self) -> None:
        """As :meth:`close` (no I/O: safe in a cancelled scope)."""
        self.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Body:
    __slots__ = ("_idle", "_resp")

    def __init__(self, resp: UpstreamResponse, idle: float | None) -> None:
        self._resp = resp
        self._idle = idle

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._resp.next_chunk(self._idle)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


# ---------------------------------------------------------------------------
# The client


class UpstreamClient:
    """One per server: the keep-alive pool of every upstream connection."""

    def __init__(
        self,
        *,
        idle_expiry: float = 30.0,
        max_idle_per_origin: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.idle_expiry = idle_expiry
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl_context = ssl_context
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._active: set[_Connection] = set()
        self._closed = False
        self.connections_opened = 0
        """How many sockets this client has opened (for tests and metrics)."""

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection, idle or in use; later requests fail."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in self._active:
            conn.close()
        self._active.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(d) for d in self._idle.values())

    @property
    def active_connections(self) -> int:
        return len(self._active)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    # -- requests ----------------------------------------------------------------------
    async def request(
        self,
        method: str | bytes,
        url: str | tuple[str, str],
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head is in (see the module doc).

        ``url`` is a whole URL or a ``(base, target)`` pair; ``timeout`` bounds
        connecting, sending and waiting for the head (None: no bound).
        """
        if self._closed:
            raise UpstreamUnavailable("the upstream client is closed")
        base, target = split_url(url) if isinstance(url, str) else url
        origin = parse_base(base)
        method_b = method.encode("ascii") if isinstance(method, str) else method
        method_b = method_b.upper()
        out: list[tuple[bytes, bytes]] = [(b"Host", origin.host_header)]
        out.extend(h for h in headers if h[0].lower() not in _FRAMING)
        if body or method_b in _BODY_METHODS:
            out.append((b"Content-Length", b"%d" % len(body)))
        try:
            request = request_bytes(method_b, (origin.prefix + target).encode("ascii"), out,
                                    body)
        except (InvalidRequest, UnicodeEncodeError) as exc:
            raise UpstreamUnavailable(f"the request is not valid HTTP/1.1: {exc}") from None
        if timeout is None:
            return await self._send(origin, request, method_b)
        # move_on_after, not fail_after: this is per request, and fail_after's
        # generator-based context manager showed in the profile.
        with trio.move_on_after(timeout):
            return await self._send(origin, request, method_b)
        raise UpstreamTimeout(f"no answer within {timeout:g} s")

    async def _send(self, origin: Origin, request: bytes, method: bytes) -> UpstreamResponse:
        for _attempt in range(2):
            conn = self._checkout(origin)
            if conn is None:
                conn = await self._connect(origin)
            self._active.add(conn)
            try:
                head = await self._exchange(conn, request, method)
            except _Retry:
                self._discard(conn)
                continue
            except BaseException:
                self._discard(conn)
                raise
            return UpstreamResponse(self, conn, head)
        raise AssertionError("unreachable: the second attempt is on a fresh connection")

    async def _exchange(self, conn: _Connection, request: bytes,
                        method: bytes) -> ResponseHead:
        h = conn.h11
        h.sent(method)
        send_error: BaseException | None = None
        try:
            await send_all(conn.stream, request)
        except _CONNECTION_ERRORS as exc:
            if conn.reused:  # it was dead before the request went out
                raise _Retry() from None
            # The upstream may have answered early and hung up (a 413 to a body it would
            # not read): its answer may still be there to read, so try before giving up.
            conn.broken = True
            send_error = exc
        got_bytes = False
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if send_error is not None:
                    raise UpstreamUnavailable(
                        f"sending the request failed: {send_error!r}") from None
                if not got_bytes and conn.reused and method in IDEMPOTENT:
                    raise _Retry() from None
                if not got_bytes:
                    raise UpstreamUnavailable("the upstream closed the connection without "
                                              "answering") from None
                raise UpstreamUnavailable(f"unreadable response head: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    received = await receive_some(conn.stream, READ_SIZE)
                except _CONNECTION_ERRORS as exc:
                    if send_error is not None:
                        raise UpstreamUnavailable(
                            f"sending the request failed: {send_error!r}") from None
                    if not got_bytes and conn.reused and method in IDEMPOTENT:
                        raise _Retry() from None
                    raise UpstreamUnavailable(
                        f"the connection failed before the answer: {exc!r}") from None
                if received:
                    got_bytes = True
                h.receive_data(received)  # type: ignore[arg-type]  # h11 takes any bytes-like
            elif type(event) is ResponseHead:
                return event
            else:  # pragma: no cover - the parser raises before anything else can come
                raise UpstreamUnavailable(f"unexpected {type(event).__name__} before the head")

    async def _connect(self, origin: Origin) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
        self.connections_opened += 1
        sock = tcp.socket
        try:
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        except OSError:  # pragma: no cover - not TCP after all
            pass
        stream: trio.abc.Stream = tcp
        if origin.scheme == "https":
            tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=origin.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                sock.close()
                cause = exc.__cause__ or exc
                raise UpstreamUnavailable(
                    f"TLS with {origin.host}:{origin.port} failed: {cause}") from None
            except BaseException:
                sock.close()
                raise
            stream = tls
        return _Connection(stream, sock, origin)

    # -- the pool ----------------------------------------------------------------------
    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        self._expire(idle, trio.current_time())
        while idle:
            conn = idle.pop()
            if conn.readable():  # closed by the upstream (or stray bytes): not reusable
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _expire(self, idle: deque[_Connection], now: float) -> None:
        limit = now - self.idle_expiry
        while idle and idle[0].idle_since <= limit:
            idle.popleft().close()

    def _discard(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.close()

    def _finished(self, conn: _Connection, complete: bool) -> None:
        """A response is done with ``conn``: pool it if it can carry another request."""
        self._active.discard(conn)
        h = conn.h11
        if (
            self._closed
            or not complete
            or conn.broken
            or h.our_state is not h11.DONE
            or h.their_state is not h11.DONE
        ):
            conn.close()
            return
        unread, eof = h.trailing_data
        if unread or eof:  # read until close, or bytes after the answer (a confused upstream)
            conn.close()
            return
        h.start_next_cycle()
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        now = trio.current_time()
        self._expire(idle, now)
        if len(idle) >= self.max_idle_per_origin:
            idle.popleft().close()
        conn.idle_since = now
        idle.append(conn)
