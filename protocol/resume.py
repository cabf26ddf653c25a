"""Session resumption arithmetic: numbered frames, acknowledgements, replay.

Each side numbers the session frames it sends (1, 2, …; link-level frames —
ping, pong, ack and the handshake — are not numbered) and counts the ones it
receives. It keeps every frame it sent until the peer acknowledges it
(``ack.received``), so when a link drops and the agent comes back with the
same session, each side resends exactly what the other has not received:
nothing lost, nothing twice.
"""

from __future__ import annotations

from collections import deque

from .messages import Ack, Message, Ping, Pong

UNNUMBERED: frozenset[type[Message]] = frozenset({Ping, Pong, Ack})
"""Link-level messages: they mean nothing on another link, so they are never replayed."""

DEFAULT_REPLAY_LIMIT = 64 * 1024 * 1024
"""Bytes of unacknowledged frames a session may hold before it gives up on resumption."""


def is_numbered(msg: Message) -> bool:
    return type(msg) not in UNNUMBERED


class ReplayOverflow(Exception):
    """More unacknowledged bytes than the limit: this session can no longer be resumed."""


class ReplayBuffer:
    """The sender's side: frames sent but not yet acknowledged by the peer."""

    def __init__(self, limit: int = DEFAULT_REPLAY_LIMIT) -> None:
        self.limit = limit
        self.sent = 0
        """Number of the last numbered frame sent."""
        self.acked = 0
        """The peer has confirmed every frame up to this number."""
        self._frames: deque[bytes] = deque()
        self.buffered_bytes = 0

    def record(self, frame: bytes) -> int:
        """Keep ``frame`` for replay; return its number."""
        self.sent += 1
        self._frames.append(frame)
        self.buffered_bytes += len(frame)
        if self.buffered_bytes > self.limit:
            raise ReplayOverflow(
                f"{self.buffered_bytes} bytes unacknowledged (limit {self.limit})"
            )
        return self.sent

    def ack(self, received: int) -> None:
        """The peer has received every frame up to ``received``; forget them."""
        if received < self.acked or received > self.sent:
            raise ValueError(
                f"acknowledgement of frame {received} outside {self.acked}..{self.sent}"
            )
        while self.acked < received:
            frame = self._frames.popleft()
            self.buffered_bytes -= len(frame)
            self.acked += 1

    def replay_after(self, received: int) -> list[bytes]:
        """Acknowledge ``received`` and return every later frame, in order, to resend."""
        self.ack(received)
        return list(self._frames)


class ReceiveCounter:
    """The receiver's side: how many numbered frames arrived, and when to say so."""

    def __init__(self, ack_every: int = 64) -> None:
        self.received = 0
        self.ack_every = ack_every
        self._acked = 0

    def count(self, msg: Message) -> None:
        if type(msg) not in UNNUMBERED:
            self.received += 1

    def ack_due(self) -> bool:
        return self.received - self._acked >= self.ack_every

    def make_ack(self) -> Ack:
        self._acked = self.received
        return Ack(received=self.received)
