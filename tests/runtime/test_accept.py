"""Batched accepts: a queue of waiting connections is taken in a few turns, not one a turn."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from carapace.runtime.accept import serve_listeners


class CountingListener(trio.abc.Listener[trio.SocketStream]):
    """A trio.SocketListener (final: wrapped) that counts the awaited accepts, each a
    turn of the event loop."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.inner = trio.SocketListener(sock)
        self.socket = sock
        self.awaited = 0

    async def accept(self) -> trio.SocketStream:
        self.awaited += 1
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


def queue_tcp(port: int, n: int) -> list[socket.socket]:
    """``n`` connections completed by the kernel and waiting in the listener's queue."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def serve(listener: CountingListener, clients: list[socket.socket]) -> list[bytes]:
    """Serve until every client was handled; what each handler saw."""
    seen: list[bytes] = []

    order: list[int] = []

    def opener(stream: trio.SocketStream) -> Callable[[], Awaitable[None]]:
        order.append(stream.socket.getpeername()[1] if listener.socket.family == socket.AF_INET
                     else len(order))

        async def handler() -> None:
            seen.append(await stream.receive_some(16))
            await stream.send_all(b"bye")
        return handler

    for i, client in enumerate(clients):
        client.sendall(b"%d" % i)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve_listeners, opener, [listener],  # type: ignore[list-item]
                                             handler_nursery=nursery, batch=64))
        while len(seen) < len(clients):
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    if listener.socket.family == socket.AF_INET:  # opened in the order they were queued
        assert order == [c.getsockname()[1] for c in clients]
    return seen


async def test_a_queue_of_connections_is_taken_in_batches() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    listener = CountingListener(sock)
    clients = queue_tcp(sock.getsockname()[1], 150)
    try:
        seen = await serve(listener, clients)
        # One awaited accept per 64 (trio.serve_listeners would take 150 turns).
        assert sorted(seen) == sorted(b"%d" % i for i in range(150))
        assert listener.awaited <= 4
        # Every handled stream was closed when its handler returned.
        for client in clients:
            client.settimeout(5)
            assert client.recv(16) == b"bye" and client.recv(16) == b""
    finally:
        for client in clients:
            client.close()


async def test_unix_listeners_are_served_too(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(64)
    clients = []
    for _ in range(20):
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        clients.append(client)
    try:
        seen = await serve(CountingListener(sock), clients)
        assert len(seen) == 20
    finally:
        for client in clients:
            client.close()
