"""The agent's multiplexer: one trio memory channel per request on the tunnel.

The link's reader hands each frame to its request's channel and never waits
(channels are unbounded; the server cannot send past a stream's credit, so
each holds at most about one window). A consumer that stops reading holds
back only its own stream: credit is returned only as it drains.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import outcome
import trio

from carapace.protocol.flow import StreamFlow, flow_cost
from carapace.protocol.framing import FrameTooLarge
from carapace.protocol.messages import Cancel, Credit, Message, RequestMessage
from carapace.protocol.requests import SERVER, RequestState, State

log = logging.getLogger("carapace.agent")


class LinkDown(Exception):
    """No tunnel link is up; the message says why, for the local client."""


class StreamLost(Exception):
    """The link under this request dropped before the request ended."""


class Link(Protocol):
    """What the multiplexer sends through: the agent's session with the server."""

    window: int
    accepting: bool

    def send(self, msg: Message) -> None: ...


T = TypeVar("T")


class Inbox(Generic[T]):
    """An unbounded queue with one reader: what a memory channel pair does here, lighter.

    A trio memory channel pair per request (two channel objects, a shared
    state, its statistics) was ~3 µs of the agent's ~100 µs of CPU per
    JSON-RPC call; one reader task and one writer (the link reader) need only
    a deque and the parked reader. Same rules as the channel: ``close`` ends
    it after what is queued, ``get`` is a checkpoint.
    """

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: trio.lowlevel.Task | None = None
        self._closed = False

    def put(self, item: T) -> None:
        """Queue ``item`` (never blocks); ClosedResourceError once closed."""
        if self._closed:
            raise trio.ClosedResourceError("the inbox is closed")
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Value(item))
        else:
            self._items.append(item)

    def close(self) -> None:
        """No more items: the reader gets what is queued, then EndOfChannel."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Error(trio.EndOfChannel()))

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def get(self) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._items or self._closed:
            item = self.get_nowait()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already reading this inbox")
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]


class Unwritten:
    """Bytes a :attr:`AgentStream.sink` began to write and the socket did not all take:
    the consumer writes them first, then returns ``cost`` credit."""

    __slots__ = ("cost", "data")

    def __init__(self, data: bytes, cost: int) -> None:
        self.data = data
        self.cost = cost


Sink = Callable[[RequestMessage], bool]
"""Writes a frame straight to the local client from the link reader; False if it did not."""


class AgentStream:
    """One request as the local side sees it.

    ``request`` holds its states (protocol/requests.py): its opening frame,
    and the server's frames where the local side decides what to do with
    them (:meth:`took`). The agent's own later frames are not fed to it: a
    shim's stdin is checked where the shim sends it, and a ``cancel`` may
    cross the server's answer on the wire.
    """

    def __init__(self, mux: Multiplexer, opening: RequestMessage, window: int) -> None:
        self.mux = mux
        self.id = request_id = opening.id
        self.request = RequestState.opened_by(opening)
        # None in the inbox is a nudge from a KeepaliveClock, never a frame.
        self._inbox: Inbox[RequestMessage | Unwritten | None] = Inbox()
        self.sink: Sink | None = None
        """Set by a consumer parked on an empty inbox (:meth:`arm`): the link reader hands
        it frames to write at once, instead of waking the consumer's task for each one."""
        self.flow = StreamFlow(request_id, window, peer="server")
        self._credit_changed = trio.Event()
        self.lost: str | None = None
        self.done = False
        self.sse = False

    # -- fed by the link reader ------------------------------------------------------
    def deliver(self, msg: RequestMessage) -> None:
        """Queue a server frame or take its credit; ProtocolError if it broke flow control."""
        if isinstance(msg, Credit):
            self.flow.grant(msg.amount)
            self._credit_changed.set()
            self._credit_changed = trio.Event()
            return
        self.flow.received(msg)
        sink = self.sink
        if sink is not None and sink(msg):
            return
        self.sink = None  # something waits in the inbox now: order is the consumer's again
        self._inbox.put(msg)

    def arm(self, sink: Sink) -> None:
        """The consumer is about to wait with nothing left to write: frames may go straight
        to ``sink`` until the next one that it does not take (or a keepalive) is queued."""
        if self._inbox.empty():
            self.sink = sink

    def put_unwritten(self, data: bytes, cost: int) -> None:
        """The sink wrote part of a frame: the rest goes first when the consumer wakes."""
        self.sink = None
        self._inbox.put(Unwritten(data, cost))

    def link_lost(self, reason: str) -> None:
        self.lost = reason
        self.sink = None
        self._inbox.close()
        self._credit_changed.set()

    # -- used by the local side ----------------------------------------------------------
    def keepalive_due(self) -> None:
        """Wake receive_or_keepalive() with None: the local client needs a keepalive."""
        self.sink = None
        try:
            self._inbox.put(None)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the stream is ending; nothing to keep alive

    async def receive(self) -> RequestMessage:
        """The next frame for this request; StreamLost if the link dropped first."""
        try:
            while True:
                msg = await self._inbox.get()
                if msg is not None and not isinstance(msg, Unwritten):
                    return msg
        except trio.EndOfChannel:
            raise StreamLost(self.lost or "tunnel link lost") from None

    async def receive_or_keepalive(self) -> RequestMessage | Unwritten | None:
        """Like receive(), or None once keepalive_due() was called, or what a sink left
        unwritten."""
        try:
            return await self._inbox.get()
        except trio.EndOfChannel:
            raise StreamLost(self.lost or "tunnel link lost") from None

    def took(self, msg: RequestMessage) -> State:
        """The server's state after ``msg``; ProtocolError if the server may not send it now."""
        return self.request.process(SERVER, msg)

    def receive_nowait(self) -> RequestMessage | None:
        """The next frame if one is queued, else None."""
        msg = self.queued()
        if isinstance(msg, Unwritten):  # pragma: no cover - only where a sink was armed
            raise AssertionError("unwritten sink bytes on a stream without a sink")
        return msg

    def queued(self) -> RequestMessage | Unwritten | None:
        """The next item if one is queued, else None: a frame, or on an event stream whose
        consumer armed a sink, what the sink left :class:`Unwritten`."""
        try:
            return self._inbox.get_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    def consumed(self, cost: int) -> None:
        """``cost`` bytes were delivered to the local client: return credit in batches."""
        credit = self.flow.consumed(cost)
        if credit is not None and self.lost is None and not self.done:
            try:
                self.mux.send(credit)
            except LinkDown:
                pass  # the link is going; link_lost() will end this stream

    async def send(self, msg: RequestMessage) -> None:
        """Send a payload frame (stdin) once the server has granted credit."""
        cost = flow_cost(msg)
        while not self.flow.may_send:
            if self.lost is not None:
                raise StreamLost(self.lost)
            await self._credit_changed.wait()
        if self.lost is not None:
            raise StreamLost(self.lost)
        self.flow.spend(cost)
        try:
            self.mux.send(msg)
        except LinkDown as exc:
            raise StreamLost(str(exc)) from None

    def send_control(self, msg: RequestMessage) -> None:
        if self.lost is not None:
            raise StreamLost(self.lost)
        try:
            self.mux.send(msg)
        except LinkDown as exc:
            raise StreamLost(str(exc)) from None

    def cancel(self, reason: str) -> None:
        """Tell the server to stop this request at once (local client went away)."""
        if not self.done and self.lost is None:
            try:
                self.mux.send(Cancel(id=self.id, reason=reason))
            except LinkDown:
                pass
        self.close()

    def close(self) -> None:
        self.done = True
        self.sink = None
        self.mux.forget(self.id)

    def stop(self, reason: str) -> None:
        """Cancel upstream and end this stream for its local reader, who then closes it."""
        if not self.done and self.lost is None:
            try:
                self.mux.send(Cancel(id=self.id, reason=reason))
            except LinkDown:
                pass
        self.link_lost(reason)


