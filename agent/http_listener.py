"""Local HTTP/1.1 listeners (llhttp, local_http.py): every request on one goes to one HTTP tool.

Paths and query strings pass unchanged, so a signal-cli client just points
its base URL here. SSE answers are re-served as real ``text/event-stream``
with one write per event the moment its frame arrives.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import h11
import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.flow import FRAME_OVERHEAD, flow_cost
from carapace.protocol.messages import (
    Data,
    End,
    Headers,
    HttpHead,
    HttpRequest,
    HttpResponse,
    RequestFailed,
    RequestMessage,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
)
from carapace.protocol.sse import Comment, serialize, serialize_event
from carapace.runtime.errors import consists_of
from carapace.runtime.http import DISCONNECTS, HOP_BY_HOP, ClientGone, response_head
from carapace.runtime.sockets import receive_some, send_all, write_now

from .local_http import LocalRequest, ServerConnection
from .multiplexer import (
    AgentStream,
    FrameTooLarge,
    LinkDown,
    Multiplexer,
    Sink,
    StreamLost,
    Unwritten,
)

log = logging.getLogger("carapace.agent")

READ_SIZE = 64 * 1024
# An event stream is re-framed here, so its length no longer applies, and its
# caching headers are the ones every SSE answer gets.
SSE_HEADERS_DROP = HOP_BY_HOP | {b"cache-control", b"x-accel-buffering", b"content-length"}
MAX_PIPELINED = 64 * 1024
_CHUNKED_HEADER = b"\r\ntransfer-encoding: chunked\r\n"


DEFAULT_SSE_KEEPALIVE = 15.0
"""Seconds of silence on an event stream before a keepalive comment: well inside the
30–60 s after which proxies and HTTP clients commonly give up on an idle connection."""
DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a local client may take to send its request head (slow-loris bound)."""
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
"""Largest request head a local client may send (431 beyond): far above real requests."""
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body a local client may send (413 beyond): the body travels in one
``http_request`` frame, so it must stay well under the server's frame cap."""
DEFAULT_LINK_WAIT = 2.0
"""Seconds a local request waits for the tunnel to come up before its 502: a reconnect
in progress usually finishes within it."""


@dataclass
class HttpListenerConfig:
    tool: str
    host: str
    port: int
    keepalive_interval: float = DEFAULT_SSE_KEEPALIVE
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = 120.0
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    link_wait: float = DEFAULT_LINK_WAIT


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode() + b"\n"


class KeepaliveClock:
    """One timer for all of a listener's event streams: says which are due a keepalive.

    A timeout around each stream's wait (a cancel scope per wait) left a scope,
    a Cancelled exception and its traceback cycle behind every keepalive; with
    10,000 idle streams that garbage kept the cyclic collector busy enough to
    hold a live stream up for tens of milliseconds. Here an idle stream costs
    nothing until it is due, and then one nudge through its own channel.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # Streams due within this of each other are nudged in one wake-up: few
        # wake-ups, small enough bursts. A keepalive never comes later than
        # `interval` after the last write, and at most `slack` earlier.
        self.slack = min(interval / 16, 0.05)
        # Nudged streams run their writes in trio's next batch; a few per batch
        # keep the wait for I/O short, so a live stream's event is not queued
        # behind hundreds of keepalive writes (~80 µs each).
        self.burst = 8
        self._last_write: OrderedDict[AgentStream, float] = OrderedDict()  # oldest first
        self._added = trio.Event()

    def wrote(self, stream: AgentStream) -> None:
        last = self._last_write
        if not last:
            self._added.set()
        last[stream] = trio.current_time()
        last.move_to_end(stream)

    def forget(self, stream: AgentStream) -> None:
        self._last_write.pop(stream, None)

    async def run(self) -> None:
        last = self._last_write
        while True:
            if not last:
                self._added = trio.Event()
                await self._added.wait()
                continue
            await trio.sleep_until(next(iter(last.values())) + self.interval)
            now = trio.current_time()
            due = now - self.interval + self.slack
            nudged = 0
            while last:
                stream, at = next(iter(last.items()))
                if at > due or at == now:  # not yet due, or nudged in this very round
                    break
                last[stream] = now  # not again until it has been idle a whole interval
                last.move_to_end(stream)
                stream.keepalive_due()
                nudged += 1
                if nudged % self.burst == 0:
                    await trio.lowlevel.checkpoint()


class HttpToolListener:
    """Serves one ``--expose TOOL=[HOST:]PORT``."""

    def __init__(self, config: HttpListenerConfig, mux: Multiplexer) -> None:
        self.config = config
        self.mux = mux
        self.open_connections = 0
        self.keepalives = KeepaliveClock(config.keepalive_interval)

    async def serve(self, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED,
                    handler_nursery: trio.Nursery | None = None) -> None:
        """Accept until cancelled; connections run in ``handler_nursery`` if given, so
        that stopping the accept loop lets them finish."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            log.info("tool %s served on http://%s:%d", self.config.tool, host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.keepalives.run)
            task_status.started(listeners)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=handler_nursery)

    async def _handle(self, sock: trio.SocketStream) -> None:
        self.open_connections += 1
        try:
            await _Connection(self, sock).run()
        except Exception as exc:
            if not consists_of(exc, DISCONNECTS):
                log.exception("local HTTP connection for tool %s failed", self.config.tool)
        finally:
            self.open_connections -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await sock.aclose()


