"""The third-party SSE upstream: uvicorn + sse-starlette, one event per write.

``uvicorn benchmarks.sse_app:app`` — a production ASGI stack, written the way
its users write it: an async generator handed to ``EventSourceResponse``,
which sends each yielded event as its own ``http.response.body`` message (one
chunk on the wire). Each event carries ``id: N`` and the data the test
upstream's ``/sse`` sends (``{"seq", "ts", "pad"}`` padded to ``size``
bytes), ``ts`` being ``time.time()`` just before the yield, so the measuring
client reads latency and counts events the same way for every upstream.

Routes: ``GET /sse`` [count=10, interval_ms=100, size=0] on a deadline
schedule (0: as fast as the client reads), ``GET /sse-flood`` [count, size]
the same with no interval, ``GET /api/v1/check`` 200 (the harness's
readiness probe).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_SIZE = 1024 * 1024
# sse-starlette's keep-alive ping: a comment every this many seconds. Kept long
# so that a benchmark stream (seconds) carries events only and every "\n\n"
# the throughput client counts is an event.
PING_SECONDS = 3600


def _int(request: Request, name: str, default: int, hi: int = 1 << 31) -> int:
    try:
        return max(0, min(hi, int(request.query_params.get(name, default))))
    except ValueError:
        return default


def data_for(seq: int, size: int) -> str:
    """The test upstream's padded JSON (``padded_json``), formatted the same way."""
    base = json.dumps({"seq": seq, "ts": time.time(), "pad": ""})
    return base[:-2] + "x" * max(0, size - len(base)) + base[-2:]


async def events(count: int, interval_s: float, size: int) -> AsyncIterator[dict[str, str]]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in range(1, count + 1):
        if interval_s > 0:
            delay = start + (seq - 1) * interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        # A dict, as most sse-starlette users write it: the response encodes it
        # (with its ``sep``) and sends it as one body message.
        yield {"data": data_for(seq, size), "id": str(seq)}


def stream(count: int, interval_ms: float, size: int) -> EventSourceResponse:
    # sep="\n": the line ending the test upstream uses (sse-starlette's default is CRLF).
    return EventSourceResponse(events(count, interval_ms / 1000.0, size), ping=PING_SECONDS,
                               sep="\n")


async def sse(request: Request) -> Response:
    return stream(_int(request, "count", 10), _int(request, "interval_ms", 100, 60_000),
                  _int(request, "size", 0, MAX_SIZE))


async def sse_flood(request: Request) -> Response:
    return stream(_int(request, "count", 10_000), 0, _int(request, "size", 300, MAX_SIZE))


async def check(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(routes=[
    Route("/sse", sse),
    Route("/sse-flood", sse_flood),
    Route("/api/v1/check", check),
])
