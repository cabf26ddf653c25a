"""Agent sessions on the server.

A *session* is what an authenticated agent has on this server — its requests,
their upstream calls and child processes — and it outlives links (``link.py``:
one connection each): when a link drops, the session waits ``--resume-grace``
seconds for the agent to come back and then replays every frame the agent has
not acknowledged (``protocol/resume.py``). Only when the grace runs out are
its requests cancelled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.messages import (
    HANDSHAKE_MESSAGES,
    Ack,
    Cancel,
    CliRequest,
    Credit,
    End,
    GoAway,
    HttpRequest,
    Message,
    RequestFailed,
    RequestMessage,
)
from carapace.protocol.requests import AGENT, SENT_BY
from carapace.protocol.resume import ReplayBuffer, ReplayOverflow, SessionLedger
from carapace.runtime.frames import FrameReader, FrameWriter, LinkClosed

from .config import ServerConfig
from .memory import AgentMemory, MemoryLimitExceeded
from .stats import Stats
from .streams import EventsObserver, ServerStream

log = logging.getLogger("carapace.server")

Direction = Literal["in", "out"]


class SessionHost(Protocol):
    """What a session needs of the server that owns it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def draining(self) -> bool: ...

    @property
    def frame_observers(self) -> Sequence[object]:
        """Non-empty when someone watches frames: then :meth:`observe` is called for each."""
        ...

    def observe(self, session: AgentSession, direction: Direction, msg: Message) -> None: ...

    def unregister(self, session: AgentSession) -> None: ...

    async def handle_request(self, session: AgentSession, stream: ServerStream,
                             msg: HttpRequest | CliRequest) -> None: ...

    def audit_limit(self, limit: str, agent: str, peer: str, detail: str) -> None: ...

    def request_finished(self) -> None: ...


class AttachedLink(Protocol):
    """What a session needs of the link it is attached to."""

    @property
    def peer(self) -> str: ...

    @property
    def reader(self) -> FrameReader: ...

    @property
    def writer(self) -> FrameWriter: ...

    @property
    def done(self) -> trio.Event:
        """Set once the link has sent what it had queued and closed its socket."""
        ...

    def close(self, reason: str) -> None: ...


class TooManyAgents(Exception):
    """The server already holds ``--max-agents`` sessions."""