class Multiplexer:
    def __init__(self) -> None:
        self.streams: dict[int, AgentStream] = {}
        self._next_id = 1
        self.link: Link | None = None
        self.ready = False
        """A link is up and the server takes new requests."""
        self.down_reason = "not connected to the Carapace server yet"
        self._link_changed = trio.Event()
        self.requests_started = 0
        self.stream_closed = trio.Event()
        """Set (and replaced) whenever a stream is forgotten."""
        self.draining = False
        """The agent is shutting down: event streams end as soon as they are known."""

    # -- link lifecycle ----------------------------------------------------------------
    def link_up(self, link: Link) -> None:
        self.link = link
        self.ready = True
        self._signal()

    def link_suspended(self, reason: str) -> None:
        """The link dropped but the session may resume: keep streams, buffer what they send."""
        self.ready = False
        self.down_reason = reason
        self._signal()

    def _signal(self) -> None:
        self._link_changed.set()
        self._link_changed = trio.Event()

    def link_down(self, reason: str) -> None:
        """The session is gone: every open stream ends now."""
        self.link = None
        self.ready = False
        self.down_reason = reason
        for stream in list(self.streams.values()):
            stream.link_lost(reason)
        self.streams.clear()
        self.stream_closed.set()
        self.stream_closed = trio.Event()
        self._link_changed.set()
        self._link_changed = trio.Event()

    def send(self, msg: Message) -> None:
        link = self.link
        if link is None:
            raise LinkDown(self.down_reason)
        link.send(msg)

    # -- requests ------------------------------------------------------------------------
    async def open(
        self, first: Callable[[int], RequestMessage], wait: float = 0.0
    ) -> AgentStream:
        """Start a request; ``first(id)`` builds its opening frame.

        Waits up to ``wait`` seconds for a usable link, then raises LinkDown.
        """
        deadline = trio.current_time() + wait
        while True:
            link = self.link
            if link is not None and self.ready and link.accepting:
                request_id = self._next_id
                self._next_id += 1
                opening = first(request_id)
                stream = AgentStream(self, opening, link.window)
                self.streams[request_id] = stream
                try:
                    link.send(opening)
                except LinkDown:
                    self.forget(request_id)
                except FrameTooLarge:
                    self.forget(request_id)
                    raise
                else:
                    self.requests_started += 1
                    return stream
            if trio.current_time() >= deadline:
                raise LinkDown(self.down_reason)
            with trio.move_on_at(deadline):
                await self._link_changed.wait()

    def forget(self, request_id: int) -> None:
        if self.streams.pop(request_id, None) is not None:
            self.stream_closed.set()
            self.stream_closed = trio.Event()

    def dispatch(self, msg: RequestMessage) -> None:
        """Called by the link reader for every request frame; never blocks."""
        stream = self.streams.get(msg.id)
        if stream is None:
            log.debug("frame %s for finished request %d dropped", msg.TYPE, msg.id)
            return
        stream.deliver(msg)
