"""Accepting connections in batches: every connection waiting in a listener's queue per turn.

``trio.serve_listeners`` takes one connection per turn of the event loop (its
``accept`` ends with a checkpoint). After a server restart every agent dials
within a second or two; with hundreds in the queue, the last one waited
hundreds of turns of a loop that meanwhile carries the traffic of every
agent already back. Here one wait is followed by up to :data:`ACCEPT_BATCH`
non-blocking accepts, so a queue of 500 drains in a few turns (measured, 500
agents, runs back to back: dial to welcome p50 / max 191 / 508 ms one per
turn, 40 / 127 ms in batches). Whatever a connection meets afterwards (the
unauthenticated-connection caps, the handshake timeout) is the handler's
business, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

log = logging.getLogger("carapace.runtime")

ACCEPT_BATCH = 64
"""Connections taken from one listener's queue in one turn, at most: enough to drain a
reconnect storm in a few turns, few enough that one turn stays short (starting a
handler task is a few microseconds; the handshakes run later, in their own tasks)."""

CAPACITY_RETRY = 0.1
"""Seconds to wait when accept fails for want of descriptors or memory (as trio does)."""

_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_SKIPPABLE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
"""A connection that went away while queued (or a firewall's refusal): take the next."""

Handler = Callable[[trio.SocketStream], Awaitable[object]]


async def serve_listeners(handler: Handler, listeners: Sequence[trio.SocketListener], *,
                          handler_nursery: trio.Nursery, batch: int = ACCEPT_BATCH) -> None:
    """Like ``trio.serve_listeners``: ``handler(stream)`` in ``handler_nursery`` for each
    connection, the stream closed when it returns; runs until cancelled."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one, listener, handler, handler_nursery, batch)


async def _serve_one(listener: trio.SocketListener, handler: Handler,
                     handler_nursery: trio.Nursery, batch: int) -> None:
    # A second descriptor of the same listening socket, for accepts without a checkpoint.
    # It shares the socket's non-blocking mode and is never switched to another one.
    spare = socket.socket(fileno=os.dup(listener.socket.fileno()))
    async with listener:
        with spare:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    log.error("accept failed: %s; retrying in %g s", os.strerror(exc.errno),
                              CAPACITY_RETRY)
                    await trio.sleep(CAPACITY_RETRY)
                    continue
                handler_nursery.start_soon(_run, handler, stream)
                for sock in _drain(spare, batch - 1):
                    handler_nursery.start_soon(
                        _run, handler, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


def _drain(spare: socket.socket, most: int) -> list[socket.socket]:
    """Up to ``most`` connections already queued on ``spare``, without waiting."""
    taken: list[socket.socket] = []
    while len(taken) < most:
        try:
            sock, _ = spare.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno in _SKIPPABLE_ERRNOS:
                continue
            break  # left for the next awaited accept to meet and handle
        taken.append(sock)
    return taken


async def _run(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
