"""Listening and dialling on each transport a link can take: TCP, unix sockets, vsock.

Whatever the transport, a link is a ``trio.SocketStream``: TLS and the
token handshake run on top of it unchanged. trio sets ``TCP_NODELAY`` on a
stream's socket where the option exists (TCP) and skips it elsewhere; unix
sockets and vsock have no Nagle delay to turn off.

Addresses come parsed (``addresses.py``); what a daemon logs of a
connection comes from :func:`describe_peer`, which says which transport it
arrived on.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence

import trio

from .addresses import Address, TcpAddress, UnixAddress, VsockAddress
from .unix_sockets import SOCKET_MODE, bind_unix_socket, peer_credentials, remove_if_ours

VSOCK_BACKLOG = 128
"""Connections the kernel queues on a vsock listener before the accept loop takes them
(a unix listener queues as many, ``unix_sockets.py``)."""


class ListenError(OSError):
    """A link listener could not be opened; the message names the address and why."""


def transport_of(sock: trio.socket.SocketType | socket.socket) -> str:
    """``tcp``, ``unix`` or ``vsock``: the transport a connected socket runs on."""
    if sock.family == socket.AF_UNIX:
        return "unix"
    if sock.family == getattr(socket, "AF_VSOCK", None):
        return "vsock"
    return "tcp"


def describe_local(sock: trio.socket.SocketType | socket.socket) -> str:
    """A listener's own address in the form the flags take (``tcp:…``, ``unix:…``, ``vsock:…``)."""
    name = sock.getsockname()
    kind = transport_of(sock)
    if kind == "unix":
        return UnixAddress(os.fsdecode(name)).describe()
    if kind == "vsock":
        return VsockAddress(int(name[0]), int(name[1])).describe()
    return TcpAddress(str(name[0]), int(name[1])).describe()


def describe_peer(sock: trio.socket.SocketType | socket.socket) -> str:
    """Who is at the other end of an accepted link, for logs, audit and ``connections``.

    TCP: ``HOST:PORT``, unmarked (the form scripts reading ``connections``
    expect; ``transport_of_peer`` tells it apart). A unix socket has no peer address: the
    socket's path and the connecting process (``SO_PEERCRED``; under
    Firecracker that is the VM's firecracker process) say who it is. vsock:
    ``vsock:CID:PORT``, the CID naming the VM.
    """
    kind = transport_of(sock)
    try:
        if kind == "unix":
            path = os.fsdecode(sock.getsockname())
            pid, uid, _ = peer_credentials(sock)
            who = f" pid={pid} uid={uid}" if pid is not None else ""
            return f"unix:{path}{who}"
        name = sock.getpeername()
    except OSError:
        return f"{kind}:?"
    if kind == "vsock":
        return f"vsock:{name[0]}:{name[1]}"
    return f"{name[0]}:{name[1]}"


def transport_of_peer(peer: str) -> str:
    """The transport named by a :func:`describe_peer` string (TCP peers carry no prefix)."""
    for kind in ("unix", "vsock"):
        if peer.startswith(f"{kind}:"):
            return kind
    return "tcp"


def _vsock_socket(address: VsockAddress) -> trio.socket.SocketType:
    return trio.socket.socket(address.family, socket.SOCK_STREAM)


async def _listen_one(address: Address, unix_mode: int,
                      cleanup: contextlib.ExitStack) -> list[trio.SocketListener]:
    if isinstance(address, TcpAddress):
        return await trio.open_tcp_listeners(address.port, host=address.host)
    if isinstance(address, UnixAddress):
        # The server never creates the directory: who may reach the socket is the
        # operator's choice (its owner, group and mode), not ours to guess.
        raw = bind_unix_socket(address.path, unix_mode, dir_mode=None)
        cleanup.callback(remove_if_ours, address.path, os.stat(address.path).st_ino)
        return [trio.SocketListener(trio.socket.from_stdlib_socket(raw))]
    sock = _vsock_socket(address)
    try:
        await sock.bind((address.cid, address.port))
        sock.listen(VSOCK_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


@contextlib.asynccontextmanager
async def listening(addresses: Sequence[Address], *, unix_mode: int = SOCKET_MODE
                    ) -> AsyncIterator[list[trio.SocketListener]]:
    """Listeners on every address; on the way out each unix socket file we made is removed.

    ListenError (naming the address) if one cannot be opened; those already
    opened are closed again.
    """
    listeners: list[trio.SocketListener] = []
    with contextlib.ExitStack() as cleanup:
        try:
            for address in addresses:
                try:
                    listeners += await _listen_one(address, unix_mode, cleanup)
                except OSError as exc:
                    raise ListenError(exc.errno, f"cannot listen on {address.describe()}: "
                                                 f"{exc.strerror or exc}") from exc
            yield listeners
        finally:
            for listener in listeners:
                listener.socket.close()


async def open_stream(address: Address) -> trio.SocketStream:
    """A connected stream to ``address``; OSError (ConnectionRefusedError, FileNotFoundError
    when no unix socket is there, …) if it cannot be reached."""
    if isinstance(address, TcpAddress):
        return await trio.open_tcp_stream(address.host, address.port)
    if isinstance(address, UnixAddress):
        return await trio.open_unix_socket(address.path)
    sock = _vsock_socket(address)
    try:
        await sock.connect((address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


__all__ = [
    "ListenError",
    "describe_local",
    "describe_peer",
    "listening",
    "open_stream",
    "transport_of",
    "transport_of_peer",
]
