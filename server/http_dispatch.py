"""HTTP tools: send the agent's request upstream with httpx and stream the answer back.

A ``text/event-stream`` answer (recognised by its Content-Type, never by its
path) is parsed as it arrives and each event leaves in its own frame the
moment its blank line is read; anything else is relayed as raw body chunks.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import httpx
import trio

from carapace.protocol.messages import (
    Data,
    End,
    HttpHead,
    HttpRequest,
    RequestFailed,
    SseComment,
    SseEvent,
)
from carapace.protocol.sse import Comment, SseParser

from .metrics import event_forwarded
from .streams import ServerStream

if TYPE_CHECKING:
    from .policy import HttpTool

log = logging.getLogger("carapace.server")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


def response_headers(
    headers: list[tuple[bytes, bytes]], sse: bool
) -> tuple[tuple[bytes, bytes], ...]:
    """Upstream response headers minus hop-by-hop ones (and framing ones for SSE)."""
    named = {
        v.strip().lower()
        for k, value in headers
        if k.lower() == b"connection"
        for v in value.split(b",")
    }
    drop = HOP_BY_HOP | named
    if sse:
        # Events are re-serialised by the agent: length and encoding no longer apply.
        drop = drop | {b"content-length", b"content-encoding"}
    return tuple((k, v) for k, v in headers if k.lower() not in drop)


def make_client() -> httpx.AsyncClient:
    """One pooled client for all upstreams. Timeouts are set per request."""
    transport = httpx.AsyncHTTPTransport(
        retries=0,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=200),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False)


def is_event_stream(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


async def forward_http(
    client: httpx.AsyncClient,
    stream: ServerStream,
    req: HttpRequest,
    tool_name: str,
    tool: HttpTool,
    headers: list[tuple[bytes, bytes]],
) -> int:
    """Run one request against the tool's upstream; return the number of SSE events sent.

    Every outcome ends the request on the wire: ``end`` after a body, or
    ``failed`` with a status the local client understands.
    """
    url = tool.upstream.rstrip("/") + req.target
    timeout = float(tool.timeout_secs or 30)
    request = client.build_request(
        req.method,
        url,
        headers=headers,
        content=req.body,
        timeout=httpx.Timeout(timeout, read=None, pool=timeout),
    )
    events = 0
    try:
        with trio.fail_after(timeout):
            response = await client.send(request, stream=True)
    except (trio.TooSlowError, httpx.TimeoutException):
        log.warning("upstream of tool %s (%s) did not answer within %.0f s", tool_name,
                    tool.upstream, timeout)
        stream.finished = True
        stream.send_control(RequestFailed(
            id=req.id, status=504, code="upstream_timeout",
            message=f"the host service behind tool {tool_name!r} did not answer within "
            f"{timeout:.0f} s (timeout_secs); check that it is healthy",
        ))
        return 0
    except httpx.HTTPError as exc:
        log.warning("upstream of tool %s (%s) unreachable: %s", tool_name, tool.upstream, exc)
        stream.finished = True
        stream.send_control(RequestFailed(
            id=req.id, status=502, code="upstream_unavailable",
            message=f"the host service behind tool {tool_name!r} is unreachable "
            f"({type(exc).__name__}); check that it is running on the host",
        ))
        return 0
    try:
        sse = is_event_stream(response.headers.get("content-type"))
        stream.sse = sse
        stream.send_control(HttpHead(
            id=req.id,
            status=response.status_code,
            headers=response_headers(list(response.headers.raw), sse),
            sse=sse,
        ))
        if sse:
            events = await _relay_events(stream, req.id, response, timeout)
        else:
            await _relay_body(stream, req.id, response, timeout)
        stream.finished = True
        stream.send_control(End(id=req.id))
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        log.warning("upstream of tool %s broke off mid-response: %s", tool_name, exc)
        stream.finished = True
        stream.send_control(RequestFailed(
            id=req.id, status=502, code="upstream_unavailable",
            message=f"the host service behind tool {tool_name!r} broke off the response",
        ))
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await response.aclose()
    return events


async def _relay_body(
    stream: ServerStream, request_id: int, response: httpx.Response, idle: float
) -> None:
    chunks = response.aiter_raw()
    while True:
        with trio.fail_after(idle):
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        if chunk:
            await stream.send(Data(id=request_id, data=chunk))


async def _relay_events(
    stream: ServerStream, request_id: int, response: httpx.Response, idle: float
) -> int:
    parser = SseParser()
    sent = 0
    async for chunk in response.aiter_bytes():
        arrived = trio.current_time()
        for item in parser.feed(chunk):
            if isinstance(item, Comment):
                await stream.send(SseComment(id=request_id, text=item.text))
            else:
                await stream.send(SseEvent(
                    id=request_id, event=item.event, data=item.data, sse_id=item.id,
                    retry=item.retry,
                ))
                sent += 1
                event_forwarded(stream, arrived)
    for item in parser.close():
        if not isinstance(item, Comment):
            await stream.send(SseEvent(
                id=request_id, event=item.event, data=item.data, sse_id=item.id,
                retry=item.retry,
            ))
            sent += 1
            event_forwarded(stream)
    stream.events_out += sent
    return sent
