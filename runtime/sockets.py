"""Immediate reads and writes on trio streams, for every socket on a hot path.

trio's ``send_all`` and ``receive_some`` each cost a scheduler round, a
failed system call or two context managers per call; on the per-request
sockets (the agent's local clients, the server's upstreams) and the links
that showed in every profile. These do one wait and one system call where
the stream is a plain socket, and fall back to trio's own methods otherwise.
"""

from __future__ import annotations

import os

import trio

READ_SIZE = 256 * 1024
"""Bytes asked of the kernel per read on a link."""


def write_now(sock: trio.socket.SocketType, data: bytes | memoryview) -> int:
    """Bytes of ``data`` that ``sock`` took without blocking: 0 when full, closed or broken.

    Errors are left for the caller's ``send_all`` to meet and report as trio does.
    """
    fd = sock.fileno()
    if fd < 0:  # closed (and the number perhaps reused): never write to it
        return 0
    try:
        return os.write(fd, data)
    except OSError:
        return 0


async def send_all(stream: trio.abc.SendStream, data: bytes) -> None:
    """``stream.send_all(data)``, but on a plain socket with room the write happens at once.

    trio's ``send_all`` yields to the scheduler after a write that did not
    block; on a per-request path that round (with its context managers)
    showed in the profile. A cancelled caller still gets ``Cancelled`` first.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    if isinstance(stream, trio.SocketStream) and data:
        written = write_now(stream.socket, data)
        if written == len(data):
            return
        if written:
            await stream.send_all(memoryview(data)[written:])
            return
    await stream.send_all(data)


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``; on a plain socket, one wait and one read.

    trio first tries the read (on a per-request socket it is nearly always
    too early: a failed system call and an exception), inside two
    generator-based context managers; together they showed in the profile
    of every request. Waiting for readability first, then reading, is one
    checkpoint and one system call. Errors come out as trio's would:
    ``BrokenResourceError`` for a broken socket, ``ClosedResourceError`` for
    one closed under us.
    """
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    sock = stream.socket
    while True:
        if sock.fileno() < 0:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the socket was closed")
        await trio.lowlevel.wait_readable(sock)  # a close meanwhile raises ClosedResourceError
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            continue  # woken without data after all: wait again
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
