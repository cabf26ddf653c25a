"""Frames over a trio stream: one writer task per socket, a reader that yields messages.

One task owns each socket's writes (:class:`FrameWriter`); everyone else hands
it encoded frames over a memory channel, or, while that task is idle, makes
one non-blocking write itself. Nobody ever waits for room in that queue:
the reader must never block on queueing a pong or a credit frame (two peers
whose readers both wait on full queues deadlock), and payload frames are
already bounded by the per-stream credit windows. Instead the queue may have
a *byte limit*: a frame that would take it past the limit is refused, the
writer closes, and its owner is told (``on_overflow``) — a peer that stops
reading its socket while it keeps sending pings is cut off, not buffered for.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import trio

from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import Message

from .sockets import READ_SIZE, receive_some, write_now

COALESCE_LIMIT = 256 * 1024
"""Bytes of queued frames merged into one write when a backlog exists."""

QUEUE_ITEM_OVERHEAD = 64
"""What a queued item costs beyond its bytes (its bytes object and tuple), so that
a flood of tiny frames (pongs) is counted near what it really holds."""


class LinkClosed(Exception):
    """The link is gone (closed by us, by the peer, or broken)."""


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

    def __init__(self, stream: trio.abc.SendStream, *, limit: int | None = None,
                 on_overflow: Callable[[int], None] | None = None) -> None:
        self._stream = stream
        self.limit = limit
        """Bytes the queue may hold (items counted with QUEUE_ITEM_OVERHEAD); None: no limit."""
        self._on_overflow = on_overflow
        self.queued_bytes = 0
        """What the queue holds now, as the limit counts it."""
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
        cost = len(frame) + QUEUE_ITEM_OVERHEAD
        if self.limit is not None and self.queued_bytes + cost > self.limit:
            self._overflow(cost)
        self.queued_bytes += cost
        try:
            self._send.send_nowait((frame, frames))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed("link is closed") from None

    def _overflow(self, cost: int) -> None:
        """The peer is not reading: stop taking frames, tell the owner, refuse this one."""
        self.closed = True
        if self._on_overflow is not None:
            self._on_overflow(self.queued_bytes + cost)
        raise LinkClosed(f"outbound queue over its limit of {self.limit} bytes")

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
            self.queued_bytes -= size + len(batch) * QUEUE_ITEM_OVERHEAD
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
