"""The test upstream's listener and connections: many requests per connection, one at a time.

Every accepted socket sets ``TCP_NODELAY``. While a handler runs, the
connection's only reader watches for the client going away and cancels the
handler at once: a stream whose reader has gone must not go on, and its
counters must say it was cancelled.
"""

from __future__ import annotations

import functools
import socket
import sys
import traceback
from dataclasses import dataclass

import h11
import trio

from carapace.runtime.http import DISCONNECTS, ClientGone

from .http import RECEIVE_SIZE, Responder, read_request
from .routes import dispatch
from .state import (
    DEFAULT_ACCOUNT,
    DEFAULT_WRITE_PATTERN,
    WRITE_PATTERNS,
    Upstream,
    UpstreamStats,
)


@dataclass
class UpstreamServer:
    """What :func:`serve_upstream` hands to ``task_status.started()``."""

    host: str
    port: int
    stats: UpstreamStats

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path


async def serve_upstream(
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[UpstreamServer] = trio.TASK_STATUS_IGNORED,
    stream_count: int | None = None,
    stream_interval_ms: float = 100.0,
    account: str = DEFAULT_ACCOUNT,
    access_log: bool = False,
    write_pattern: str = DEFAULT_WRITE_PATTERN,
) -> None:
    """Serve the test upstream on ``host:port`` (0 picks a free port) until cancelled.

    ``task_status.started()`` receives an :class:`UpstreamServer` with the real
    port and the live :class:`UpstreamStats`. ``stream_count`` (None: never
    ends) and ``stream_interval_ms`` are the defaults of ``/`` and ``/events``;
    ``account`` is what ``listAccounts`` and ``/api/v1/events`` report;
    ``write_pattern`` (one of :data:`WRITE_PATTERNS`) is how SSE events are written.
    """
    if write_pattern not in WRITE_PATTERNS:
        raise ValueError(f"write_pattern must be one of {', '.join(WRITE_PATTERNS)}, "
                         f"not {write_pattern!r}")
    upstream = Upstream(
        stream_count=stream_count,
        stream_interval_ms=stream_interval_ms,
        account=account,
        access_log=access_log,
        write_pattern=write_pattern,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    server = UpstreamServer(host=host, port=int(bound[1]), stats=upstream.stats)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            trio.serve_listeners, functools.partial(handle_connection, upstream), listeners
        )
        task_status.started(server)


async def handle_connection(up: Upstream, stream: trio.SocketStream) -> None:
    """Serve requests on one accepted connection until either side is done with it."""
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:
        pass
    up.stats.open_connections += 1
    up.stats.total_connections += 1
    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:
            while await _one_request(up, stream, conn):
                conn.start_next_cycle()
    except DISCONNECTS:
        pass
    except Exception:  # a bug in a handler must not take the whole server down
        traceback.print_exc()
    finally:
        up.stats.open_connections -= 1


async def _one_request(up: Upstream, stream: trio.SocketStream, conn: h11.Connection) -> bool:
    """Serve one request; True when the connection may carry another."""
    req = await read_request(stream, conn)
    if req is None:
        return False
    up.stats.total_requests += 1
    up.stats.open_requests += 1
    up.stats.paths[req.path] += 1
    if up.access_log:
        print(f"upstream: {req.method} {req.target}", file=sys.stderr, flush=True)
    resp = Responder(stream, conn, req.method)
    client_gone = False
    try:
        async with trio.open_nursery() as nursery:

            async def watch_for_disconnect() -> None:
                # The only reader while the handler runs: EOF means the
                # client went away, so cancel whatever the handler awaits.
                nonlocal client_gone
                while True:
                    try:
                        data = await stream.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        client_gone = True
                        nursery.cancel_scope.cancel()
                        return
                    conn.receive_data(data)  # a pipelined request: keep it for later

            nursery.start_soon(watch_for_disconnect)
            try:
                await dispatch(up, req, resp)
            except ClientGone:
                client_gone = True
            nursery.cancel_scope.cancel()
    finally:
        up.stats.open_requests -= 1
        if not resp.finished:
            up.stats.cancelled_requests += 1
    if client_gone or not resp.finished:
        return False
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE
