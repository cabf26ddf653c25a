"""One request's half of the tunnel on the server: credit, inbox, cancellation, what was sent."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from carapace.protocol.flow import StreamFlow, flow_cost
from carapace.protocol.messages import (
    Data,
    HttpHead,
    HttpResponse,
    Message,
    RequestFailed,
    RequestMessage,
    SseEvent,
    SseEvents,
    SseRaw,
)
from carapace.protocol.requests import ENDS_REQUEST

from .memory import INBOX_ITEM_OVERHEAD, AgentMemory


class FrameSink(Protocol):
    """Where a stream's frames go: the agent's session (queued for its link, kept for replay)."""

    def send(self, msg: Message) -> None: ...

    def send_many(self, msgs: Sequence[Message]) -> None: ...


def _text_bytes(text: str | None) -> int:
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ResponseSent:
    """What one request has sent towards the VM, as its completion record reports it.

    Filled in as frames are handed to the stream, before any wait for credit:
    a request cut off while its frames wait (its reader stopped reading, the
    link is gone) reports what its upstream had produced for the VM by then.
    """

    __slots__ = ("body_bytes", "events", "failed", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        """The head's status, or the one of a ``failed`` frame (Carapace's answer)."""
        self.failed: str | None = None
        """The code of the ``failed`` frame that ended the request, if one did."""
        self.body_bytes = 0
        """Response body bytes; for an event stream, the bytes of the events' data (of
        the event-stream bytes, where they travel as they are: ``sse_raw``)."""
        self.events = 0
        """SSE events."""

    def record(self, msgs: Sequence[Message]) -> int:
        """Take in frames about to be sent; return how many SSE events they carry."""
        size = events = 0
        frames: Sequence[Any] = msgs  # exact type tests below, which mypy does not narrow on
        for msg in frames:
            kind = type(msg)  # not isinstance: this runs for every frame of every request
            if kind is SseRaw:
                events += msg.events
                size += len(msg.data)
            elif kind is SseEvent:
                events += 1
                size += _text_bytes(msg.data)
            elif kind is SseEvents:
                events += len(msg.events)
                size += sum(_text_bytes(data) for _, data, _, _ in msg.events)
            elif kind is Data:
                size += len(msg.data)
            elif kind is HttpHead:
                self.status = msg.status
            elif kind is HttpResponse:
                self.status = msg.status
                size += len(msg.body)
            elif kind is RequestFailed:
                self.status = msg.status
                self.failed = msg.code
        self.body_bytes += size
        self.events += events
        return events


EventsObserver = Callable[[int, "float | None"], None]
"""Told ``(count, arrived)`` once a stream has queued SSE events on the link;
``arrived`` is the trio time their bytes came from the upstream (None: unknown)."""


class ServerStream:
    """What a request handler sees: ``send`` (credit-aware), ``inbox``, ``consumed``.

    Payload frames wait for credit, so a local reader that stalls holds back
    only its own stream; control frames (head, end, exit, failed) never wait.
    ``on_events`` (the server's metrics) hears of every SSE event sent, and
    :attr:`sent` records what the response was, for the completion record.

    It notes when the request's final frame has gone (:attr:`finished`), but
    does not hold its handler to the order of protocol/requests.py: the
    handlers build their frames in order, and a handler whose request the
    session has just ended may still send a frame before its cancellation
    lands, which goes out as ever and which the agent drops.
    """

    def __init__(self, session: FrameSink, request_id: int, window: int,
                 on_events: EventsObserver | None = None,
                 memory: AgentMemory | None = None) -> None:
        self.session = session
        self.id = request_id
        self.cancel_scope = trio.CancelScope()
        self.cancel_reason: str | None = None
        # Strict: the agent is untrusted, and its credit is all that bounds this inbox.
        self.flow = StreamFlow(request_id, window, peer="agent", strict=True)
        self._memory = memory
        """The agent's budget, charged with what waits in the inbox (None: not counted)."""
        self._held = 0
        """What this stream has charged to the budget and not yet released."""
        self._credit_changed = trio.Event()
        # Made on first use: only CLI requests (stdin, signals) receive frames, and
        # a channel pair per HTTP request showed in the JSON-RPC profile.
        self._inbox_pair: tuple[MemorySendChannel[Message],
                                MemoryReceiveChannel[Message]] | None = None
        self._inbox_closed = False
        self._finished = False
        self.sse = False
        self.bytes_out = 0
        """Credit spent (``flow_cost``), not body bytes: those are in ``sent``."""
        self.sent = ResponseSent()
        self._on_events = on_events

    @property
    def finished(self) -> bool:
        """The request's final frame has gone to the agent: its id is dead."""
        return self._finished

    # -- called by the session's reader ------------------------------------------
    def grant(self, amount: int) -> None:
        """The agent sent credit (ProtocolError if it is not positive)."""
        self.flow.grant(amount)
        self._credit_changed.set()
        self._credit_changed = trio.Event()

    def deliver(self, msg: Message) -> None:
        """Queue an agent → server frame (stdin, signal); ProtocolError if the agent overdrew,
        MemoryLimitExceeded if it now holds more than its budget."""
        self.flow.received(msg)
        try:
            self._inbox()[0].send_nowait(msg)
        except trio.ClosedResourceError:
            return
        self._charge(flow_cost(msg) + INBOX_ITEM_OVERHEAD)

    def hold(self, amount: int) -> None:
        """Charge the agent's budget with what this request keeps while it runs (its body);
        released with everything else when the request ends."""
        self._charge(amount)

    def _charge(self, amount: int) -> None:
        self._held += amount
        if self._memory is not None:
            self._memory.charge(amount)

    def _release(self, amount: int) -> None:
        amount = min(amount, self._held)
        self._held -= amount
        if self._memory is not None:
            self._memory.release(amount)

    def _inbox(self) -> tuple[MemorySendChannel[Message], MemoryReceiveChannel[Message]]:
        if self._inbox_pair is None:
            self._inbox_pair = trio.open_memory_channel[Message](math.inf)
            if self._inbox_closed:
                self._inbox_pair[0].close()
        return self._inbox_pair

    async def incoming(self) -> AsyncIterator[Message]:
        """Frames from the agent for this request (stdin, EOF, signals), in order.

        A payload frame still counts against the agent's budget until the
        handler calls :meth:`consumed` for it.
        """
        async for msg in self._inbox()[1]:
            self._release(INBOX_ITEM_OVERHEAD)
            yield msg

    def put_back(self, msgs: Sequence[Message]) -> None:
        """Return frames taken from :meth:`incoming` to its front, ahead of any queued since.

        A step that must watch the inbox before the handler reads it (a call
        waiting for approval watches for a signal) hands back what it took;
        they count against the agent's budget again until they are taken anew.
        """
        if not msgs:
            return
        self._charge(len(msgs) * INBOX_ITEM_OVERHEAD)
        old = self._inbox()
        new = trio.open_memory_channel[Message](math.inf)
        for msg in msgs:
            new[0].send_nowait(msg)
        while True:
            try:
                new[0].send_nowait(old[1].receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._inbox_pair = new
        if self._inbox_closed:
            new[0].close()

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancel_scope.cancel()

    def close_inbox(self) -> None:
        """The request is over: whatever it still held is released."""
        self._inbox_closed = True
        if self._inbox_pair is not None:
            self._inbox_pair[0].close()
        self._release(self._held)

    # -- called by the handler -----------------------------------------------------
    async def send(self, msg: RequestMessage) -> None:
        """Send a payload frame once this stream has credit."""
        cost = flow_cost(msg)
        events = self.sent.record((msg,))
        flow = self.flow
        while not flow.may_send:
            await self._credit_changed.wait()
        flow.spend(cost)
        self.bytes_out += cost
        self.note_frame(msg)
        self.session.send(msg)
        if events and self._on_events is not None:
            self._on_events(events, None)

    async def send_batch(self, msgs: Sequence[RequestMessage],
                         arrived: float | None = None) -> None:
        """Send frames that are ready together, in order, as :meth:`send` would one by one.

        Control frames may be among them (a head first, an ``end`` last:
        that one, or an ``http_response``, marks the stream finished). When
        the credit covers the whole batch (the usual case) it is spent once
        and the frames leave in one write; otherwise frame by frame, waiting
        whenever it runs out, so the rule stays "send only while credit is
        positive". ``arrived``: the trio time the upstream bytes behind these
        frames came, for the event latency ``on_events`` measures.
        """
        if not msgs:
            return
        events = self.sent.record(msgs)
        costs = [flow_cost(msg) for msg in msgs]
        total = sum(costs)
        flow = self.flow
        if flow.credit >= total:
            flow.spend(total)
            self.bytes_out += total
            self.note_frame(msgs[-1])  # a final frame can only be the last
            self.session.send_many(msgs)
        else:
            send = self.session.send
            for msg, cost in zip(msgs, costs, strict=True):
                if cost:
                    while not flow.may_send:
                        await self._credit_changed.wait()
                    flow.spend(cost)
                    self.bytes_out += cost
                self.note_frame(msg)
                send(msg)
        # Once queued, so that the latency includes any wait for credit.
        if events and self._on_events is not None:
            self._on_events(events, arrived)

    def send_control(self, msg: RequestMessage) -> None:
        """Send a frame that needs no credit (head, end, exit, failed)."""
        self.sent.record((msg,))
        self.note_frame(msg)
        self.session.send(msg)

    def note_frame(self, msg: Message) -> None:
        """Note a frame that goes to the agent for this request (before it goes).

        The session calls it too, for the ``failed`` it sends itself when it
        ends: that one is not the handler's, so it bypasses the send methods
        (and :attr:`sent`).
        """
        if type(msg) in ENDS_REQUEST:
            self._finished = True

    def fail(self, status: int, code: str, message: str,
             retry_after: int | None = None) -> None:
        """End the request with a ``failed`` frame (codes: protocol/README.md)."""
        self.send_control(RequestFailed(id=self.id, status=status, code=code, message=message,
                                        retry_after=retry_after))

    def consumed(self, msg: Message) -> None:
        """The handler has passed ``msg`` on (e.g. to stdin): return its credit."""
        cost = flow_cost(msg)
        self._release(cost)
        credit = self.flow.consumed(cost)
        if credit is not None:
            self.session.send(credit)
