"""One authenticated agent link on the server: handshake, reader, writer, requests."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from carapace.protocol.errors import ProtocolError
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

from .framelink import FrameReader, FrameWriter, LinkClosed
from .streams import ServerStream

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("carapace.server")


class AgentSession:
    """A live link to one agent. Owns the socket's writer task and the requests on it."""

    def __init__(self, server: Server, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.agent = "?"
        self.version = 0
        self.session_id = b""
        self.connected_at = time.time()
        self.writer = FrameWriter(stream)
        self.reader = FrameReader(stream, server.config.max_frame)
        self.streams: dict[int, ServerStream] = {}
        self.highest_id = 0
        self.last_rtt: float | None = None
        self._ping_sent: dict[int, float] = {}
        self._last_heard = trio.current_time()
        self.cancel_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self.close_reason = ""
        self.nursery: trio.Nursery | None = None

    # -- sending ---------------------------------------------------------------
    def send(self, msg: Message) -> None:
        if self.server.frame_observers:
            self.server.observe(self, "out", msg)
        self.writer.send(msg)
        self.server.stats.frames_out += 1

    # -- lifecycle ---------------------------------------------------------------
    async def run(self) -> None:
        """Handshake, then serve until the link ends. Never raises for peer misbehaviour."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            try:
                with self.cancel_scope:
                    await self._run_link()
            finally:
                for stream in list(self.streams.values()):
                    stream.cancel("link lost")
                self.writer.close()
                # Let queued frames (a Reject, a GoAway) out, but never wait on a dead peer.
                self._writer_scope.deadline = trio.current_time() + 1.0
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()

    async def _write(self) -> None:
        with self._writer_scope:
            try:
                await self.writer.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.writer.closed = True
                self.close_reason = self.close_reason or f"write failed: {exc}"
                self.cancel_scope.cancel()

    async def _run_link(self) -> None:
        try:
            with trio.fail_after(self.server.config.handshake_timeout):
                ok = await self._handshake()
        except trio.TooSlowError:
            log.warning(
                "handshake from %s timed out after %.0f s; closing",
                self.peer,
                self.server.config.handshake_timeout,
            )
            self.server.stats.handshake_failures += 1
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
        if ok:
            try:
                await self._serve()
            finally:
                log.info("agent %s (%s) disconnected: %s", self.agent, self.peer,
                         self.close_reason or "closed")

    async def _handshake(self) -> bool:
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
                return False
            if not isinstance(auth, Auth):
                raise ProtocolError(f"expected auth, got {auth.TYPE}")
            hs.verify(auth)
        except HandshakeError as exc:
            log.warning(
                "handshake from %s (agent %r) failed: %s", self.peer, first.agent[:40], exc
            )
            server.stats.handshake_failures += 1
            self.writer.send(Reject(code=exc.code, message=str(exc)))
            return False
        self.agent = first.agent
        self.version = hs.version
        self.session_id = os.urandom(16)
        self.writer.send(
            Welcome(
                session=self.session_id,
                window=server.config.window,
                max_frame=server.config.max_frame,
                server=server.version,
            )
        )
        server.register(self)
        log.info("agent %s connected from %s (protocol v%d)", self.agent, self.peer, self.version)
        return True

    async def _serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._keepalive)
                try:
                    async for msg in self.reader:
                        self._last_heard = trio.current_time()
                        if self.server.frame_observers:
                            self.server.observe(self, "in", msg)
                        self.server.stats.frames_in += 1
                        self._dispatch(msg)
                    self.close_reason = "agent closed the connection"
                except ProtocolError as exc:
                    self.server.stats.protocol_errors += 1
                    self.close_reason = f"protocol error: {exc}"
                    log.warning("agent %s (%s) broke the protocol: %s; closing its link",
                                self.agent, self.peer, exc)
                except (LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError) as exc:
                    self.close_reason = f"link broken: {exc}"
                nursery.cancel_scope.cancel()
        finally:
            self.server.unregister(self)

    async def _keepalive(self) -> None:
        cfg = self.server.config
        nonce = 0
        while True:
            await trio.sleep(cfg.ping_interval)
            if trio.current_time() - self._last_heard > cfg.idle_timeout:
                self.close_reason = f"no frame for {cfg.idle_timeout:.0f} s (keepalive timeout)"
                self.cancel_scope.cancel()
                return
            nonce += 1
            self._ping_sent[nonce] = trio.current_time()
            if len(self._ping_sent) > 8:
                self._ping_sent.pop(min(self._ping_sent))
            self.send(Ping(nonce=nonce))

    # -- dispatch --------------------------------------------------------------
    def _dispatch(self, msg: Message) -> None:
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
        elif isinstance(msg, Ping):
            self.send(Pong(nonce=msg.nonce))
        elif isinstance(msg, Pong):
            sent = self._ping_sent.pop(msg.nonce, None)
            if sent is not None:
                self.last_rtt = trio.current_time() - sent
        elif isinstance(msg, Ack):
            pass
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
                    stream.send_control(RequestFailed(
                        id=msg.id, status=500, code="internal",
                        message="internal error in the Carapace server (see its log)"))
                except LinkClosed:
                    pass
        finally:
            stream.close_inbox()
            self.streams.pop(msg.id, None)

    def go_away(self, reason: str) -> None:
        try:
            self.send(GoAway(reason=reason))
        except LinkClosed:
            pass

    def close(self) -> None:
        self.cancel_scope.cancel()
