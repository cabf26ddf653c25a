"""Agent links and agent sessions on the server.

A *link* is one TCP connection: handshake, reader, writer, keepalive. A
*session* is what an authenticated agent has on this server — its requests,
their upstream calls and child processes — and it outlives links: when a link
drops, the session waits ``--resume-grace`` seconds for the agent to come back
and then replays every frame the agent has not acknowledged
(``protocol/resume.py``). Only when the grace runs out are its requests
cancelled.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import encode
from carapace.protocol.handshake import NONCE_SIZE, HandshakeError, ServerHandshake
from carapace.protocol.messages import (
    HANDSHAKE_MESSAGES,
    Ack,
    Auth,
    Cancel,
    CliRequest,
    Credit,
    Data,
    End,
    GoAway,
    Hello,
    HttpRequest,
    Message,
    Ping,
    Pong,
    Reject,
    RequestFailed,
    RequestMessage,
    Signal,
    Welcome,
)
from carapace.protocol.resume import ReceiveCounter, ReplayBuffer, ReplayOverflow, is_numbered

from .framelink import FrameReader, FrameWriter, LinkClosed
from .streams import ServerStream

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .app import Server

log = logging.getLogger("carapace.server")


class TooManyAgents(Exception):
    """The server already holds ``--max-agents`` sessions."""


class AgentSession:
    """One agent's session: its requests survive link drops for the resume grace."""

    def __init__(self, server: Server, agent: str, version: int) -> None:
        self.server = server
        self.agent = agent
        self.version = version
        self.session_id = os.urandom(16)
        self.connected_at = time.time()
        self.peer = "?"
        self.streams: dict[int, ServerStream] = {}
        self.highest_id = 0
        self.last_rtt: float | None = None
        self.replay = ReplayBuffer(server.config.replay_limit)
        self.counter = ReceiveCounter()
        self.link: ServerLink | None = None
        # The last link's reader and writer, for byte and frame counters.
        self.reader: FrameReader | None = None
        self.writer: FrameWriter | None = None
        self.links = 0
        self.cancel_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.close_reason = ""
        self.ended = False
        self._link_changed = trio.Event()

    @property
    def attached(self) -> bool:
        return self.link is not None

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
        frame = encode(msg)
        if is_numbered(msg):
            try:
                self.replay.record(frame)
            except ReplayOverflow as exc:
                self.end(f"too much unacknowledged data, cannot resume: {exc}")
                raise LinkClosed("session ended") from None
        return frame

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

    def attach(self, link: ServerLink, peer_received: int) -> None:
        """Make ``link`` current and resend what the agent has not received."""
        if self.link is not None and self.link is not link:
            self.link.close("replaced by a newer link of the same session")
        self.link = link
        self.peer = link.peer
        self.reader = link.reader
        self.writer = link.writer
        self.links += 1
        for frame in self.replay.replay_after(peer_received):
            link.writer.send_bytes(frame)
        self._link_changed.set()
        self._link_changed = trio.Event()

    def detach(self, link: ServerLink) -> None:
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
        if self.link is not None and not self.ended:
            for stream in list(self.streams.values()):
                if not stream.finished:
                    stream.finished = True
                    self._send_quietly(RequestFailed(
                        id=stream.id, status=503, code="session_ended",
                        message=f"the Carapace server ended this agent's session ({reason})"))
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
        self.counter.count(msg)
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
            if isinstance(msg, Credit):
                if msg.amount <= 0:
                    raise ProtocolError(f"credit of {msg.amount} bytes for request {msg.id}")
                stream.grant(msg.amount)
            elif isinstance(msg, Cancel):
                stream.cancel(msg.reason or "cancelled by agent")
            elif isinstance(msg, Data | End | Signal):
                if not stream.deliver(msg):
                    raise ProtocolError(f"request {msg.id}: agent ignored flow control")
            else:
                raise ProtocolError(f"agent sent a server-only message: {msg.TYPE}")
        elif isinstance(msg, Ack):
            try:
                self.replay.ack(msg.received)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
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
        stream = ServerStream(self, msg.id, cfg.window)
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
                stream.finished = True
                try:
                    stream.send_control(End(id=msg.id))
                except LinkClosed:
                    pass
            stream.close_inbox()
            self.streams.pop(msg.id, None)
            self.server.request_finished()


