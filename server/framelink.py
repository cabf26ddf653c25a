"""Trio shell around the sans-IO frame codec, shared by server, agent and debug proxy.

One task owns each socket's writes (:class:`FrameWriter`); everyone else hands
it encoded frames over an unbounded memory channel, or, while that task is
idle, makes one non-blocking write itself. Unbounded is deliberate:
the reader must never block on queueing a pong or a credit frame (two peers
whose readers both wait on full queues deadlock), and payload frames are
already bounded by the per-stream credit windows.

:func:`send_all` is the same immediate write for the per-request sockets
(the agent's local clients, the server's upstreams); :func:`receive_some` is
the matching read, for those and the links.

It lives in ``server/`` because the host is where it was first needed; the
agent imports it rather than keeping a copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import Message

READ_SIZE = 256 * 1024
COALESCE_LIMIT = 256 * 1024
"""Bytes of queued frames merged into one write when a backlog exists."""


class LinkClosed(Exception):
    """The link is gone (closed by us, by the peer, or broken)."""


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


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
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


class FrameWriter:
    """Owns writes to one stream; frames queued with :meth:`send` go out in order.

    Frames already waiting are merged into one ``send_all`` — coalescing only
    happens when there is a backlog, so it never delays a lone frame.

    A frame sent while the writing task is parked with nothing queued is
    written at once by the caller, with one non-blocking ``write`` on a plain
    TCP socket: waking the writing task first costs a scheduler round (about
    40 µs, a tenth of an event's latency through the tunnel). Whatever that
    write cannot take, and every error, is left to the writing task, so the
    order of bytes and the handling of a broken link stay in one place.
    """

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        # Each item: encoded bytes and the number of frames they hold.
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, int]](math.inf)
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._idle = False
        self.bytes_sent = 0
        self.frames_sent = 0
        self.closed = False

    def send(self, msg: Message) -> None:
        """Queue one message (never blocks)."""
        self.send_bytes(encode(msg))

    def send_bytes(self, frame: bytes, frames: int = 1) -> None:
        """Queue encoded bytes holding ``frames`` whole frames (never blocks)."""
        if self.closed:
            raise LinkClosed("link is closed")
        if self._idle and self._socket is not None:
            written = write_now(self._socket, frame)
            if written == len(frame):
                self.bytes_sent += written
                self.frames_sent += frames
                return
            if written:
                self.bytes_sent += written
                frame = frame[written:]
        self._idle = False
        try:
            self._send.send_nowait((frame, frames))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed("link is closed") from None

    def close(self) -> None:
        """Stop accepting frames; :meth:`run` sends what is queued and returns."""
        self.closed = True
        self._send.close()

    async def run(self) -> None:
        """The writing task. Returns after :meth:`close` once the queue is drained."""
        try:
            await self._run()
        finally:
            self._idle = False  # nobody is left to finish a partial write

    async def _run(self) -> None:
        receive = self._receive
        while True:
            # Idle only while parked on an empty queue (send_bytes clears it).
            self._idle = receive.statistics().current_buffer_used == 0
            try:
                first, count = await receive.receive()
            except trio.EndOfChannel:
                return
            self._idle = False
            batch = [first]
            size = len(first)
            while size < COALESCE_LIMIT:
                try:
                    frame, frames = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(frame)
                size += len(frame)
                count += frames
            await self._stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
            self.bytes_sent += size
            self.frames_sent += count


class FrameReader:
    """Reads messages from one stream, counting bytes and frames."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int) -> None:
        self._stream = stream
        self.decoder = FrameDecoder(max_frame)
        self.bytes_received = 0
        self.frames_received = 0

    async def __aiter__(self) -> AsyncIterator[Message]:
        decoder = self.decoder
        while True:
            data = await receive_some(self._stream, READ_SIZE)
            if not data:
                decoder.close()
                return
            self.bytes_received += len(data)
            decoder.feed(data)
            while (msg := decoder.next_message()) is not None:
                self.frames_received += 1
                yield msg

    async def receive(self) -> Message:
        """Exactly one message (used during the handshake)."""
        decoder = self.decoder
        while True:
            msg = decoder.next_message()
            if msg is not None:
                self.frames_received += 1
                return msg
            data = await receive_some(self._stream, READ_SIZE)
            if not data:
                decoder.close()
                raise LinkClosed("peer closed the connection")
            self.bytes_received += len(data)
            decoder.feed(data)


__all__ = ["FrameReader", "FrameWriter", "LinkClosed", "ProtocolError", "receive_some", "send_all",
           "write_now"]
