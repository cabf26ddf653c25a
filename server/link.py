"""Agent links on the server: one connection each — handshake, reader, writer, keepalive.

A link authenticates its agent (``protocol/handshake.py``), then attaches to
the agent's session (a new one, or the one it resumes) and carries its frames
until the connection ends; the session outlives it (``session.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import OversizedFrame
from carapace.protocol.handshake import NONCE_SIZE, HandshakeError, ServerHandshake
from carapace.protocol.keepalive import Expired, Keepalive, PingBudget
from carapace.protocol.messages import Auth, Hello, Ping, Pong, Reject, Welcome
from carapace.runtime.frames import FrameReader, FrameWriter, LinkClosed

from .admission import Slot
from .config import ServerConfig
from .session import AgentSession, TooManyAgents
from .stats import Stats

log = logging.getLogger("carapace.server")


class LinkHost(Protocol):
    """What a link needs of the server: who may connect, and their sessions."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def tokens(self) -> Mapping[str, bytes]: ...

    @property
    def decoy_key(self) -> bytes: ...

    @property
    def version(self) -> str: ...

    def resumable(self, agent: str, session_id: bytes | None,
                  received: int) -> AgentSession | None: ...

    async def new_session(self, agent: str, version: int) -> AgentSession: ...

    def audit_limit(self, limit: str, agent: str, peer: str, detail: str) -> None: ...

    def refuse_unauthenticated(self, reason: str, peer: str, detail: str) -> None: ...


class ServerLink:
    """One TCP connection from an agent: handshake, then frames for its session.

    Until the agent has proved who it is, the link holds a ``slot`` among the
    server's unauthenticated connections and takes only small frames
    (``--handshake-max-frame``); its outbound queue is bounded
    (``--max-link-queue``) and a peer that lets it fill is cut off.
    """

    def __init__(self, server: LinkHost, stream: trio.abc.Stream, peer: str,
                 slot: Slot | None = None) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.slot = slot
        self.writer = FrameWriter(stream, limit=server.config.max_link_queue,
                                  on_overflow=self._queue_overflow)
        self.reader = FrameReader(stream, server.config.handshake_max_frame)
        self.session: AgentSession | None = None
        self.cancel_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self.close_reason = ""
        self._opened_at = trio.current_time()
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

    def _queue_overflow(self, queued: int) -> None:
        """The agent stopped reading while frames kept coming for it: cut it off."""
        agent = self.session.agent if self.session is not None else "?"
        limit = self.server.config.max_link_queue
        detail = (f"{queued} bytes queued for an agent that is not reading its link, over "
                  f"--max-link-queue {limit}")
        log.warning("agent %s (%s): %s; closing the link", agent, self.peer, detail)
        self.server.audit_limit("link_queue", agent, self.peer, detail)
        self.close(f"outbound queue over {limit} bytes: the agent is not reading")

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
            # Anyone can open connections and stay silent: counted and logged at most once
            # per interval, never an audit record or a log line each.
            self.server.stats.handshake_failures += 1
            self.server.refuse_unauthenticated(
                "handshake_timeout", self.peer,
                f"no handshake within {self.server.config.handshake_timeout:g} s; closed")
            return
        except OversizedFrame as exc:
            self.server.stats.handshake_failures += 1
            self.server.refuse_unauthenticated("handshake_frame", self.peer, str(exc))
            return
        except (ProtocolError, LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            if self.reader.bytes_received == 0:
                # A port probe or health check, not an agent.
                log.info("connection from %s closed before the handshake", self.peer)
            else:  # garbage from anyone who can reach the port: no line each
                self.server.stats.handshake_failures += 1
                self.server.refuse_unauthenticated("handshake_error", self.peer,
                                                   f"handshake failed: {exc}")
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
            # Authenticated: its frames may be full-size, and its slot is free for another.
            self.reader.decoder.max_frame = server.config.max_frame
            if self.slot is not None:
                self.slot.release()
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
                received=session.ledger.received,
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
        cfg = self.server.config
        # Silence counts from the connection's opening: the handshake is no free time.
        keepalive = Keepalive(cfg.ping_interval, cfg.idle_timeout, trio.current_time(),
                              last_heard=self._opened_at,
                              ping_budget=PingBudget(trio.current_time()))
        ledger = session.ledger
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, session, keepalive)
            try:
                async for msg in self.reader:
                    now = trio.current_time()
                    keepalive.heard(now)
                    if isinstance(msg, Ping):
                        self.writer.send(keepalive.on_ping(msg, now))
                        continue
                    if isinstance(msg, Pong):
                        rtt = keepalive.on_pong(msg.nonce, now)
                        if rtt is not None:
                            session.last_rtt = rtt
                        continue
                    session.receive(msg)
                    ack = ledger.ack_due()
                    if ack is not None:
                        self.writer.send(ack)
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

    async def _keepalive(self, session: AgentSession, keepalive: Keepalive) -> None:
        cfg = self.server.config
        while True:
            await trio.sleep_until(keepalive.next_tick)
            ping = keepalive.tick(trio.current_time())
            if isinstance(ping, Expired):
                self.close(f"no frame for {cfg.idle_timeout:.0f} s (keepalive timeout)")
                self.server.audit_limit("idle_timeout", session.agent, self.peer,
                                        f"no frame for {cfg.idle_timeout:.0f} s")
                return
            if ping is None:
                continue
            try:
                ack = session.ledger.ack()
                if ack is not None:
                    self.writer.send(ack)
                self.writer.send(ping)
            except LinkClosed:
                return
