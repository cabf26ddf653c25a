"""What every route handler of the test upstream is given: its settings and its counters."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .http import Request, Responder

DEFAULT_ACCOUNT = "+15550000001"

# How the SSE routes write their events. "batched" is the fast path the
# throughput benchmark was built on (``/sse-flood`` writes ``batch`` events at
# once); "per-event" writes like a production server that flushes each event:
# one chunk per event, and a comment line on every tenth event.
WRITE_PATTERNS = ("batched", "per-event")
DEFAULT_WRITE_PATTERN = "batched"
PER_EVENT_COMMENT_EVERY = 10


@dataclass
class UpstreamStats:
    """Counters served at ``GET /stats``.

    ``open_streams``/``cancelled_streams`` count SSE responses only (a stream
    is cancelled when its client goes away before the stream's end);
    ``open_requests``/``cancelled_requests`` count every request the same way.
    """

    total_requests: int = 0
    open_streams: int = 0
    cancelled_streams: int = 0
    completed_streams: int = 0
    events_sent: int = 0
    open_requests: int = 0
    cancelled_requests: int = 0
    open_connections: int = 0
    total_connections: int = 0
    rpc_calls: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rpc_calls"] = dict(self.rpc_calls)
        d["paths"] = dict(self.paths)
        return d

    def reset(self) -> None:
        """Zero the totals; the ``open_*`` gauges keep describing what is open now."""
        fresh = UpstreamStats(
            open_streams=self.open_streams,
            open_requests=self.open_requests,
            open_connections=self.open_connections,
        )
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class Upstream:
    """One server's settings and counters, shared by every connection and handler.

    ``stream_count`` (None: never ends) and ``stream_interval_ms`` are the
    defaults of ``/`` and ``/events``; ``account`` is what the fake
    signal-cli reports; ``access_log`` prints one stderr line per request;
    ``write_pattern`` is one of :data:`WRITE_PATTERNS`.
    """

    stream_count: int | None = None
    stream_interval_ms: float = 100.0
    account: str = DEFAULT_ACCOUNT
    access_log: bool = False
    write_pattern: str = DEFAULT_WRITE_PATTERN
    stats: UpstreamStats = field(default_factory=UpstreamStats)


Handler = Callable[[Upstream, Request, Responder], Awaitable[None]]
"""A route: answers one request on its responder."""
