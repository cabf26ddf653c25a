"""Which handler answers a request: the route table, and the answers when none does."""

from __future__ import annotations

from carapace.runtime.http import ClientGone

from . import downloads, plain, signal_cli, sse
from .http import BadRequest, Request, Responder
from .state import Handler, Upstream

_GET = ("GET", "HEAD")
ROUTES: dict[str, tuple[Handler, tuple[str, ...]]] = {
    "/api/v1/rpc": (signal_cli.rpc, ("POST",)),
    "/api/v1/check": (signal_cli.check, _GET),
    "/api/v1/events": (signal_cli.events, _GET),
    "/": (sse.sse_default, _GET),
    "/events": (sse.sse_default, _GET),
    "/sse": (sse.sse, _GET),
    "/sse-buffered": (sse.sse_buffered, _GET),
    "/sse-forever": (sse.sse_forever, _GET),
    "/sse-flood": (sse.sse_flood, _GET),
    "/echo-header-sse": (sse.echo_header_sse, _GET),
    "/bytes": (downloads.download, _GET),
    "/slow": (plain.slow, _GET),
    "/hang": (plain.hang, _GET),
    "/stats": (plain.stats, _GET),
    "/stats/reset": (plain.stats_reset, ("POST",)),
}
"""Exact paths: handler and the methods it takes."""


def route(path: str) -> tuple[Handler | None, tuple[str, ...]]:
    """The handler for ``path`` and its methods (empty: any); None when no route matches."""
    if path in ROUTES:
        return ROUTES[path]
    if path.startswith("/echo"):
        return plain.echo, ()
    if path.startswith("/status/"):
        return plain.status, ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
    return None, ()


async def dispatch(up: Upstream, req: Request, resp: Responder) -> None:
    """Answer ``req``: its route's handler, or 404, 405 or 400 (a bad query parameter)."""
    try:
        handler, methods = route(req.path)
        if handler is None:
            await resp.json(
                404,
                {
                    "error": f"no route for {req.path}",
                    "routes": [*sorted(ROUTES), "/echo...", "/status/CODE"],
                },
            )
        elif methods and req.method not in methods:
            await resp.json(405, {"error": f"{req.method} not allowed on {req.path}"})
        else:
            await handler(up, req, resp)
    except BadRequest as exc:
        if resp.started:
            raise ClientGone() from exc  # cannot answer any more; drop the connection
        await resp.json(400, {"error": str(exc)})