class AgentSession:
    """One agent's session: its requests survive link drops for the resume grace."""

    def __init__(self, server: SessionHost, agent: str, version: int,
                 on_events: EventsObserver | None = None) -> None:
        self.server = server
        self.on_events = on_events
        """Told of the SSE events each of its streams sends (the server's metrics)."""
        self.agent = agent
        self.version = version
        self.session_id = os.urandom(16)
        self.connected_at = time.time()
        self.peer = "?"
        self.streams: dict[int, ServerStream] = {}
        self.highest_id = 0
        self.last_rtt: float | None = None
        self.ledger = SessionLedger(server.config.replay_limit, peer="agent")
        self.memory = AgentMemory(server.config.agent_memory_limit, self.ledger.replay)
        """What this agent holds on the server: inboxes, replay, link queue."""
        self.link: AttachedLink | None = None
        # The last link's reader and writer, for byte and frame counters.
        self.reader: FrameReader | None = None
        self.writer: FrameWriter | None = None
        self.links = 0
        self.cancel_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.close_reason = ""
        self.ended = False
        self._ending = False
        self._link_changed = trio.Event()

    @property
    def attached(self) -> bool:
        return self.link is not None

    @property
    def replay(self) -> ReplayBuffer:
        """The frames kept for the agent: what a resuming agent may ask for."""
        return self.ledger.replay

    # -- sending ---------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue a frame to the agent; kept for replay until acknowledged."""
        if self.ended:
            raise LinkClosed("session ended")
        frame = self._encode(msg)
        self.server.stats.frames_out += 1
        link = self.link
        if link is not None:
            try:
                link.writer.send_bytes(frame)
            except LinkClosed:
                pass  # kept in the replay buffer for the next link

    def send_many(self, msgs: Sequence[Message]) -> None:
        """Queue frames that are ready together: one write instead of one each."""
        if self.ended:
            raise LinkClosed("session ended")
        frames = b"".join([self._encode(msg) for msg in msgs])
        self.server.stats.frames_out += len(msgs)
        link = self.link
        if link is not None:
            try:
                link.writer.send_bytes(frames, len(msgs))
            except LinkClosed:
                pass  # kept in the replay buffer for the next link

    def _encode(self, msg: Message) -> bytes:
        """The frame for ``msg``, shown to observers and kept for replay if numbered."""
        if self.server.frame_observers:
            self.server.observe(self, "out", msg)
        try:
            frame = self.ledger.outgoing(msg)
            if not self._ending:
                self.memory.check()
        except ReplayOverflow as exc:
            self.end(f"too much unacknowledged data, cannot resume: {exc}")
            raise LinkClosed("session ended") from None
        except MemoryLimitExceeded as exc:
            self._over_budget(exc)
            raise LinkClosed("session ended") from None
        return frame

    def _room_for(self, request_id: int, size: int) -> bool:
        """Whether a request of ``size`` bytes (its body, its argv) fits the agent's budget
        for as long as it runs; if not, it is refused (the agent may retry later)."""
        used, limit = self.memory.used, self.memory.limit
        if used + size <= limit:
            return True
        detail = (f"request {request_id} refused: {size} bytes on top of the {used} the agent "
                  f"holds would pass --agent-memory-limit {limit}")
        log.warning("agent %s: %s", self.agent, detail)
        self.server.audit_limit("agent_memory", self.agent, self.peer, detail)
        self.send(RequestFailed(
            id=request_id, status=503, code="too_many_requests",
            message=f"agent {self.agent} has too much in flight on the Carapace server "
            f"(--agent-memory-limit {limit} bytes); retry when some requests finish"))
        return False

    def _over_budget(self, exc: MemoryLimitExceeded) -> None:
        """The agent holds more than --agent-memory-limit: record it and end the session."""
        log.warning("agent %s (%s): %s; ending its session", self.agent, self.peer, exc)
        self.server.audit_limit("agent_memory", self.agent, self.peer, str(exc))
        self.end(f"memory limit: {exc}")

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's own task: hosts its requests until it ends."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    task_status.started()
                    nursery.start_soon(self._expire_when_abandoned)
        finally:
            self.ended = True
            for stream in list(self.streams.values()):
                stream.cancel("session ended")
            self.server.unregister(self)
            log.info("session of agent %s ended: %s", self.agent, self.close_reason or "closed")

    async def _expire_when_abandoned(self) -> None:
        grace = self.server.config.resume_grace
        while True:
            while self.link is not None:
                await self._link_changed.wait()
            with trio.move_on_after(grace):
                while self.link is None:
                    await self._link_changed.wait()
                continue
            self.end(f"the agent did not come back within {grace:.0f} s")
            return

    def attach(self, link: AttachedLink, peer_received: int) -> None:
        """Make ``link`` current and resend what the agent has not received."""
        if self.link is not None and self.link is not link:
            self.link.close("replaced by a newer link of the same session")
        self.link = link
        self.peer = link.peer
        self.reader = link.reader
        self.writer = link.writer
        self.memory.link_queue = link.writer
        self.links += 1
        try:
            for frame in self.ledger.replay_after(peer_received):
                link.writer.send_bytes(frame)
        except LinkClosed:
            pass  # its queue overflowed, and the link is closing: the agent may come back
        self._link_changed.set()
        self._link_changed = trio.Event()

    def detach(self, link: AttachedLink) -> None:
        if self.link is link:
            self.link = None
            self._link_changed.set()
            self._link_changed = trio.Event()

    def end(self, reason: str) -> None:
        """End the session now: fail its requests, tell the agent, close the link.

        The agent hears it first (a ``failed`` per open request and a
        ``goaway``), so its local clients fail at once instead of waiting for
        a resumption that will never come (a revoked token, a protocol error).
        """
        if not self.close_reason:
            self.close_reason = reason
        if self._ending:  # its own last frames may end it again (over a limit): once is enough
            return
        self._ending = True
        if self.link is not None and not self.ended:
            for stream in list(self.streams.values()):
                if not stream.finished:
                    failed = RequestFailed(
                        id=stream.id, status=503, code="session_ended",
                        message=f"the Carapace server ended this agent's session ({reason})")
                    stream.note_frame(failed)
                    self._send_quietly(failed)
            self._send_quietly(GoAway(reason=reason))
            self.link.close(reason)
        self.cancel_scope.cancel()

    def _send_quietly(self, msg: Message) -> None:
        try:
            self.send(msg)
        except LinkClosed:
            pass

    def close(self) -> None:
        self.end("closed by the server")

    def go_away(self, reason: str) -> None:
        try:
            self.send(GoAway(reason=reason))
        except LinkClosed:
            pass

    # -- receiving -------------------------------------------------------------
    def receive(self, msg: Message) -> None:
        """Handle one frame from the agent (called by the current link's reader)."""
        self.ledger.incoming(msg)
        if self.server.frame_observers:
            self.server.observe(self, "in", msg)
        self.server.stats.frames_in += 1
        if isinstance(msg, RequestMessage):
            if isinstance(msg, HttpRequest | CliRequest):
                self._start_request(msg)
                return
            stream = self.streams.get(msg.id)
            if stream is None:
                log.debug("agent %s: %s for unknown request %d dropped", self.agent, msg.TYPE,
                          msg.id)
                self.server.stats.unknown_id_frames += 1
                return
            if type(msg) not in SENT_BY[AGENT]:
                raise ProtocolError(f"agent sent a server-only message: {msg.TYPE}")
            if isinstance(msg, Credit):
                stream.grant(msg.amount)
            elif isinstance(msg, Cancel):
                stream.cancel(msg.reason or "cancelled by agent")
            else:  # data, end, signal: for the handler, in order (it ignores what it cannot use)
                try:
                    stream.deliver(msg)
                except MemoryLimitExceeded as exc:
                    self._over_budget(exc)
        elif isinstance(msg, Ack):
            self.ledger.on_ack(msg)
        elif type(msg) in HANDSHAKE_MESSAGES:
            raise ProtocolError(f"handshake message {msg.TYPE} after the session started")
        else:
            raise ProtocolError(f"agent sent a server-only message: {msg.TYPE}")

    def _start_request(self, msg: HttpRequest | CliRequest) -> None:
        if msg.id <= self.highest_id:
            raise ProtocolError(f"request id {msg.id} reused or out of order")
        self.highest_id = msg.id
        cfg = self.server.config
        if self.server.draining:
            self.send(RequestFailed(id=msg.id, status=503, code="shutting_down",
                                    message="the Carapace server is shutting down; retry shortly"))
            return
        if len(self.streams) >= cfg.max_requests_per_agent:
            log.warning("agent %s hit the limit of %d concurrent requests", self.agent,
                        cfg.max_requests_per_agent)
            self.server.audit_limit("max_requests_per_agent", self.agent, self.peer,
                                    f"request {msg.id} refused: {len(self.streams)} in flight")
            self.send(RequestFailed(
                id=msg.id, status=503, code="too_many_requests",
                message=f"agent {self.agent} already has {cfg.max_requests_per_agent} requests "
                "in flight (--max-requests-per-agent); retry when some finish",
            ))
            return
        size = _request_bytes(msg)
        if not self._room_for(msg.id, size):
            return
        stream = ServerStream(self, msg.id, cfg.window,
                              on_events=self.on_events, memory=self.memory)
        stream.hold(size)
        self.streams[msg.id] = stream
        assert self.nursery is not None
        self.nursery.start_soon(self._run_request, stream, msg)

    async def _run_request(self, stream: ServerStream, msg: HttpRequest | CliRequest) -> None:
        try:
            with stream.cancel_scope:
                await self.server.handle_request(self, stream, msg)
        except LinkClosed:
            pass
        except Exception:
            log.exception("request %d from agent %s failed unexpectedly", msg.id, self.agent)
            self.server.stats.errors += 1
            if not stream.finished:
                try:
                    stream.fail(500, "internal",
                                "internal error in the Carapace server (see its log)")
                except LinkClosed:
                    pass
        finally:
            if stream.sse and not stream.finished and self.server.draining:
                # Shutdown ends event streams cleanly, so clients reconnect with Last-Event-ID.
                try:
                    stream.send_control(End(id=msg.id))
                except LinkClosed:
                    pass
            stream.close_inbox()
            self.streams.pop(msg.id, None)
            self.server.request_finished()


def _request_bytes(msg: HttpRequest | CliRequest) -> int:
    """What a request's own frame keeps in memory while it runs (near enough)."""
    if isinstance(msg, HttpRequest):
        return len(msg.body) + len(msg.target) + sum(len(k) + len(v) for k, v in msg.headers)
    return (sum(len(a) for a in msg.argv) + len(msg.cwd)
            + sum(len(k) + len(v) for k, v in msg.env))
