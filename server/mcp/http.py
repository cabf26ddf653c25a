"""MCP over Streamable HTTP: one HTTP request of a VM's MCP client, judged message by message.

A ``type: mcp`` tool with a ``url`` is exposed in the VM like an HTTP tool
(``carapace-agent --expose NAME=PORT``). Each request goes to the tool's
``url`` whatever path the VM used, with only the headers MCP needs
(:data:`FORWARDED_HEADERS`) and ``headers_inject``. A POST's body (one
JSON-RPC message or a batch) passes the same :class:`McpFilter` as a stdio
session: what is denied is answered here (a JSON-RPC error with the same id,
``200 application/json``, or ``202`` when nothing is left to answer) and
never reaches the server. The answer, JSON or an event stream, is filtered
the same way (lists cut to what the policy allows) and masked. GET (the
server's own event stream) and DELETE (end of the MCP session) pass, the
stream's messages filtered.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from carapace.protocol.messages import HttpRequest, HttpResponse, replace
from carapace.protocol.sse import Event

from ..masking import Scrubber
from ..policy import INLINE_DECIDE_BYTES, HttpTool, McpTool
from ..policy.mcp import parse_message
from ..streams import ServerStream
from ..upstream import UpstreamClient
from ..upstream.relay import forward_http
from .filter import McpFilter, McpProtocolError, error_reply
from .session import McpSession

FORWARDED_HEADERS: Final = frozenset({
    b"accept", b"content-type", b"mcp-session-id", b"mcp-protocol-version", b"last-event-id",
})
"""The VM's headers that reach an HTTP MCP server; the rest (cookies, an Authorization
of its own) are dropped, and ``headers_inject`` is added."""

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INTERNAL_ERROR: Final = -32603

_JSON: Final = ((b"content-type", b"application/json"),)


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _merge(answer: bytes, replies: bytes) -> bytes:
    """The server's answer to what was forwarded plus Carapace's own replies (a batch)."""
    if not replies:
        return answer.rstrip(b"\n")
    if not answer.strip():
        return replies.rstrip(b"\n")
    mine, theirs = json.loads(replies), json.loads(answer)
    return _compact([*(theirs if isinstance(theirs, list) else [theirs]),
                     *(mine if isinstance(mine, list) else [mine])]).rstrip(b"\n")


def _join(lines: bytes) -> bytes:
    """Lines of JSON-RPC messages as one line: one message, or a batch of them all."""
    docs = [json.loads(line) for line in lines.splitlines() if line.strip()]
    if len(docs) <= 1:
        return _compact(docs[0]) if docs else b""
    return _compact([m for d in docs for m in (d if isinstance(d, list) else [d])])


async def _approvals(session: McpSession, forward: bytes, replies: bytes) -> tuple[bytes, bytes]:
    """The calls of this request held for approval wait here (the request with them);
    the approved ones join what goes to the server, the rest are answered here."""
    for gated in session.filter.take_gated():
        verdict = await session.ask(gated)
        data, reply = session.settle(gated, verdict)
        forward, replies = forward + data, replies + reply
    return _join(forward), _join(replies)


class _JsonAnswer:
    """A JSON answer, whole (held up to the message cap), through the filter at its end."""

    def __init__(self, filt: McpFilter, replies: bytes, limit: int) -> None:
        self.filter, self.replies, self.limit = filt, replies, limit
        self.buf = bytearray()
        self.over = False

    def feed(self, data: bytes) -> bytes:
        if not self.over:
            self.buf += data
            if len(self.buf) > self.limit:
                self.over, self.buf = True, bytearray()
        return b""

    def flush(self) -> bytes:
        if self.over:
            return self._withheld(f"the host MCP server's answer is over {self.limit} bytes "
                                  "(the Carapace server's --mcp-max-message-bytes)")
        if not self.buf.strip():
            return _merge(b"", self.replies)
        doc, problem = parse_message(bytes(self.buf))
        if problem is not None:
            return self._withheld("the host MCP server's answer is not JSON, so it was "
                                  "withheld")
        try:
            out = self.filter.from_server(_compact(doc))
        except McpProtocolError as exc:
            return self._withheld(str(exc))
        return _merge(out, self.replies)

    def _withheld(self, why: str) -> bytes:
        """An error for each request still waiting (so its client stops waiting)."""
        ids = [json.loads(key) for key in self.filter.pending]
        errors = [error_reply(i, INTERNAL_ERROR, why) for i in ids or [None]]
        return _merge(_compact(errors[0] if len(errors) == 1 else errors), self.replies)


class _Events:
    """Each event of an answer stream through the filter; Carapace's replies go first."""

    def __init__(self, filt: McpFilter, replies: bytes, session: McpSession) -> None:
        self.filter, self.replies, self.session = filt, replies, session

    def __call__(self, event: Event) -> list[Event]:
        out: list[Event] = []
        if self.replies:
            out.append(Event(event="message", data=self.replies.rstrip(b"\n").decode()))
            self.replies = b""
        if event.data is None or not event.data.strip():
            return [*out, event]
        try:
            data = self.filter.from_server(event.data.encode("utf-8") + b"\n")
        except McpProtocolError:
            data = b""  # over the cap: withheld
        self.session.flush()
        if data:
            out.append(Event(event=event.event, data=data.rstrip(b"\n").decode("utf-8"),
                             id=event.id, retry=event.retry))
        elif event.id is not None:  # keep the id, so a resumed stream starts after it
            out.append(Event(event=event.event, data=None, id=event.id, retry=event.retry))
        return out


