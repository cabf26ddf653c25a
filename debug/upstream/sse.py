"""The test upstream's generic Server-Sent Events routes, and the stream plumbing they share.

Every stream numbers its events 1, 2, ... (``id`` and ``seq``) and honours
``Last-Event-ID: N`` by carrying on at N+1. The events are formatted here,
not by the protocol's serializer, because some routes must write the
variants a real upstream may send (CRLF line ends, comments, ``retry``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import trio

from .http import Request, Responder
from .state import PER_EVENT_COMMENT_EVERY, Upstream

SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
]


def sse_block(
    *,
    data: str | None,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
    comments: tuple[str, ...] = (),
    crlf: bool = False,
) -> bytes:
    """One event's bytes, blank line included; a multi-line ``data`` makes several lines."""
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


def padded_json(seq: int, ts: float, size: int, multiline: bool) -> str:
    """Event data: ``{"seq", "ts", "pad"}`` padded to about ``size`` bytes."""
    if multiline:
        base = f'{{"seq": {seq},\n"ts": {ts!r},\n"pad": ""}}'
    else:
        base = json.dumps({"seq": seq, "ts": ts, "pad": ""})
    pad = max(0, size - len(base))
    return base[:-2] + "x" * pad + base[-2:]


async def sse_start(up: Upstream, resp: Responder) -> None:
    """Count the stream as open and send its head."""
    up.stats.open_streams += 1
    await resp.start(200, list(SSE_HEADERS))


def sse_done(up: Upstream, resp: Responder) -> None:
    """Count the stream as completed, or as cancelled if it never reached its end."""
    up.stats.open_streams -= 1
    if resp.finished:
        up.stats.completed_streams += 1
    else:
        up.stats.cancelled_streams += 1


async def stream_events(
    up: Upstream,
    resp: Responder,
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
    await sse_start(up, resp)
    try:
        start = trio.current_time()
        i = first
        while count is None or i <= count:
            await trio.sleep_until(start + (i - first) * interval_ms / 1000.0)
            await resp.write(blocks(i))
            up.stats.events_sent += 1
            i += 1
        await resp.end()
    finally:
        sse_done(up, resp)


# --------------------------------------------------------------------------- routes


async def _sse_generic(
    up: Upstream,
    req: Request,
    resp: Responder,
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
    per_event = up.write_pattern == "per-event"

    def block(seq: int) -> bytes:
        comments = (f"comment {seq}",) if comment else ()
        if per_event and seq % PER_EVENT_COMMENT_EVERY == 0:
            comments += (f"tick {seq}",)
        return sse_block(
            data=padded_json(seq, time.time(), size, multiline),
            id=str(seq),
            event=event,
            retry=retry if seq == first else None,
            comments=comments,
            crlf=crlf,
        )

    await stream_events(up, resp, block, first=first, count=count, interval_ms=interval_ms)


async def sse(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /sse``: [count=10, interval_ms=100, size, multiline, event, retry, comment, crlf]."""
    await _sse_generic(
        up, req, resp, count=req.q_count("count", 10), interval_ms=req.q_ms("interval_ms", 100.0)
    )


async def sse_default(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /`` and ``/events``: ``/sse`` with the server's own defaults."""
    await _sse_generic(
        up,
        req,
        resp,
        count=req.q_count("count", up.stream_count),
        interval_ms=req.q_ms("interval_ms", up.stream_interval_ms),
    )


async def sse_forever(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /sse-forever``: [interval_ms=100] a stream that never ends."""
    await _sse_generic(up, req, resp, count=None, interval_ms=req.q_ms("interval_ms", 100.0))


async def sse_flood(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /sse-flood``: [count=10000, size=300, batch=32] as fast as the client reads."""
    # No timer and no per-event write: the per-event path (sleep_until, h11,
    # send_all) tops out near 10,000 events/s, far below what a benchmark of
    # the tunnel needs from its upstream.
    count = req.q_int("count", 10_000, 0)
    size = req.q_int("size", 300, 0, 1024 * 1024)
    batch = req.q_int("batch", 32, 1, 100_000)
    first = req.last_event_id() + 1
    if up.write_pattern == "per-event":
        await _sse_flood_per_event(up, resp, first, count, size)
        return
    # The same bytes as sse_block(data=padded_json(...), id=...), formatted in one go.
    pad = "x" * max(0, size - len(json.dumps({"seq": count, "ts": time.time(), "pad": ""})))
    await sse_start(up, resp)
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
        sse_done(up, resp)


async def _sse_flood_per_event(
    up: Upstream, resp: Responder, first: int, count: int, size: int
) -> None:
    """``/sse-flood`` written like a production server: one chunk per event, sent
    at once, and a comment line in every tenth event (in the same chunk, so a
    client counting blank lines still counts events)."""
    pad = "x" * max(0, size - len(json.dumps({"seq": count, "ts": time.time(), "pad": ""})))
    await sse_start(up, resp)
    try:
        for seq in range(first, count + 1):
            tick = f": tick {seq}\n" if seq % PER_EVENT_COMMENT_EVERY == 0 else ""
            await resp.write(
                f'{tick}id: {seq}\ndata: {{"seq": {seq}, "ts": {time.time()!r}, '
                f'"pad": "{pad}"}}\n\n'.encode()
            )
            up.stats.events_sent += 1
        await resp.end()
    finally:
        sse_done(up, resp)


async def sse_buffered(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /sse-buffered``: [count=10, interval_ms=100, hold_ms=500] events in bursts."""
    count = req.q_count("count", 10)
    interval = req.q_ms("interval_ms", 100.0) / 1000.0
    hold = req.q_ms("hold_ms", 500.0) / 1000.0
    first = req.last_event_id() + 1
    await sse_start(up, resp)
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
            block = sse_block(data=padded_json(i, time.time(), 0, False), id=str(i))
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
        sse_done(up, resp)


async def echo_header_sse(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /echo-header-sse``: [name, interval_ms=10, split] 3 events carrying a header."""
    name = req.q_str("name") or ""
    value = req.header(name) if name else None
    first = req.last_event_id() + 1

    split = req.q_int("split", 0, 0, 1 << 20)

    def block(seq: int) -> bytes:
        if split and value is not None and seq in (1, 2):
            return sse_block(data=value[:split] if seq == 1 else value[split:], id=str(seq))
        data = {"seq": seq, "ts": time.time(), "header": name, "value": value}
        return sse_block(data=json.dumps(data), id=str(seq))

    await stream_events(
        up, resp, block, first=first, count=3, interval_ms=req.q_ms("interval_ms", 10.0)
    )
