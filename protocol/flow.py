"""Per-stream credit windows: the arithmetic, not the waiting.

Each stream direction has a window of bytes the sender may have in flight.
The sender spends credit with every payload frame (``flow_cost``) and may
overdraw by at most one frame (so an event larger than the window still
moves); it must wait while its credit is not positive. The receiver returns
credit as its consumer drains the data, in batches of at least half the
window, so credit frames stay rare.

:class:`StreamFlow` is one stream's two windows as one side holds them:
the credit it may spend, and the credit it owes the peer.
"""

from __future__ import annotations

from .errors import ProtocolError
from .framing import DEFAULT_MAX_FRAME
from .messages import (
    Credit,
    Data,
    HttpResponse,
    Message,
    Output,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
)

DEFAULT_WINDOW = 256 * 1024
"""Initial per-stream window in bytes (each direction)."""

FRAME_OVERHEAD = 16
"""What every payload frame costs beyond its payload, so empty events are not free."""


def flow_cost(msg: Message) -> int:
    """Bytes a message spends from its stream's window (0 for control frames)."""
    if isinstance(msg, Data | Output | SseRaw):
        return len(msg.data) + FRAME_OVERHEAD
    if isinstance(msg, HttpResponse):  # what its body would cost as a data frame
        return len(msg.body) + FRAME_OVERHEAD if msg.body else 0
    if isinstance(msg, SseEvent):
        return (
            _utf8_len(msg.data)
            + _utf8_len(msg.event)
            + _utf8_len(msg.sse_id)
            + FRAME_OVERHEAD
        )
    if isinstance(msg, SseEvents):  # what the events would cost one frame each
        return sum(
            _utf8_len(data) + _utf8_len(event) + _utf8_len(sse_id) + FRAME_OVERHEAD
            for event, data, sse_id, _ in msg.events
        )
    if isinstance(msg, SseComment):
        return _utf8_len(msg.text) + FRAME_OVERHEAD
    return 0


def _utf8_len(text: str | None) -> int:
    """Length in bytes on the wire (the spec counts UTF-8 bytes, not characters)."""
    if not text:
        return 0
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class SendWindow:
    """Sender's side: how much it may still send before waiting for credit."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.credit = window

    @property
    def open(self) -> bool:
        """True while the sender may send another payload frame."""
        return self.credit > 0

    def spend(self, cost: int) -> None:
        self.credit -= cost

    def grant(self, amount: int) -> None:
        if amount <= 0:
            raise ValueError("credit must be positive")
        self.credit += amount


OVERDRAW_SLACK = DEFAULT_MAX_FRAME
"""What a lenient receiver tolerates beyond two windows (one maximal frame) before it
calls it abuse."""


class ReceiveWindow:
    """Receiver's side: counts consumed bytes and says when to return credit.

    A *strict* receiver (the server, facing an untrusted agent) holds the
    sender to the rule exactly: a payload frame that arrives while everything
    the sender was ever granted is still outstanding was sent without credit,
    however the credit frames in flight were timed (the sender cannot have
    seen more credit than we returned). So a compliant sender leaves at most
    one window plus one frame buffered, and a cheater is caught at its first
    frame past that. A lenient receiver allows slack for a peer it trusts.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, *, strict: bool = False) -> None:
        self.window = window
        self.strict = strict
        self._consumed = 0
        self.outstanding = 0
        """Bytes received and not yet returned as credit."""
        self.overdrawn = False
        """A strict receiver saw a payload frame sent without credit."""

    def received(self, cost: int) -> None:
        if self.strict and cost and self.outstanding >= self.window:
            self.overdrawn = True
        self.outstanding += cost

    def consumed(self, cost: int) -> int:
        """Record ``cost`` bytes drained; return the credit to send now (0 for none yet)."""
        self._consumed += cost
        if self._consumed * 2 >= self.window:
            amount, self._consumed = self._consumed, 0
            self.outstanding -= amount
            return amount
        return 0

    def over_limit(self) -> bool:
        """The sender broke flow control: sent without credit (strict), or overdrew
        beyond two windows plus one maximal frame (lenient)."""
        return self.overdrawn or self.outstanding > 2 * self.window + OVERDRAW_SLACK


class StreamFlow:
    """Both directions of one stream's flow control, as one side sees them.

    What we send spends ``credit`` and waits while it is not positive;
    what the peer sends is counted until our consumer drains it, then
    returned as a ``credit`` frame. ``peer`` names the other side in errors;
    ``strict`` holds it to its credit exactly (see :class:`ReceiveWindow`).
    """

    def __init__(self, request_id: int, window: int = DEFAULT_WINDOW, *,
                 peer: str = "peer", strict: bool = False) -> None:
        self.id = request_id
        self.peer = peer
        self._send = SendWindow(window)
        self._receive = ReceiveWindow(window, strict=strict)

    # -- our sending ---------------------------------------------------------------
    @property
    def credit(self) -> int:
        """What we may still send; it may be negative after the frame that overdrew it."""
        return self._send.credit

    @property
    def may_send(self) -> bool:
        """True while we may send another payload frame."""
        return self._send.open

    def spend(self, cost: int) -> None:
        self._send.spend(cost)

    def grant(self, amount: int) -> None:
        """The peer sent ``credit``: a credit that is not positive is its fault."""
        try:
            self._send.grant(amount)
        except ValueError:
            raise ProtocolError(f"credit of {amount} bytes for request {self.id}") from None

    # -- the peer's sending --------------------------------------------------------
    def received(self, msg: Message) -> None:
        """Count what ``msg`` costs; a peer that overdrew beyond the limit broke the protocol."""
        cost = flow_cost(msg)
        if cost:
            self._receive.received(cost)
            if self._receive.over_limit():
                raise ProtocolError(
                    f"request {self.id}: {self.peer} ignored flow control (sent "
                    f"{self._receive.outstanding} bytes against a {self._receive.window}-byte "
                    "window without waiting for credit)")

    def consumed(self, cost: int) -> Credit | None:
        """``cost`` bytes were drained: the ``credit`` frame to return now, if one is due."""
        amount = self._receive.consumed(cost)
        return Credit(id=self.id, amount=amount) if amount else None
