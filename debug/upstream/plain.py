"""The test upstream's routes that answer with one plain response, late, or never.

What a tunnel test needs to see beside streams: the request exactly as it
arrived (``/echo``), any status code, an answer that takes its time, one
that never comes, and the upstream's own counters.
"""

from __future__ import annotations

import hashlib

import trio

from .http import BadRequest, Request, Responder
from .state import Upstream


async def echo(up: Upstream, req: Request, resp: Responder) -> None:
    """``ANY /echo...``: the method, raw target, headers and body as they arrived."""
    await resp.json(
        200,
        {
            "method": req.method,
            "path": req.target,
            "headers": [[k, v] for k, v in req.headers],
            "body": req.body.decode("utf-8", "replace"),
            "body_length": len(req.body),
            "body_sha256": hashlib.sha256(req.body).hexdigest(),
        },
    )


async def status(up: Upstream, req: Request, resp: Responder) -> None:
    """``/status/CODE``: answers CODE (200..599)."""
    raw = req.path[len("/status/") :]
    try:
        code = int(raw)
    except ValueError:
        raise BadRequest(f"/status/{raw}: not a status code") from None
    if not 200 <= code <= 599:
        raise BadRequest(f"/status/{code}: must be 200..599")
    await resp.json(code, {"status": code})


async def slow(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /slow``: [delay_ms=1000] answers after the delay."""
    delay = req.q_ms("delay_ms", 1000.0)
    await trio.sleep(delay / 1000.0)
    await resp.json(200, {"delay_ms": delay})


async def hang(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /hang``: never answers (until the client goes away)."""
    await trio.sleep_forever()


async def stats(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /stats``: the counters."""
    await resp.json(200, up.stats.as_dict())


async def stats_reset(up: Upstream, req: Request, resp: Responder) -> None:
    """``POST /stats/reset``: zero the totals, then answer the counters."""
    up.stats.reset()
    await resp.json(200, up.stats.as_dict())