class _Connection:
    def __init__(self, listener: HttpToolListener, sock: trio.SocketStream) -> None:
        self.listener = listener
        self.cfg = listener.config
        self.sock = sock
        # llhttp parses, answers are written from their parts (local_http.py): h11
        # cost about a third of the agent's CPU per JSON-RPC call.
        self.conn = ServerConnection(self.cfg.max_header_bytes)
        self._fed = 0
        """Bytes given to h11 since it last asked for more: bounds a pipelining client."""
        self._bytes_arrived = trio.Event()
        self._bytes_wanted = trio.Event()
        self._client_closed = False
        self._in_flight: tuple[trio.CancelScope, AgentStream] | None = None

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await send_all(self.sock, data)

    async def _next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._fed = 0  # h11 has used all it was given
            self._bytes_wanted.set()
            self._bytes_arrived = trio.Event()
            await self._bytes_arrived.wait()

    async def _read_client(self) -> None:
        """The one reader of the client's socket, for the connection's whole life.

        It feeds h11 and notices a hang-up at once, also while a response is
        being relayed (the request is then cancelled upstream). A watcher task
        per request did this before and cost ~90 µs of CPU per request.
        """
        while True:
            while self._fed >= MAX_PIPELINED:  # far ahead of us: wait until h11 wants more
                self._bytes_wanted = trio.Event()
                await self._bytes_wanted.wait()
            try:
                data = await receive_some(self.sock, READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            self.conn.receive_data(data)  # b"" tells h11 the client closed
            self._fed += len(data)
            self._bytes_arrived.set()
            if not data:
                self._client_closed = True
                if self._in_flight is not None:
                    scope, stream = self._in_flight
                    stream.cancel("local client closed the connection")
                    scope.cancel()
                return

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_client)
            try:
                await self._serve()
            finally:
                nursery.cancel_scope.cancel()

    async def _serve(self) -> None:
        first = True
        while True:
            timeout = self.cfg.header_timeout if first else self.cfg.idle_timeout
            try:
                # One scope per request (a scope costs ~5 µs): the head and body must
                # arrive by its deadline; then, without one, it holds the relay, which
                # _read_client cancels when the client hangs up.
                scope = trio.CancelScope(deadline=trio.current_time() + timeout)
                reading = True
                with scope:
                    event = await self._next_event()
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if not isinstance(event, LocalRequest):
                        return
                    if event.head_size() > self.cfg.max_header_bytes:
                        # The parser only bounds a head that arrives in pieces; bound them all.
                        raise h11.RemoteProtocolError("request head too large",
                                                      error_status_hint=431)
                    # The headers are in; the body must follow promptly too.
                    body = await self._read_body()
                    reading = first = False
                    scope.deadline = math.inf
                    await self._respond(event, body, scope)
                if reading and scope.cancelled_caught:
                    raise trio.TooSlowError
            except trio.TooSlowError:
                if first or self.conn.their_state is not h11.IDLE:
                    log.warning("tool %s: closing a local client that did not send its request "
                                "within %.0f s", self.cfg.tool, timeout)
                    await self._simple(408, "request_timeout",
                                       "the request was not received in time")
                return
            except h11.RemoteProtocolError as exc:
                log.info("tool %s: bad HTTP from a local client: %s", self.cfg.tool, exc)
                status = exc.error_status_hint
                if status == 431:
                    await self._simple(431, "header_too_large",
                                       f"request head over {self.cfg.max_header_bytes} bytes "
                                       "(the agent's --max-header-bytes)")
                else:
                    await self._simple(status, "bad_request", f"malformed HTTP request: {exc}")
                return
            except _BodyTooLarge:
                await self._simple(413, "body_too_large",
                                   f"request body over {self.cfg.max_body_bytes} bytes")
                return
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_body(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.cfg.max_body_bytes:
                    raise _BodyTooLarge
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise h11.RemoteProtocolError("connection closed in the middle of the body")

    async def _simple(self, status: int, code: str, message: str,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """A complete small JSON answer, if the connection can still take one."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = _error_body(code, message)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += extra or []
        try:
            await self._send(response_head(status, headers))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError):
            pass

    async def _respond(self, req: LocalRequest, body: bytes, scope: trio.CancelScope) -> None:
        """Send the request through the tunnel and relay the answer, inside ``scope``
        (cancelled by _read_client on a hang-up)."""
        cfg = self.cfg
        target = req.target.decode("latin-1")
        method = req.method.decode("latin-1")
        headers = tuple(req.headers)  # (bytes, bytes) pairs, as the client sent them
        try:
            stream = await self.listener.mux.open(
                lambda rid: HttpRequest(id=rid, tool=cfg.tool, method=method, target=target,
                                        headers=headers, body=body),
                wait=cfg.link_wait,
            )
        except LinkDown as exc:
            await self._simple(502, "tunnel_down", f"{exc}; the agent keeps reconnecting")
            return
        except FrameTooLarge as exc:
            await self._simple(413, "body_too_large", f"request too large for the tunnel: {exc}")
            return
        try:
            if self._client_closed:
                stream.cancel("local client closed the connection")
                return
            self._in_flight = (scope, stream)
            await self._relay(stream)
        finally:
            self._in_flight = None
            if not stream.done:
                stream.cancel("local client went away")

    async def _relay(self, stream: AgentStream) -> None:
        try:
            first = await stream.receive()
        except StreamLost as exc:
            await self._simple(502, "tunnel_down", f"no answer: {exc}; the agent keeps "
                               "reconnecting, retry shortly")
            return
        try:
            stream.took(first)  # a head, a whole answer or failed may come first
        except ProtocolError as exc:
            log.warning("%s; answering 502", exc)
            await self._simple(502, "protocol", "the server answered out of order")
            stream.cancel("protocol violation")
            return
        if isinstance(first, RequestFailed):
            stream.close()
            extra = []
            if first.retry_after is not None:
                extra.append((b"retry-after", str(first.retry_after).encode()))
            await self._simple(first.status, first.code, first.message, extra)
            return
        if isinstance(first, HttpResponse):
            await self._relay_whole(stream, first)
            return
        assert isinstance(first, HttpHead)  # all that took() leaves
        if first.sse:
            await self._relay_sse(stream, first)
        else:
            await self._relay_body(stream, first)

    def _plain_head(self, status: int, headers: Headers) -> bytes:
        """The local response head of a plain (not SSE) answer: the connection frames it."""
        return self.conn.send_head(status, [(k, v) for k, v in headers
                                            if k.lower() not in HOP_BY_HOP])

    async def _relay_whole(self, stream: AgentStream, answer: HttpResponse) -> None:
        """A whole answer in one frame: head, body and end in one write."""
        stream.close()
        kept = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
        await send_all(self.sock, self.conn.send_whole(answer.status, kept, answer.body))

    async def _relay_body(self, stream: AgentStream, head: HttpHead) -> None:
        """Relay a plain body. What is already queued goes out in one write (a small
        answer's head, body and end: one send instead of three); nothing waits for
        frames that have not arrived."""
        out = [self._plain_head(head.status, head.headers)]
        cost = 0
        while True:
            msg = stream.receive_nowait()
            if msg is None:
                if out:
                    await send_all(self.sock, b"".join(out))
                    out.clear()
                    if cost:
                        stream.consumed(cost)
                        cost = 0
                try:
                    msg = await stream.receive()
                except StreamLost:
                    self._abort("tunnel link lost in the middle of the body")
                    return
            if isinstance(msg, Data):
                out.append(self.conn.send(h11.Data(data=msg.data)) or b"")
                cost += flow_cost(msg)
            elif isinstance(msg, End):
                stream.close()
                out.append(self.conn.send(h11.EndOfMessage()) or b"")
                await send_all(self.sock, b"".join(out))
                return
            else:
                # A failure after the head: cut the connection so the truncation is visible.
                stream.close()
                self._abort(getattr(msg, "message", msg.TYPE))
                return

    def _abort(self, why: str) -> None:
        log.info("tool %s: aborting a local response: %s", self.cfg.tool, why)
        raise ClientGone(why)

    async def _relay_sse(self, stream: AgentStream, head: HttpHead) -> None:
        stream.sse = True
        headers = [(k, v) for k, v in head.headers if k.lower() not in SSE_HEADERS_DROP]
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        sent = self.conn.send(response_head(head.status, headers)) or b""
        # h11 chose the framing (chunked for an HTTP/1.1 client); events are then framed
        # here, which costs a tenth of h11's Data round per write.
        chunked = _CHUNKED_HEADER in sent.lower()
        await send_all(self.sock, sent)
        if self.listener.mux.draining:
            # The agent is stopping: an event stream that only now got its head
            # ends at once (cleanly), like those already open when the drain began.
            stream.stop("the agent is shutting down")
        keepalives = self.listener.keepalives
        keepalives.wrote(stream)
        try:
            await self._relay_events(stream, keepalives, chunked)
        finally:
            keepalives.forget(stream)

    def _sink(self, stream: AgentStream, keepalives: KeepaliveClock) -> Sink | None:
        """Writes an ``sse_raw`` frame as one chunk straight from the link reader, while
        the relay task waits with nothing to write: no task switch per event. What the
        socket does not take at once is left to the relay task (:class:`Unwritten`)."""
        if not isinstance(self.sock, trio.SocketStream):
            return None
        sock = self.sock.socket

        def sink(msg: object) -> bool:
            if type(msg) is not SseRaw:
                return False
            data = msg.data
            frame = b"%x\r\n%s\r\n" % (len(data), data)
            written = write_now(sock, frame)
            if not written:
                return False  # full or closed: the relay task meets it as ever
            cost = len(data) + FRAME_OVERHEAD
            if written < len(frame):
                stream.put_unwritten(frame[written:], cost)
            else:
                keepalives.wrote(stream)
                stream.consumed(cost)
            return True

        return sink

    async def _relay_events(self, stream: AgentStream, keepalives: KeepaliveClock,
                            chunked: bool = False) -> None:
        sink = self._sink(stream, keepalives) if chunked else None
        while True:
            if sink is not None:
                stream.arm(sink)
            try:
                msg = await stream.receive_or_keepalive()
            except StreamLost:
                # End cleanly: EventSource clients reconnect with Last-Event-ID.
                await self._send(h11.EndOfMessage())
                return
            finally:
                stream.sink = None
            if msg is None:
                await self._send(h11.Data(data=b": keepalive\n\n"))
                keepalives.wrote(stream)
                continue
            if isinstance(msg, Unwritten):  # the rest of a chunk the sink began
                await send_all(self.sock, msg.data)
                keepalives.wrote(stream)
                stream.consumed(msg.cost)
                continue
            # One write per wake-up: this event plus any that are already queued behind it.
            out: list[bytes] = []
            cost = 0
            item: RequestMessage | Unwritten | None = msg
            while item is not None:
                if isinstance(item, SseRaw):  # whole blocks as the upstream wrote them
                    out.append(item.data)
                    cost += flow_cost(item)
                elif isinstance(item, SseEvents):
                    out.extend(serialize_event(*fields) for fields in item.events)
                    cost += flow_cost(item)
                elif isinstance(item, SseEvent):
                    out.append(serialize_event(item.event, item.data, item.sse_id, item.retry))
                    cost += flow_cost(item)
                elif isinstance(item, SseComment):
                    out.append(serialize(Comment(text=item.text)))
                    cost += flow_cost(item)
                else:
                    break
                item = stream.queued()
            if out:
                body = b"".join(out)
                if chunked:
                    await send_all(self.sock, b"%x\r\n%s\r\n" % (len(body), body))
                else:
                    await self._send(h11.Data(data=body))
                keepalives.wrote(stream)
                stream.consumed(cost)
            if item is None or isinstance(item, SseRaw | SseEvent | SseEvents | SseComment):
                continue
            stream.close()
            await self._send(h11.EndOfMessage())
            return


class _BodyTooLarge(Exception):
    pass