class ServerLink:
    """One TCP connection from an agent: handshake, then frames for its session."""

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.writer = FrameWriter(stream)
        self.reader = FrameReader(stream, server.config.max_frame)
        self.session: AgentSession | None = None
        self.cancel_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self.close_reason = ""
        self._ping_sent: dict[int, float] = {}
        self._last_heard = trio.current_time()
        self.done = trio.Event()
        """Set when :meth:`run` has returned: queued frames sent (or given up), socket closed."""

    def close(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self.cancel_scope.cancel()

    async def run(self) -> None:
        """Handshake, then serve until the link ends. Never raises for peer misbehaviour."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            try:
                with self.cancel_scope:
                    await self._run()
            finally:
                if self.session is not None:
                    self.session.detach(self)
                self.writer.close()
                # Let queued frames (a Reject, a GoAway) out, but never wait on a dead peer.
                self._writer_scope.deadline = trio.current_time() + 1.0
        try:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self.stream.aclose()
        finally:
            self.done.set()

    async def _write(self) -> None:
        with self._writer_scope:
            try:
                await self.writer.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.writer.closed = True
                self.close(f"write failed: {exc}")

    async def _run(self) -> None:
        try:
            with trio.fail_after(self.server.config.handshake_timeout):
                session = await self._handshake()
        except trio.TooSlowError:
            log.warning(
                "handshake from %s timed out after %.0f s; closing",
                self.peer,
                self.server.config.handshake_timeout,
            )
            self.server.stats.handshake_failures += 1
            self.server.audit_limit("handshake_timeout", "?", self.peer,
                                    f"no handshake within {self.server.config.handshake_timeout} s")
            return
        except (ProtocolError, LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            if self.reader.bytes_received == 0:
                # A port probe or health check, not an agent.
                log.info("connection from %s closed before the handshake", self.peer)
            else:
                log.warning("handshake from %s failed: %s", self.peer, exc)
                self.server.stats.handshake_failures += 1
            return
        if session is None:
            return
        try:
            await self._serve(session)
        finally:
            log.info("agent %s (%s) link closed: %s", session.agent, self.peer,
                     self.close_reason or "closed")

    async def _handshake(self) -> AgentSession | None:
        first = await self.reader.receive()
        if not isinstance(first, Hello):
            raise ProtocolError(f"expected hello, got {first.TYPE}")
        server = self.server
        token = server.tokens.get(first.agent)
        try:
            hs = ServerHandshake(first, token, os.urandom(NONCE_SIZE), server.decoy_key)
            self.writer.send(hs.challenge())
            auth = await self.reader.receive()
            if isinstance(auth, Reject):
                log.warning(
                    "agent %r at %s refused our proof: %r", first.agent[:40], self.peer,
                    auth.message[:200],
                )
                server.stats.handshake_failures += 1
                return None
            if not isinstance(auth, Auth):
                raise ProtocolError(f"expected auth, got {auth.TYPE}")
            hs.verify(auth)
        except HandshakeError as exc:
            log.warning(
                "handshake from %s (agent %r) failed: %s", self.peer, first.agent[:40], exc
            )
            server.stats.handshake_failures += 1
            self.writer.send(Reject(code=exc.code, message=str(exc)))
            return None
        session = server.resumable(first.agent, first.resume, first.received)
        resumed = session is not None
        if session is None:
            try:
                session = await server.new_session(first.agent, hs.version)
            except TooManyAgents as exc:
                log.warning("refusing agent %s from %s: %s", first.agent, self.peer, exc)
                server.audit_limit("max_agents", first.agent, self.peer, str(exc))
                self.writer.send(Reject(code="limit", message=str(exc)))
                return None
        self.session = session
        self.writer.send(
            Welcome(
                session=session.session_id,
                window=server.config.window,
                max_frame=server.config.max_frame,
                server=server.version,
                resumed=resumed,
                received=session.counter.received,
            )
        )
        session.attach(self, first.received if resumed else 0)
        if resumed:
            log.info("agent %s resumed its session from %s (%d frames replayed)",
                     session.agent, self.peer, session.replay.sent - session.replay.acked)
        else:
            log.info("agent %s connected from %s (protocol v%d)", session.agent, self.peer,
                     session.version)
        return session

    async def _serve(self, session: AgentSession) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, session)
            try:
                async for msg in self.reader:
                    self._last_heard = trio.current_time()
                    if isinstance(msg, Ping):
                        self.writer.send(Pong(nonce=msg.nonce))
                        continue
                    if isinstance(msg, Pong):
                        sent = self._ping_sent.pop(msg.nonce, None)
                        if sent is not None:
                            session.last_rtt = trio.current_time() - sent
                        continue
                    session.receive(msg)
                    if session.counter.ack_due():
                        self.writer.send(session.counter.make_ack())
                self.close("agent closed the connection")
            except ProtocolError as exc:
                self.server.stats.protocol_errors += 1
                self.close(f"protocol error: {exc}")
                self.server.audit_limit("protocol", session.agent, self.peer, str(exc)[:300])
                log.warning("agent %s (%s) broke the protocol: %s; ending its session",
                            session.agent, self.peer, exc)
                session.end(f"protocol error: {exc}")
            except (LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:
                self.close(f"link broken: {exc}")
            nursery.cancel_scope.cancel()

    async def _keepalive(self, session: AgentSession) -> None:
        cfg = self.server.config
        nonce = 0
        while True:
            await trio.sleep(cfg.ping_interval)
            if trio.current_time() - self._last_heard > cfg.idle_timeout:
                self.close(f"no frame for {cfg.idle_timeout:.0f} s (keepalive timeout)")
                self.server.audit_limit("idle_timeout", session.agent, self.peer,
                                        f"no frame for {cfg.idle_timeout:.0f} s")
                return
            nonce += 1
            self._ping_sent[nonce] = trio.current_time()
            if len(self._ping_sent) > 8:
                self._ping_sent.pop(min(self._ping_sent))
            try:
                if session.counter.received:
                    self.writer.send(session.counter.make_ack())
                self.writer.send(Ping(nonce=nonce))
            except LinkClosed:
                return
