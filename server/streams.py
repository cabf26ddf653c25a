"""One request's half of the tunnel on the server: credit, inbox, cancellation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from carapace.protocol.flow import ReceiveWindow, SendWindow, flow_cost
from carapace.protocol.messages import (
    Credit,
    End,
    HttpResponse,
    Message,
    RequestFailed,
    RequestMessage,
)

if TYPE_CHECKING:
    from .session import AgentSession


class StreamGone(Exception):
    """The link under this request is gone; nothing more can be sent on it."""


class ServerStream:
    """What a request handler sees: ``send`` (credit-aware), ``inbox``, ``consumed``.

    Payload frames wait for credit, so a local reader that stalls holds back
    only its own stream; control frames (head, end, exit, failed) never wait.
    """

    def __init__(self, session: AgentSession, request_id: int, window: int) -> None:
        self.session = session
        self.id = request_id
        self.cancel_scope = trio.CancelScope()
        self.cancel_reason: str | None = None
        self._send_window = SendWindow(window)
        self._receive_window = ReceiveWindow(window)
        self._credit_changed = trio.Event()
        # Made on first use: only CLI requests (stdin, signals) receive frames, and
        # a channel pair per HTTP request showed in the JSON-RPC profile.
        self._inbox_pair: tuple[MemorySendChannel[Message],
                                MemoryReceiveChannel[Message]] | None = None
        self._inbox_closed = False
        self.finished = False
        self.sse = False
        self.bytes_out = 0
        self.events_out = 0

    # -- called by the session's reader ------------------------------------------
    def grant(self, amount: int) -> None:
        self._send_window.grant(amount)
        self._credit_changed.set()
        self._credit_changed = trio.Event()

    def deliver(self, msg: Message) -> bool:
        """Queue an agent → server frame (stdin, signal); False if the sender overdrew."""
        cost = flow_cost(msg)
        if cost:
            self._receive_window.received(cost)
            if self._receive_window.over_limit():
                return False
        try:
            self._inbox()[0].send_nowait(msg)
        except trio.ClosedResourceError:
            pass
        return True

    def _inbox(self) -> tuple[MemorySendChannel[Message], MemoryReceiveChannel[Message]]:
        if self._inbox_pair is None:
            self._inbox_pair = trio.open_memory_channel[Message](math.inf)
            if self._inbox_closed:
                self._inbox_pair[0].close()
        return self._inbox_pair

    @property
    def inbox(self) -> MemoryReceiveChannel[Message]:
        """Frames from the agent for this request (stdin, EOF, signals), in order."""
        return self._inbox()[1]

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancel_scope.cancel()

    def close_inbox(self) -> None:
        self._inbox_closed = True
        if self._inbox_pair is not None:
            self._inbox_pair[0].close()

    # -- called by the handler -----------------------------------------------------
    async def send(self, msg: RequestMessage) -> None:
        """Send a payload frame once this stream has credit."""
        cost = flow_cost(msg)
        while not self._send_window.open:
            await self._credit_changed.wait()
        self._send_window.spend(cost)
        self.bytes_out += cost
        self.session.send(msg)

    async def send_batch(self, msgs: Sequence[RequestMessage]) -> None:
        """Send frames that are ready together, in order, as :meth:`send` would one by one.

        Control frames may be among them (a head first, an ``end`` last:
        that one, or an ``http_response``, marks the stream finished). When
        the credit covers the whole batch (the usual case) it is spent once
        and the frames leave in one write; otherwise frame by frame, waiting
        whenever it runs out, so the rule stays "send only while credit is
        positive".
        """
        if not msgs:
            return
        costs = [flow_cost(msg) for msg in msgs]
        total = sum(costs)
        window = self._send_window
        if window.credit >= total:
            window.spend(total)
            self.bytes_out += total
            if isinstance(msgs[-1], End | HttpResponse):
                self.finished = True
            self.session.send_many(msgs)
            return
        send = self.session.send
        for msg, cost in zip(msgs, costs, strict=True):
            if cost:
                while not window.open:
                    await self._credit_changed.wait()
                window.spend(cost)
                self.bytes_out += cost
            if isinstance(msg, End | HttpResponse):
                self.finished = True
            send(msg)

    def send_control(self, msg: RequestMessage) -> None:
        """Send a frame that needs no credit (head, end, exit, failed)."""
        self.session.send(msg)

    def fail(self, status: int, code: str, message: str,
             retry_after: int | None = None) -> None:
        """End the request with a ``failed`` frame (codes: protocol/README.md)."""
        self.finished = True
        self.send_control(RequestFailed(id=self.id, status=status, code=code, message=message,
                                        retry_after=retry_after))

    def consumed(self, msg: Message) -> None:
        """The handler has passed ``msg`` on (e.g. to stdin): return its credit."""
        amount = self._receive_window.consumed(flow_cost(msg))
        if amount:
            self.session.send(Credit(id=self.id, amount=amount))
