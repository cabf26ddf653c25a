"""Trio shell around the sans-IO frame codec, shared by server, agent and debug proxy.

One task owns each socket's writes (:class:`FrameWriter`); everyone else hands
it encoded frames over an unbounded memory channel. Unbounded is deliberate:
the reader must never block on queueing a pong or a credit frame (two peers
whose readers both wait on full queues deadlock), and payload frames are
already bounded by the per-stream credit windows.

It lives in ``server/`` because the host is where it was first needed; the
agent imports it rather than keeping a copy.
"""

from __future__ import annotations

import math
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


class FrameWriter:
    """Owns writes to one stream; frames queued with :meth:`send` go out in order.

    Frames already waiting are merged into one ``send_all`` — coalescing only
    happens when there is a backlog, so it never delays a lone frame.
    """

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)
        self.bytes_sent = 0
        self.frames_sent = 0
        self.closed = False

    def send(self, msg: Message) -> None:
        """Queue one message (never blocks)."""
        self.send_bytes(encode(msg))

    def send_bytes(self, frame: bytes) -> None:
        if self.closed:
            raise LinkClosed("link is closed")
        try:
            self._send.send_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed("link is closed") from None

    def close(self) -> None:
        """Stop accepting frames; :meth:`run` sends what is queued and returns."""
        self.closed = True
        self._send.close()

    async def run(self) -> None:
        """The writing task. Returns after :meth:`close` once the queue is drained."""
        receive = self._receive
        async for first in receive:
            batch = [first]
            size = len(first)
            count = 1
            while size < COALESCE_LIMIT:
                try:
                    frame = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(frame)
                size += len(frame)
                count += 1
            await self._stream.send_all(batch[0] if count == 1 else b"".join(batch))
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
            data = await self._stream.receive_some(READ_SIZE)
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
            data = await self._stream.receive_some(READ_SIZE)
            if not data:
                decoder.close()
                raise LinkClosed("peer closed the connection")
            self.bytes_received += len(data)
            decoder.feed(data)


__all__ = ["FrameReader", "FrameWriter", "LinkClosed", "ProtocolError"]
