"""A real HTTP/1.1 test upstream (trio + h11) that plays the services Carapace proxies.

Used by the demo, the end-to-end tests, the benchmarks and
``carapace-debug sse-test serve``. Run it alone with
``python -m carapace.debug.upstream --port P``.

Routes (query parameters in brackets). Every SSE stream numbers its events
1, 2, ... (``id`` and ``seq``), ``count`` being the last id, and honours
``Last-Event-ID: N`` by carrying on at N+1 (so a resumed stream still ends at
``count``):

signal-cli-like
    ``POST /api/v1/rpc``      JSON-RPC 2.0, single object or batch array: ``version``,
                              ``send``, ``listAccounts``; anything else is -32601,
                              unparseable JSON is -32700 (HTTP 200, like signal-cli).
    ``GET /api/v1/check``     200, empty body.
    ``GET /api/v1/events``    [account, interval_ms=1000, count=inf] ``event: receive``
                              events whose data is a signal-cli style envelope plus
                              ``account``, ``seq`` and ``ts`` (``time.time()`` when sent).
generic
    ``GET /sse``              [count=10, interval_ms=100, size, multiline, event, retry,
                              comment, crlf] N events, ids 1..N, then a clean end.
    ``GET /`` and ``/events`` the same stream with the server's own defaults
                              (``stream_count``/``stream_interval_ms``).
    ``GET /sse-buffered``     [count=10, interval_ms=100, hold_ms=500] events stamped
                              when generated but written in bursts every hold_ms: a
                              deliberately buffering upstream.
    ``GET /sse-forever``      [interval_ms=100] never ends.
    ``GET /sse-flood``        [count=10000, size=300, batch=32] events as fast as the
                              client takes them, ``batch`` events per write, each
                              stamped with its own ``ts``: the throughput benchmark.
    ``GET /echo-header-sse``  [name, interval_ms=10, split] 3 events whose data carries the
                              value of request header ``name``; with ``split=N`` the data
                              of events 1 and 2 is the value itself, cut after N
                              characters (a secret split across two events).
    ``ANY /echo...``          200 JSON: method, path (raw target), headers as received,
                              body (text), body_length, body_sha256.
    ``GET /bytes``            [n=1024, chunk=65536, interval_ms=0] n bytes of
                              :func:`pattern_bytes`, with Content-Length.
    ``GET /status/CODE``      answers CODE.
    ``GET /slow``             [delay_ms=1000] answers after the delay.
    ``GET /hang``             never answers (until the client goes away).
    ``GET /stats``            JSON counters (see :class:`UpstreamStats`);
                              ``POST /stats/reset`` zeroes them.

Every accepted socket sets ``TCP_NODELAY``; each SSE event is written with one
``send_all`` the moment it is due; non-streaming responses keep the
connection alive. ``write_pattern="per-event"`` (``--write-pattern per-event``)
makes ``/sse-flood`` write one chunk per event too (``batch`` is ignored), and
every SSE route put a comment line in each tenth event, as production servers
that flush each event and send keep-alive comments do. A client that goes
away cancels its request at once.

The package: ``server`` (listener and connections), ``http`` (reading a
request, writing an answer), ``routes`` (the route table), and the routes by
what they serve: ``signal_cli``, ``sse``, ``downloads``, ``plain``; ``state``
holds the settings and counters every handler is given.
"""

from __future__ import annotations

from .downloads import pattern_bytes
from .server import UpstreamServer, serve_upstream
from .state import DEFAULT_ACCOUNT, DEFAULT_WRITE_PATTERN, WRITE_PATTERNS, UpstreamStats

__all__ = [
    "DEFAULT_ACCOUNT",
    "DEFAULT_WRITE_PATTERN",
    "WRITE_PATTERNS",
    "UpstreamServer",
    "UpstreamStats",
    "pattern_bytes",
    "serve_upstream",
]
