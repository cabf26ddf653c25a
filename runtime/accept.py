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

Opener = Callable[[trio.SocketStream], Callable[[], Awaitable[object]]]
"""Called at once for each accepted stream, in the order of the listener's queue; what
it returns runs as the connection's task. The tasks of one batch start in any order
(trio's scheduler), so whatever must follow arrival order (taking a slot under a cap)
belongs in the opener."""


async def serve_listeners(opener: Opener, listeners: Sequence[trio.SocketListener], *,
                          handler_nursery: trio.Nursery, batch: int = ACCEPT_BATCH) -> None:
    """Like ``trio.serve_listeners``: for each connection, ``opener(stream)()`` runs in
    ``handler_nursery`` and the stream is closed when it returns; runs until cancelled."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one, listener, opener, handler_nursery, batch)


async def _serve_one(listener: trio.SocketListener, opener: Opener,
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
                _start(opener, stream, handler_nursery)
                for sock in _drain(spare, batch - 1):
                    _start(opener, trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                           handler_nursery)


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


def _start(opener: Opener, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
    try:
        task = opener(stream)
    except BaseException:
        stream.socket.close()
        raise
    nursery.start_soon(_run, task, stream)


async def _run(task: Callable[[], Awaitable[object]], stream: trio.SocketStream) -> None:
    try:
        await task()
    finally:
        await trio.aclose_forcefully(stream)