async def _answer(stream: ServerStream, req: HttpRequest, status: int, body: bytes) -> None:
    await stream.send_batch([HttpResponse(id=req.id, status=status,
                                          headers=_JSON if body else (), body=body)])


async def forward_mcp_http(
    client: UpstreamClient, stream: ServerStream, req: HttpRequest, tool: McpTool,
    session: McpSession, scrubber: Scrubber,
    offload: Callable[[Callable[[], Any]], Awaitable[Any]],
) -> None:
    """Judge one HTTP request of an MCP client, answer what is denied, forward the rest."""
    assert tool.url is not None
    filt = session.filter
    body, replies = req.body, b""
    if req.method == "POST":
        def judge() -> tuple[bytes, bytes]:
            if len(req.body) > filt.max_message_bytes:
                raise McpProtocolError(f"the MCP client sent a request body over "
                                       f"{filt.max_message_bytes} bytes (the server's "
                                       "--mcp-max-message-bytes)", "too_large")
            doc, problem = parse_message(req.body)
            if problem is not None:
                raise McpProtocolError(f"the MCP client sent a body that is not JSON: {problem}")
            return filt.from_client(_compact(doc))
        try:
            forward, replies = (await offload(judge) if len(req.body) > INLINE_DECIDE_BYTES
                                else judge())
        except McpProtocolError as exc:
            session.refused(exc)
            await _answer(stream, req, 400, _compact(error_reply(
                None, PARSE_ERROR, str(exc).replace("; the session is closed", ""))))
            return
        finally:
            session.flush()
        forward, replies = await _approvals(session, forward, replies)
        if not forward:
            await _answer(stream, req, 200 if replies else 202, replies.rstrip(b"\n"))
            return
        body = forward.rstrip(b"\n")
    parts = urlsplit(tool.url)
    upstream = HttpTool(name=tool.name, upstream=f"{parts.scheme}://{parts.netloc}",
                        timeout_secs=tool.timeout_secs)
    headers = [(k, v) for k, v in req.headers if k.lower() in FORWARDED_HEADERS]
    headers += [(k.encode("latin-1"), v.encode("latin-1"))
                for k, v in tool.headers_inject.items()]
    await forward_http(client, stream, replace(req, target=parts.path or "/", body=body),
                       tool.name, upstream, headers, scrubber,
                       body_filter=_JsonAnswer(filt, replies, filt.max_message_bytes),
                       event_filter=_Events(filt, replies, session))
