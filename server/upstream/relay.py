"""HTTP tools: send the agent's request upstream and stream the answer back.

The upstream client is :mod:`.client` (h11, O(1) keep-alive pool;
why not httpx is written there). A ``text/event-stream`` answer (recognised
by its Content-Type, never by its path) is cut at its blank lines as it
arrives and each event leaves the moment its blank line is read — the
events of one upstream read go out together (as the bytes they came in when
nothing rewrites them, else parsed into fields), with one credit check, one
metrics update and one audit count; anything else is relayed as raw body
chunks, content-encoding and all. Only the request's own headers go
upstream (no ``Accept-Encoding`` is added), but an event stream must be
read to be parsed: one that comes gzip- or deflate-compressed anyway is
decoded here, and one in another encoding is refused with a 502.

When the policy injects secrets, everything that goes back is scrubbed of
them (server/masking/): header names and values, the body as a stream,
the event stream's bytes and then its events, error texts. The request asks
the upstream for ``Accept-Encoding: identity`` (a compressed body cannot be
scrubbed as it streams); an upstream that compresses anyway is decoded here
if it can be (gzip, deflate), and refused with a 502 if it cannot. A
scrubbed body may change length, so ``Content-Length`` is dropped from the
head and the agent frames the body itself (chunked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from carapace.protocol.flow import DEFAULT_WINDOW
from carapace.protocol.messages import (
    Data,
    End,
    HttpHead,
    HttpRequest,
    HttpResponse,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
)
from carapace.protocol.sse import Comment, Event, SseBlocks, SseParser
from carapace.runtime.http import HOP_BY_HOP

from ..policy import DEFAULT_TIMEOUT_SECS
from ..shares import Refusal, Slot
from ..streams import ServerStream
from .client import UpstreamClient, UpstreamResponse
from .decoding import ContentDecoder
from .errors import (
    UnsupportedEncoding,
    UpstreamError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from ..masking import EventScrubber, Scrubber, StreamScrubber
    from ..policy import HttpTool

log = logging.getLogger("carapace.server")

EventFilter = Callable[[Event], list[Event]]
"""Rewrites one parsed event on its way to the VM: none, it, or others (MCP over HTTP)."""


class BodyFilter(Protocol):
    """Rewrites a non-event body (MCP over HTTP): ``feed`` what came, ``flush`` at its end."""

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Chained:
    """``first`` then ``second``, as one body filter."""

    def __init__(self, first: BodyFilter, second: BodyFilter | None) -> None:
        self.first, self.second = first, second

    def feed(self, data: bytes) -> bytes:
        out = self.first.feed(data)
        return self.second.feed(out) if self.second is not None else out

    def flush(self) -> bytes:
        out = self.first.flush()
        if self.second is None:
            return out
        return self.second.feed(out) + self.second.flush()


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


def _said(scrubber: Scrubber | None, text: str) -> str:
    """An error text for the VM, scrubbed when the policy injects secrets."""
    return scrubber.scrub_text(text) if scrubber is not None and scrubber.active else text


def is_event_stream(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


async def forward_http(
    client: UpstreamClient,
    stream: ServerStream,
    req: HttpRequest,
    tool_name: str,
    tool: HttpTool,
    headers: list[tuple[bytes, bytes]],
    scrubber: Scrubber | None = None,
    admit_sse: Callable[[], Slot | Refusal] | None = None,
    body_filter: BodyFilter | None = None,
    event_filter: EventFilter | None = None,
) -> None:
    """Run one request against the tool's upstream.

    Every outcome ends the request on the wire: ``end`` after a body, or
    ``failed`` with a status the local client understands. With an active
    ``scrubber`` every byte of the answer is scrubbed of its secrets.
    ``admit_sse`` is asked for a slot when the answer is an event stream
    (``shares.py``); a refusal closes the upstream connection and fails the
    request with its status and ``retry_after`` instead of holding it open.
    ``body_filter`` and ``event_filter`` rewrite the answer before it is
    scrubbed (an MCP server's answers, judged message by message).
    """
    if scrubber is not None and not scrubber.active:
        scrubber = None
    if scrubber is not None:
        headers = [(k, v) for k, v in headers if k.lower() != b"accept-encoding"]
        headers.append((b"Accept-Encoding", b"identity"))
    timeout = float(tool.timeout_secs or DEFAULT_TIMEOUT_SECS)
    response = await _request(client, stream, req, tool_name, tool, headers, timeout, scrubber)
    if response is None:
        return
    slot: Slot | Refusal | None = None
    try:
        content_type = response.header(b"content-type")
        sse = is_event_stream(content_type.decode("latin-1") if content_type else None)
        if sse and admit_sse is not None:
            slot = admit_sse()
            if isinstance(slot, Refusal):
                stream.fail(slot.status, slot.code, f"refused: {slot.reason}", slot.retry_after)
                return
        stream.sse = sse
        out_headers = response_headers(response.headers, sse)
        encoding = b", ".join(response.header_values(b"content-encoding"))
        decoder: ContentDecoder | None = None
        rewrites = body_filter is not None or event_filter is not None
        if sse or scrubber is not None or rewrites:
            # Read here, so it must be readable: decode gzip/deflate, refuse the rest.
            try:
                decoder = ContentDecoder(encoding)
            except UnsupportedEncoding:
                why = "read" if sse else "check for secrets"
                log.warning("upstream of tool %s answered with Content-Encoding %s, which "
                            "Carapace cannot %s; refused", tool_name,
                            encoding.decode("latin-1"), why)
                stream.fail(502, "upstream_unavailable",
                            _said(scrubber, f"the host service behind tool {tool_name!r} "
                                  f"compressed its answer in a way Carapace cannot {why}; "
                                  "configure it to answer uncompressed"))
                return
            if decoder.identity:
                decoder = None
        if scrubber is not None:
            drop = {b"content-length", b"content-encoding"} if decoder else {b"content-length"}
            out_headers = scrubber.scrub_headers(
                (k, v) for k, v in out_headers if k.lower() not in drop)
        elif rewrites:
            drop = {b"content-length", b"content-encoding"} if decoder else {b"content-length"}
            out_headers = tuple((k, v) for k, v in out_headers if k.lower() not in drop)
        head = HttpHead(id=req.id, status=response.status, headers=out_headers, sse=sse)
        if sse:
            stream.send_control(head)
            await _relay_events(stream, req.id, response, decoder, scrubber, event_filter)
            stream.send_control(End(id=req.id))
        else:
            scrub = scrubber.stream() if scrubber is not None else None
            await _relay_body(stream, head, response, timeout,
                              _Chained(body_filter, scrub) if body_filter is not None else scrub,
                              decoder)
    except UpstreamError as exc:
        log.warning("upstream of tool %s broke off mid-response: %s", tool_name, exc)
        stream.fail(502, "upstream_unavailable",
                    _said(scrubber, f"the host service behind tool {tool_name!r} broke off "
                          "the response"))
    finally:
        response.close()  # pooled if read to its end, else closed; no I/O
        if isinstance(slot, Slot):
            slot.release()


async def _request(
    client: UpstreamClient,
    stream: ServerStream,
    req: HttpRequest,
    tool_name: str,
    tool: HttpTool,
    headers: list[tuple[bytes, bytes]],
    timeout: float,
    scrubber: Scrubber | None,
) -> UpstreamResponse | None:
    """Send the request upstream and wait for its head; None (the stream failed with
    504 or 502) when the upstream does not answer in time or cannot be reached."""
    url = (tool.upstream.rstrip("/"), req.target)  # split already: no URL parsing per request
    try:
        return await client.request(req.method, url, headers, req.body, timeout)
    except UpstreamTimeout:
        log.warning("upstream of tool %s (%s) did not answer within %.0f s", tool_name,
                    tool.upstream, timeout)
        stream.fail(504, "upstream_timeout",
                    _said(scrubber, f"the host service behind tool {tool_name!r} did not "
                          f"answer within {timeout:.0f} s (timeout_secs); check that it is "
                          "healthy"))
    except UpstreamError as exc:
        log.warning("upstream of tool %s (%s) unreachable: %s", tool_name, tool.upstream, exc)
        stream.fail(502, "upstream_unavailable",
                    _said(scrubber, f"the host service behind tool {tool_name!r} is "
                          f"unreachable ({type(exc).__name__}); check that it is running on "
                          "the host"))
    return None


BULK_READ = 256 * 1024
"""Bytes asked of the upstream's socket per read of a plain body."""

MAX_DATA = DEFAULT_WINDOW // 2
"""Largest ``data`` frame (128 KiB): the credit the agent returns at a time, so one frame
is being written to the local client while the next one travels."""

WHOLE_ANSWER_MAX = 64 * 1024
"""Largest body sent in one ``http_response`` frame; larger ones go as ``data`` frames."""


async def _relay_body(
    stream: ServerStream, head: HttpHead, response: UpstreamResponse, idle: float,
    scrub: StreamScrubber | BodyFilter | None = None, decoder: ContentDecoder | None = None,
) -> None:
    """Head, body as it arrives (raw unless ``decoder``), then ``end``.

    What has already arrived leaves together before the next wait; an answer
    whose whole body came with its head is one ``http_response`` frame (up to
    ``WHOLE_ANSWER_MAX``), which the agent hands on with one channel send
    instead of three. Waiting ``idle`` s for a chunk fails.
    """
    request_id = head.id
    ready: list[HttpHead | Data | End] = [head]
    try:
        while True:
            try:
                chunk = response.next_chunk_nowait()
            except trio.WouldBlock:
                await stream.send_batch(ready)
                ready = []
                chunk = await response.next_chunk(idle, BULK_READ)
            if chunk is None:
                break
            if decoder is not None:
                chunk = decoder.feed(chunk)
            if scrub is not None:
                chunk = scrub.feed(chunk)
            if len(chunk) > MAX_DATA:  # a bulk read
                ready.extend(Data(id=request_id, data=chunk[i:i + MAX_DATA])
                             for i in range(0, len(chunk), MAX_DATA))
            elif chunk:
                ready.append(Data(id=request_id, data=chunk))
        rest = decoder.flush() if decoder is not None else b""
    except UpstreamError:
        await stream.send_batch(ready)  # what came before the break still goes first
        raise
    if scrub is not None:
        rest = scrub.feed(rest) + scrub.flush() if rest else scrub.flush()
    if rest:
        ready.append(Data(id=request_id, data=rest))
    if ready and ready[0] is head:  # nothing has gone yet: the whole answer is at hand
        body = b"".join([msg.data for msg in ready[1:] if isinstance(msg, Data)])
        if len(body) <= WHOLE_ANSWER_MAX:
            await stream.send_batch([HttpResponse(id=request_id, status=head.status,
                                                  headers=head.headers, body=body)])
            return
    ready.append(End(id=request_id))
    await stream.send_batch(ready)


async def _relay_events(
    stream: ServerStream, request_id: int, response: UpstreamResponse,
    decoder: ContentDecoder | None = None, scrubber: Scrubber | None = None,
    event_filter: EventFilter | None = None,
) -> None:
    """Send the event stream on as it arrives: each upstream read's events together.

    No idle timeout: an event stream may be quiet for as long as it likes.
    When nothing is rewritten, the whole blocks of each read travel as they
    are (``sse_raw``: found by their blank lines, not parsed into fields and
    re-serialised), as long as the stream allows (:class:`SseBlocks`); from
    there on, and always with a ``scrubber`` or an ``event_filter``, it is
    parsed into events. With a ``scrubber``, the bytes are scrubbed before
    they are parsed, then the events pass the rule for a secret split across
    two events.
    """
    scrub = scrubber.stream() if scrubber is not None else None
    split = scrubber.events() if scrubber is not None else None
    blocks = SseBlocks() if scrub is None and event_filter is None else None
    parser = SseParser() if blocks is None else None
    while True:
        chunk = await response.next_chunk()
        if chunk is None:
            break
        arrived = trio.current_time()
        if decoder is not None:
            chunk = decoder.feed(chunk)
        if scrub is not None:
            chunk = scrub.feed(chunk)
        if blocks is not None:
            found = blocks.feed(chunk)
            if found is not None:
                if found[0]:
                    await stream.send_batch(
                        [SseRaw(id=request_id, data=found[0], events=found[1])], arrived)
                continue
            parser, items = blocks.handover()
            blocks = None
        else:
            assert parser is not None
            items = parser.feed(chunk)
        if items and event_filter is not None:
            items = _filtered(items, event_filter)
        if items:
            await _send_items(stream, request_id, items, split, arrived)
    rest = decoder.flush() if decoder is not None else b""
    if scrub is not None:
        rest = scrub.feed(rest) + scrub.flush() if rest else scrub.flush()
    if blocks is not None:  # what never got its blank line is parsed, to go as below
        found = blocks.feed(rest)
        if found is not None and found[0]:
            await stream.send_batch([SseRaw(id=request_id, data=found[0], events=found[1])])
        parser, items = blocks.handover()
        rest = b""
    else:
        items = []
    assert parser is not None
    # What is left unterminated at the end: the event goes, a comment does not.
    items = [*items, *parser.feed(rest),
             *(i for i in parser.close() if not isinstance(i, Comment))]
    if event_filter is not None:
        items = _filtered(items, event_filter)
    await _send_items(stream, request_id, items, split, None, last=True)


def _filtered(items: list[Event | Comment], event_filter: EventFilter) -> list[Event | Comment]:
    out: list[Event | Comment] = []
    for item in items:
        out.extend(event_filter(item) if isinstance(item, Event) else (item,))
    return out


MAX_EVENTS_PER_FRAME = 256
MAX_BATCH_CHARS = 32 * 1024
"""Bounds on one ``sse_events`` frame: credit keeps moving in small steps."""


def _frame_events(request_id: int, events: list[Event],
                  out: list[SseEvent | SseEvents | SseComment]) -> None:
    """Consecutive events as frames: one ``sse_event`` alone, else ``sse_events`` batches."""
    if len(events) == 1:
        e = events[0]
        out.append(SseEvent(id=request_id, event=e.event, data=e.data, sse_id=e.id,
                            retry=e.retry))
        return
    batch: list[tuple[str | None, str | None, str | None, int | None]] = []
    size = 0
    for e in events:
        batch.append((e.event, e.data, e.id, e.retry))
        size += len(e.data) if e.data is not None else 0
        if size >= MAX_BATCH_CHARS or len(batch) == MAX_EVENTS_PER_FRAME:
            out.append(SseEvents(id=request_id, events=tuple(batch)))
            batch, size = [], 0
    if len(batch) == 1:
        event, data, sse_id, retry = batch[0]
        out.append(SseEvent(id=request_id, event=event, data=data, sse_id=sse_id, retry=retry))
    elif batch:
        out.append(SseEvents(id=request_id, events=tuple(batch)))


async def _send_items(
    stream: ServerStream, request_id: int, items: list[Event | Comment],
    split: EventScrubber | None, arrived: float | None, last: bool = False,
) -> None:
    """One read's events and comments, in order, as one batch.

    Events that arrived together travel together (``sse_events``), so a backlog
    costs one frame per read rather than one per event; a lone event is still
    its own ``sse_event`` frame, sent the moment it is parsed.
    """
    msgs: list[SseEvent | SseEvents | SseComment] = []
    run: list[Event] = []
    for item in items:
        if isinstance(item, Comment):
            if run:
                _frame_events(request_id, run, msgs)
                run = []
            msgs.append(SseComment(id=request_id, text=item.text))
        elif split is None:
            run.append(item)
        else:
            run.extend(split.feed(item))
    if last and split is not None:
        run.extend(split.flush())
    if run:
        _frame_events(request_id, run, msgs)
    if msgs:
        await stream.send_batch(msgs, arrived)
