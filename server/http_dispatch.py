"""HTTP tools: send the agent's request upstream with httpx and stream the answer back.

A ``text/event-stream`` answer (recognised by its Content-Type, never by its
path) is parsed as it arrives and each event leaves in its own frame the
moment its blank line is read; anything else is relayed as raw body chunks.

When the policy injects secrets, everything that goes back is scrubbed of
them (server/masking.py): header names and values, the body as a stream,
the event stream's bytes and then its events, error texts. The request asks
the upstream for ``Accept-Encoding: identity`` (a compressed body cannot be
scrubbed as it streams); an upstream that compresses anyway is decoded here
if httpx can (gzip, deflate), and refused with a 502 if it cannot. A
scrubbed body may change length, so ``Content-Length`` is dropped from the
head and the agent frames the body itself (chunked).
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
    from .masking import Scrubber, StreamScrubber
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


SCRUBBABLE_ENCODINGS = frozenset({"identity", "gzip", "deflate"})
"""Content-Encodings a masked response may have: httpx decodes them before scrubbing."""


def _said(scrubber: Scrubber | None, text: str) -> str:
    """An error text for the VM, scrubbed when the policy injects secrets."""
    return scrubber.scrub_text(text) if scrubber is not None and scrubber.active else text


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
    scrubber: Scrubber | None = None,
) -> int:
    """Run one request against the tool's upstream; return the number of SSE events sent.

    Every outcome ends the request on the wire: ``end`` after a body, or
    ``failed`` with a status the local client understands. With an active
    ``scrubber`` every byte of the answer is scrubbed of its secrets.
    """
    if scrubber is not None and not scrubber.active:
        scrubber = None
    if scrubber is not None:
        headers = [(k, v) for k, v in headers if k.lower() != b"accept-encoding"]
        headers.append((b"Accept-Encoding", b"identity"))
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
            message=_said(scrubber, f"the host service behind tool {tool_name!r} did not "
                          f"answer within {timeout:.0f} s (timeout_secs); check that it is "
                          "healthy"),
        ))
        return 0
    except httpx.HTTPError as exc:
        log.warning("upstream of tool %s (%s) unreachable: %s", tool_name, tool.upstream, exc)
        stream.finished = True
        stream.send_control(RequestFailed(
            id=req.id, status=502, code="upstream_unavailable",
            message=_said(scrubber, f"the host service behind tool {tool_name!r} is "
                          f"unreachable ({type(exc).__name__}); check that it is running on "
                          "the host"),
        ))
        return 0
    try:
        sse = is_event_stream(response.headers.get("content-type"))
        stream.sse = sse
        out_headers = response_headers(list(response.headers.raw), sse)
        decode = False
        if scrubber is not None:
            encodings = {e.strip().lower() for e in
                         response.headers.get("content-encoding", "").split(",") if e.strip()}
            if not sse and not encodings <= SCRUBBABLE_ENCODINGS:
                log.warning("upstream of tool %s answered with Content-Encoding %s despite "
                            "Accept-Encoding: identity; refused (it cannot be scrubbed)",
                            tool_name, ", ".join(sorted(encodings)))
                stream.finished = True
                stream.send_control(RequestFailed(
                    id=req.id, status=502, code="upstream_unavailable",
                    message=_said(scrubber, f"the host service behind tool {tool_name!r} "
                                  "compressed its answer in a way Carapace cannot check for "
                                  "secrets; configure it to answer uncompressed"),
                ))
                return 0
            decode = bool(encodings - {"identity"})
            drop = {b"content-length", b"content-encoding"} if decode else {b"content-length"}
            out_headers = scrubber.scrub_headers(
                (k, v) for k, v in out_headers if k.lower() not in drop)
        stream.send_control(HttpHead(
            id=req.id,
            status=response.status_code,
            headers=out_headers,
            sse=sse,
        ))
        if sse:
            events = await _relay_events(stream, req.id, response, timeout, scrubber)
        else:
            await _relay_body(stream, req.id, response, timeout,
                              scrubber.stream() if scrubber is not None else None, decode)
        stream.finished = True
        stream.send_control(End(id=req.id))
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        log.warning("upstream of tool %s broke off mid-response: %s", tool_name, exc)
        stream.finished = True
        stream.send_control(RequestFailed(
            id=req.id, status=502, code="upstream_unavailable",
            message=_said(scrubber, f"the host service behind tool {tool_name!r} broke off "
                          "the response"),
        ))
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await response.aclose()
    return events


async def _relay_body(
    stream: ServerStream, request_id: int, response: httpx.Response, idle: float,
    scrub: StreamScrubber | None = None, decode: bool = False,
) -> None:
    chunks = response.aiter_bytes() if decode else response.aiter_raw()
    while True:
        with trio.fail_after(idle):
            chunk = await anext(chunks, None)
        if chunk is None:
            break
        if scrub is not None:
            chunk = scrub.feed(chunk)
        if chunk:
            await stream.send(Data(id=request_id, data=chunk))
    if scrub is not None and (rest := scrub.flush()):
        await stream.send(Data(id=request_id, data=rest))


async def _relay_events(
    stream: ServerStream, request_id: int, response: httpx.Response, idle: float,
    scrubber: Scrubber | None = None,
) -> int:
    if scrubber is not None:
        return await _relay_scrubbed_events(stream, request_id, response, scrubber)
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


async def _relay_scrubbed_events(
    stream: ServerStream, request_id: int, response: httpx.Response, scrubber: Scrubber
) -> int:
    """:func:`_relay_events` for a policy with secrets: the bytes are scrubbed before they
    are parsed, then the events pass the rule for a secret split across two events."""
    parser = SseParser()
    scrub = scrubber.stream()
    split = scrubber.events()
    sent = 0
    arrived: float | None = None
    done = False
    chunks = response.aiter_bytes()
    while not done:
        chunk = await anext(chunks, None)
        if chunk is None:
            done = True
            arrived = None
            items = [*parser.feed(scrub.flush()),
                     *(i for i in parser.close() if not isinstance(i, Comment))]
        else:
            arrived = trio.current_time()
            items = parser.feed(scrub.feed(chunk))
        for item in items:
            if isinstance(item, Comment):
                await stream.send(SseComment(id=request_id, text=item.text))
                continue
            for event in split.feed(item):
                await stream.send(SseEvent(
                    id=request_id, event=event.event, data=event.data, sse_id=event.id,
                    retry=event.retry,
                ))
                sent += 1
                event_forwarded(stream, arrived)
    for event in split.flush():
        await stream.send(SseEvent(
            id=request_id, event=event.event, data=event.data, sse_id=event.id,
            retry=event.retry,
        ))
        sent += 1
        event_forwarded(stream)
    stream.events_out += sent
    return sent
