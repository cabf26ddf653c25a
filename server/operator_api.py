"""The operator API (``--debug-listen``): health, connections, metrics, sniff.

A small HTTP/1.1 server on trio + h11, separate from the agent port:

- ``GET /debug/health``       JSON: status, version, uptime, agents, request counters.
- ``GET /debug/connections``  JSON: one entry per connected agent.
- ``GET /metrics``            Prometheus text (see :mod:`carapace.server.metrics`).
- ``GET /debug/sniff``        ``text/event-stream``: one ``data:`` JSON summary per frame
                              (``?type=&tool=&id=&agent=`` filter it); ``event: dropped``
                              records say how many were lost to a slow reader.
- ``GET /debug/approvals``, ``POST /debug/approvals/ID/approve|deny``: the calls
                              waiting for a person (``operator_approvals.py``).

Nothing here can slow the tunnel: a frame observer turns frames into
summaries only while someone is subscribed, and hands them to each
subscriber's bounded queue without waiting — a full queue drops and counts.

On a loopback address no credentials are needed. Any other address needs a
bearer token (``--debug-token-file``): every request must carry
``Authorization: Bearer <token>``, and the server refuses to start without one.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import trio

from carapace.protocol.messages import PROTOCOL_VERSION, Message, RequestMessage
from carapace.protocol.summary import Redactor, RequestTracker, SummaryFilter, frame_record
from carapace.runtime.errors import consists_of
from carapace.runtime.http import DISCONNECTS, RequestHead
from carapace.runtime.transports import transport_of_peer

from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .operator_approvals import MAX_BODY as APPROVAL_MAX_BODY
from .operator_approvals import PREFIX as APPROVALS
from .operator_approvals import approvals_response

if TYPE_CHECKING:
    from .session import AgentSession
    from .view import OperatorView

log = logging.getLogger("carapace.server")

SNIFF_QUEUE = 1024
"""Records buffered per sniff subscriber before new ones are dropped."""
SNIFF_KEEPALIVE = 15.0
REQUEST_TIMEOUT = 30.0
MIN_TOKEN_LENGTH = 16


class DebugConfigError(Exception):
    """The debug listener cannot start as configured; the message says what to change."""


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_debug_token(path: str) -> bytes:
    """The bearer token in ``path`` (one line). Errors name the file, never the token."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DebugConfigError(f"cannot read the debug token file {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise DebugConfigError(f"debug token file {path}: expected one line holding the token")
    if len(lines[0]) < MIN_TOKEN_LENGTH:
        raise DebugConfigError(
            f"debug token file {path}: the token is shorter than {MIN_TOKEN_LENGTH} characters; "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return lines[0].encode()


def debug_access(host: str, port: int, token_file: str | None) -> bytes | None:
    """Check the debug listener's settings at start-up; return its token (None: open).

    A token file, when given, is always enforced; without one only a loopback
    address is allowed.
    """
    if token_file:
        return load_debug_token(token_file)
    if not is_loopback(host):
        raise DebugConfigError(
            f"--debug-listen {host}:{port} is not a loopback address: anyone who can reach it "
            "could watch the tunnel. Give --debug-token-file FILE (CARAPACE_DEBUG_TOKEN_FILE) "
            "so that every request needs 'Authorization: Bearer <token>', or listen on "
            "127.0.0.1."
        )
    return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# --------------------------------------------------------------------------- sniff


class Subscriber:
    """One sniff client: a bounded queue of encoded SSE records and its filter."""

    def __init__(self, filter: SummaryFilter, size: int) -> None:
        self.filter = filter
        self.send, self.receive = trio.open_memory_channel[bytes](size)
        self.pending_drops = 0
        self.dropped = 0

    def offer(self, chunk: bytes) -> bool:
        """Queue ``chunk`` without waiting; False (and counted) if the queue is full."""
        if self.pending_drops:
            note = {"type": "dropped", "ts": time.time(), "dropped": self.pending_drops,
                    "summary": f"{self.pending_drops} frame(s) dropped: this client reads "
                    "more slowly than the tunnel runs"}
            try:
                self.send.send_nowait(b"event: dropped\ndata: " + json.dumps(note).encode()
                                      + b"\n\n")
            except trio.WouldBlock:
                self.pending_drops += 1
                self.dropped += 1
                return False
            self.pending_drops = 0
        try:
            self.send.send_nowait(chunk)
        except trio.WouldBlock:
            self.pending_drops += 1
            self.dropped += 1
            return False
        return True


class SniffHub:
    """The frame observer behind ``/debug/sniff``."""

    def __init__(self, server: OperatorView, metrics: ServerMetrics,
                 queue_size: int = SNIFF_QUEUE) -> None:
        self.server = server
        self.metrics = metrics
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self._trackers: weakref.WeakKeyDictionary[AgentSession, RequestTracker] = (
            weakref.WeakKeyDictionary())
        self._policy: object = None
        self._redactor = Redactor()
        self._failed = False

    def redactor(self) -> Redactor:
        """A Redactor for the policy's secrets and the agents' tokens (rebuilt on reload)."""
        policy = self.server.policy
        if policy is not self._policy:
            self._redactor = Redactor(self.server.secrets())
            self._policy = policy
        return self._redactor

    def subscribe(self, filter: SummaryFilter) -> Subscriber:
        sub = Subscriber(filter, self.queue_size)
        self.subscribers.add(sub)
        self.metrics.sniff_subscribers = len(self.subscribers)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.metrics.sniff_subscribers = len(self.subscribers)
        sub.send.close()

    def observe(self, session: AgentSession, direction: str, msg: Message) -> None:
        try:
            tracker = self._trackers.get(session)
            if tracker is None:
                tracker = self._trackers[session] = RequestTracker()
            tool = tracker.observe("in" if direction == "in" else "out", msg)
            if not self.subscribers:
                return
            request_id = msg.id if isinstance(msg, RequestMessage) else None
            chunk: bytes | None = None
            for sub in list(self.subscribers):
                if not sub.filter.matches(msg.TYPE, request_id, tool, session.agent):
                    continue
                if chunk is None:
                    record = frame_record(
                        msg, "in" if direction == "in" else "out", ts=time.time(),
                        agent=session.agent, tool=tool, redactor=self.redactor(),
                    )
                    chunk = b"data: " + json.dumps(record).encode() + b"\n\n"
                if not sub.offer(chunk):
                    self.metrics.sniff_dropped += 1
        except Exception:  # an observer must never break the link it watches
            if not self._failed:
                self._failed = True
                log.exception("sniff feed failed to summarise a %s frame; "
                              "later failures are not logged", msg.TYPE)


    def observe_mcp(self, record: dict[str, Any]) -> None:
        """One MCP call (``server/mcp/session.py``): to each subscriber whose filter takes
        it; ``--tool`` matches the policy tool or the MCP tool's own name."""
        if not self.subscribers:
            return
        chunk: bytes | None = None
        for sub in list(self.subscribers):
            f = sub.filter
            if f.tool is not None and f.tool not in (record.get("tool"), record.get("mcp_tool")):
                continue
            if not f.matches("mcp_call", record.get("id"), f.tool, record.get("agent")):
                continue
            if chunk is None:
                redactor = self.redactor()
                shown = {k: redactor.text(v) if isinstance(v, str) else v
                         for k, v in record.items()}
                chunk = b"data: " + json.dumps(shown).encode() + b"\n\n"
            if not sub.offer(chunk):
                self.metrics.sniff_dropped += 1


# --------------------------------------------------------------------------- HTTP


class OperatorApi:
    """The HTTP endpoints an operator (or ``carapace-debug``) reads the server through."""

    def __init__(self, server: OperatorView, metrics: ServerMetrics, host: str, port: int,
                 token: bytes | None) -> None:
        if token is None and not is_loopback(host):
            raise DebugConfigError(
                f"the debug listener on {host} (not loopback) needs a bearer token "
                "(--debug-token-file)"
            )
        self.server = server
        self.host = host
        self.port = port
        self.token = token
        self.metrics = metrics
        self.hub = SniffHub(server, self.metrics)

    async def serve(self, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            log.error("cannot open the debug listener on %s:%d (--debug-listen): %s",
                      self.host, self.port, exc.strerror or exc)
            raise
        self.metrics.attach()
        self.server.frame_observers.append(self.hub.observe)
        self.server.mcp_observers.append(self.hub.observe_mcp)
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            log.info("debug listener on http://%s:%d (health, connections, /metrics, sniff%s)",
                     host, port, "; bearer token required" if self.token else "")
        task_status.started(listeners)
        try:
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for observer in (self.hub.observe, self.metrics.observe):
                if observer in self.server.frame_observers:
                    self.server.frame_observers.remove(observer)
            if self.hub.observe_mcp in self.server.mcp_observers:
                self.server.mcp_observers.remove(self.hub.observe_mcp)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    request = None
                    with trio.move_on_after(REQUEST_TIMEOUT):
                        request = await self._read_request(stream, conn)
                    if request is None:
                        return
                    await self._route(stream, conn, *request)
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception as exc:  # one debug client must never take the server down
            if not consists_of(exc, DISCONNECTS):
                log.exception("debug listener: request failed")

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection
                            ) -> tuple[RequestHead, bytes] | None:
        request: RequestHead | None = None
        body = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                await self._send(stream, conn, 400, {"error": "bad request"})
                return None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and conn.their_state is h11.IDLE:
                    return None
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = RequestHead(event)
            elif isinstance(event, h11.EndOfMessage):
                return None if request is None else (request, body)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif isinstance(event, h11.Data):
                # Only the approval decisions have a body, and a short one.
                if len(body) + len(event.data) > APPROVAL_MAX_BODY:
                    await self._send(stream, conn, 413, {"error": "request body too large"})
                    return None
                body += bytes(event.data)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, status: int,
                    body: dict[str, Any] | bytes, content_type: str = "application/json",
                    extra: list[tuple[str, str]] | None = None) -> None:
        payload = body if isinstance(body, bytes) else (
            json.dumps(body, indent=None).encode() + b"\n")
        headers = [("Content-Type", content_type), ("Content-Length", str(len(payload))),
                   ("Cache-Control", "no-store"), *(extra or [])]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data or b"")

    def _authorized(self, request: RequestHead) -> bool:
        if self.token is None:
            return True
        given = (request.header("authorization") or "").encode("latin-1")
        return hmac.compare_digest(given, b"Bearer " + self.token)

    async def _route(self, stream: trio.SocketStream, conn: h11.Connection,
                     request: RequestHead, body: bytes = b"") -> None:
        if not self._authorized(request):
            await self._send(stream, conn, 401, {
                "error": "this debug listener needs 'Authorization: Bearer <token>' "
                "(carapace-debug --debug-token-file FILE)"},
                extra=[("WWW-Authenticate", 'Bearer realm="carapace-debug"')])
            return
        routes: dict[str, Callable[[RequestHead], Any]] = {
            "/debug/health": self.health,
            "/debug/connections": self.connections,
        }
        path = request.path.rstrip("/") or "/"
        if path == APPROVALS or path.startswith(APPROVALS + "/"):
            status, doc, extra = approvals_response(self.server.approvals, request.method,
                                                    path, body)
            await self._send(stream, conn, status, doc, extra=extra)
            return
        if path not in (*routes, "/metrics", "/debug/sniff", "/"):
            await self._send(stream, conn, 404, {
                "error": f"no such endpoint {path[:100]!r}",
                "endpoints": ["/debug/health", "/debug/connections", "/metrics",
                              "/debug/sniff", APPROVALS]})
            return
        if request.method != "GET":
            await self._send(stream, conn, 405, {"error": "only GET is supported"},
                             extra=[("Allow", "GET")])
            return
        if path == "/":
            await self._send(stream, conn, 200, {
                "endpoints": ["/debug/health", "/debug/connections", "/metrics",
                              "/debug/sniff?type=&tool=&id=&agent=", APPROVALS,
                              f"POST {APPROVALS}/ID/approve", f"POST {APPROVALS}/ID/deny"]})
        elif path == "/metrics":
            await self._send(stream, conn, 200, self.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/debug/sniff":
            await self._sniff(stream, conn, request)
        else:
            await self._send(stream, conn, 200, routes[path](request))

    # -- endpoints ------------------------------------------------------------------
    def health(self, request: RequestHead | None = None) -> dict[str, Any]:
        server = self.server
        stats = server.stats
        requests: dict[str, dict[str, int]] = {
            "http": {"allow": 0, "deny": 0}, "cli": {"allow": 0, "deny": 0}}
        for (kind, decision), count in sorted(stats.requests.items()):
            requests.setdefault(kind, {})[decision] = count
        return {
            "status": "draining" if server.draining else "ok",
            "version": server.version,
            "protocol_version": PROTOCOL_VERSION,
            "started": _iso(stats.started),
            "uptime_s": round(time.time() - stats.started, 3),
            "agents_connected": len(server.sessions),
            "agents": sorted(server.sessions),
            "open_streams": sum(len(s.streams) for s in server.sessions.values()),
            "requests": requests,
            "requests_total": sum(stats.requests.values()),
            "denied_total": sum(c for (_, d), c in stats.requests.items() if d != "allow"),
            "errors": stats.errors,
            "handshake_failures": stats.handshake_failures,
            "protocol_errors": stats.protocol_errors,
            "connections_total": stats.connections,
            "frames_in": stats.frames_in,
            "frames_out": stats.frames_out,
            "unknown_id_frames": stats.unknown_id_frames,
            "sse_events": self.metrics.events_forwarded,
            "policy": {"file": server.config.policy_file, "tools": sorted(server.policy.tools)},
            "audit_log": server.config.audit_log,
            "audit_denials_suppressed": server.denials_suppressed,
            "sniff": {"subscribers": len(self.hub.subscribers),
                      "dropped": self.metrics.sniff_dropped},
            "sandbox": dataclasses.asdict(server.sandbox_status),
        }

    def connections(self, request: RequestHead | None = None) -> dict[str, Any]:
        now = time.time()
        agents = []
        for name, session in sorted(self.server.sessions.items()):
            rtt = session.last_rtt
            reader, writer = session.reader, session.writer
            agents.append({
                "name": name,
                "address": session.peer,
                "transport": transport_of_peer(session.peer),
                "attached": session.attached,
                "links": session.links,
                "connected_since": _iso(session.connected_at),
                "connected_for_s": round(now - session.connected_at, 3),
                "protocol_version": session.version,
                "open_streams": len(session.streams),
                "bytes_in": reader.bytes_received if reader is not None else 0,
                "bytes_out": writer.bytes_sent if writer is not None else 0,
                "frames_in": reader.frames_received if reader is not None else 0,
                "frames_out": writer.frames_sent if writer is not None else 0,
                "last_ping_rtt_ms": None if rtt is None else round(rtt * 1000, 3),
            })
        return {"agents": agents, "count": len(agents)}

    async def _sniff(self, stream: trio.SocketStream, conn: h11.Connection,
                     request: RequestHead) -> None:
        try:
            filter = SummaryFilter.from_query(request.query)
        except ValueError as exc:
            await self._send(stream, conn, 400, {"error": str(exc)})
            return
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                   ("X-Accel-Buffering", "no"), ("Connection", "close")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        sub = self.hub.subscribe(filter)
        log.info("sniff client connected (%s)", _describe(filter))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_close, stream, nursery.cancel_scope)
                await self._pump(stream, conn, sub)
                nursery.cancel_scope.cancel()
        finally:
            self.hub.unsubscribe(sub)
            log.info("sniff client left (%d record(s) dropped)", sub.dropped)

    async def _pump(self, stream: trio.SocketStream, conn: h11.Connection,
                    sub: Subscriber) -> None:
        await stream.send_all(conn.send(h11.Data(data=b": carapace sniff feed\n\n")) or b"")
        while True:
            with trio.move_on_after(SNIFF_KEEPALIVE):
                first = await sub.receive.receive()
                batch = [first]
                while len(batch) < 256:
                    try:
                        batch.append(sub.receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await stream.send_all(conn.send(h11.Data(data=b"".join(batch))) or b"")
                continue
            await stream.send_all(conn.send(h11.Data(data=b": keepalive\n\n")) or b"")


async def _watch_close(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """End the sniff response as soon as its client goes away."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


def _describe(filter: SummaryFilter) -> str:
    parts = [f"type={','.join(sorted(filter.types))}"] if filter.types else []
    parts += [f"{k}={v}" for k, v in (("tool", filter.tool), ("id", filter.id),
                                      ("agent", filter.agent)) if v is not None]
    return " ".join(parts) or "no filter"
