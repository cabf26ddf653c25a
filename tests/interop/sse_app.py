"""A tiny SSE upstream served by sse-starlette under uvicorn: a stack nobody on
this team wrote, to put behind the tunnel beside the built-in test upstream.

    python tests/interop/sse_app.py --port 8099

Routes:

``GET /sse?total=N&per=K&interval_ms=I&retry=R``
    events with ids 1..N whose data is JSON ``{"seq", "ts", "last_event_id"}``
    (``last_event_id``: the ``Last-Event-ID`` header this connection came with,
    so a test sees what the client sent through the tunnel). A connection
    resumes after ``Last-Event-ID`` and ends after ``per`` events (default:
    all), so a client has to reconnect with ``Last-Event-ID`` to get the rest.
    The first event of each connection carries ``retry: R`` (default 100 ms).
``GET /``
    a small HTML page (a same-origin place for a browser to run EventSource).
``GET /api/v1/check``
    200, empty (the readiness probe the test helpers use).

sse-starlette frames events with CRLF line ends and sends ``: ping`` comments
every 15 s, both of which the tunnel must carry unchanged in meaning.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator

import anyio
import uvicorn
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

PAGE = "<!doctype html><title>carapace interop</title><p>EventSource test page</p>\n"


def _int(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name, default))
    except ValueError:
        return default


async def sse(request: Request) -> EventSourceResponse:
    total = _int(request, "total", 10)
    interval = _int(request, "interval_ms", 100) / 1000
    retry = _int(request, "retry", 100)
    header = request.headers.get("last-event-id")
    try:
        first = int(header) + 1 if header else 1
    except ValueError:
        first = 1
    per = _int(request, "per", total)
    last = min(total, first + per - 1)

    async def events() -> AsyncIterator[ServerSentEvent]:
        for seq in range(first, last + 1):
            if seq > first:
                await anyio.sleep(interval)
            data = json.dumps({"seq": seq, "ts": time.time(), "last_event_id": header})
            yield ServerSentEvent(data=data, id=str(seq), retry=retry if seq == first else None)

    return EventSourceResponse(events())


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def check(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(routes=[
    Route("/sse", sse),
    Route("/", page),
    Route("/api/v1/check", check),
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
