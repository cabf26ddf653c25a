"""Session resumption arithmetic: numbered frames, acknowledgements, replay.

Each side numbers the session frames it sends (1, 2, …; link-level frames —
ping, pong, ack and the handshake — are not numbered) and counts the ones it
receives. It keeps every frame it sent until the peer acknowledges it
(``ack.received``), so when a link drops and the agent comes back with the
same session, each side resends exactly what the other has not received:
nothing lost, nothing twice.

:class:`SessionLedger` is that bookkeeping for one session, as both sides
keep it: it encodes what the session sends and keeps the numbered frames,
counts what arrives and says when to acknowledge it, and hands out the
frames to resend on a new link.
"""

from __future__ import annotations

from collections import deque

from .errors import ProtocolError
from .framing import HEADER_SIZE, FrameTooLarge, encode
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


class SessionLedger:
    """One session's numbered frames, both ways; it outlives the session's links.

    ``max_frame`` is the peer's frame cap when it is known (the agent learns
    the server's from ``welcome``); ``peer`` names the other side in errors.
    """

    def __init__(self, replay_limit: int = DEFAULT_REPLAY_LIMIT, *,
                 max_frame: int | None = None, peer: str = "peer") -> None:
        self.replay = ReplayBuffer(replay_limit)
        self.counter = ReceiveCounter()
        self.max_frame = max_frame
        self.peer = peer

    @property
    def received(self) -> int:
        """Numbered frames received so far: what ``hello`` and ``welcome`` report."""
        return self.counter.received

    # -- sending -------------------------------------------------------------------
    def outgoing(self, msg: Message) -> bytes:
        """The frame for ``msg``, kept for replay if it is numbered.

        Raises :class:`FrameTooLarge` (nothing kept) if the peer could not
        take it, and :class:`ReplayOverflow` once more is unacknowledged than
        the limit allows: the session can then no longer be resumed.
        """
        frame = encode(msg)
        if self.max_frame is not None and len(frame) - HEADER_SIZE > self.max_frame:
            raise FrameTooLarge(
                f"{msg.TYPE} of {len(frame)} bytes exceeds the {self.peer}'s "
                f"{self.max_frame}-byte frame limit"
            )
        if type(msg) not in UNNUMBERED:
            self.replay.record(frame)
        return frame

    def on_ack(self, ack: Ack) -> None:
        """The peer has every frame up to ``ack.received``; an impossible number is its fault."""
        try:
            self.replay.ack(ack.received)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None

    def replay_after(self, received: int) -> list[bytes]:
        """The frames to resend on a new link to a peer that has ``received`` of them.

        ValueError if that number is impossible; the caller knows whether the
        peer lied or a check already ruled it out.
        """
        return self.replay.replay_after(received)

    # -- receiving -----------------------------------------------------------------
    def incoming(self, msg: Message) -> None:
        """Count a message that arrived (only numbered ones count)."""
        self.counter.count(msg)

    def ack_due(self) -> Ack | None:
        """An ``ack`` to send now because enough has arrived since the last one, else None."""
        return self.counter.make_ack() if self.counter.ack_due() else None

    def ack(self) -> Ack | None:
        """An ``ack`` of everything received (sent with each ping), None before anything came."""
        return self.counter.make_ack() if self.counter.received else None
