"""``python -m carapace.debug.upstream``: run the test upstream alone until Ctrl-C.

Tests, benchmarks and the demo start it this way, as a process of its own,
and wait for its one "listening on" line.
"""

from __future__ import annotations

import argparse
import functools

import trio

from carapace.debug.upstream import (
    DEFAULT_ACCOUNT,
    DEFAULT_WRITE_PATTERN,
    WRITE_PATTERNS,
    UpstreamServer,
    serve_upstream,
)


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: this process's arguments) and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m carapace.debug.upstream",
        description="A test HTTP upstream: fake signal-cli JSON-RPC and events, SSE test "
        "streams, echo, bytes, status, slow and hanging routes, /stats.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--count", type=int, default=None, help="events on / and /events")
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--account", default=DEFAULT_ACCOUNT)
    parser.add_argument("--access-log", action="store_true", help="one stderr line per request")
    parser.add_argument(
        "--write-pattern",
        choices=WRITE_PATTERNS,
        default=DEFAULT_WRITE_PATTERN,
        help="how SSE events are written: batched (/sse-flood writes `batch` events at "
        "once) or per-event (one flushed chunk per event, a comment every ten events)",
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: UpstreamServer = await nursery.start(
                functools.partial(
                    serve_upstream,
                    args.host,
                    args.port,
                    stream_count=args.count,
                    stream_interval_ms=args.interval_ms,
                    account=args.account,
                    access_log=args.access_log,
                    write_pattern=args.write_pattern,
                )
            )
            print(f"test upstream listening on {server.base_url}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
