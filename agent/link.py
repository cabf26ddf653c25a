"""The agent's tunnel link: dial, authenticate, keep alive, reconnect forever."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake, HandshakeError
from carapace.protocol.messages import (
    Challenge,
    GoAway,
    Message,
    Ping,
    Pong,
    Reject,
    RequestMessage,
    Welcome,
)
from carapace.server.framelink import FrameReader, FrameWriter, LinkClosed

from .multiplexer import LinkDown, Multiplexer

log = logging.getLogger("carapace.agent")


@dataclass
class LinkConfig:
    server_host: str
    server_port: int
    agent: str
    token: bytes
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    ping_interval: float = 5.0
    idle_timeout: float = 15.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    max_frame: int = 16 * 1024 * 1024


class ActiveLink:
    """One authenticated connection; what the multiplexer sends through."""

    def __init__(self, writer: FrameWriter, window: int) -> None:
        self.writer = writer
        self.window = window
        self.accepting = True

    def send(self, msg: Message) -> None:
        try:
            self.writer.send(msg)
        except LinkClosed:
            raise LinkDown("the tunnel link is closing") from None


class TunnelClient:
    def __init__(self, config: LinkConfig, mux: Multiplexer) -> None:
        self.config = config
        self.mux = mux
        self.connected = trio.Event()
        self.sessions = 0
        self.last_rtt: float | None = None

    async def run(self) -> None:
        """Connect, serve, and on any failure reconnect with backoff and jitter, forever."""
        cfg = self.config
        delay = cfg.backoff_initial
        while True:
            reason = await self._connect_once()
            if self.mux.link is not None or reason is None:
                reason = reason or "link closed"
            self.mux.link_down(f"tunnel to the Carapace server is down ({reason})")
            if self._session_ok:
                delay = cfg.backoff_initial
            sleep = delay * random.uniform(0.5, 1.0)
            log.info("reconnecting to %s:%d in %.1f s", cfg.server_host, cfg.server_port, sleep)
            await trio.sleep(sleep)
            delay = min(delay * 2, cfg.backoff_max)

    async def _connect_once(self) -> str | None:
        cfg = self.config
        self._session_ok = False
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await trio.open_tcp_stream(cfg.server_host, cfg.server_port)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"cannot connect to {cfg.server_host}:{cfg.server_port}: {_why(exc)}"
            log.warning("%s", reason)
            return reason
        async with stream:
            writer = FrameWriter(stream)
            reader = FrameReader(stream, cfg.max_frame)
            result: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, writer, nursery.cancel_scope, result)
                try:
                    reason = await self._session(stream, reader, writer, nursery)
                except (ProtocolError, LinkClosed, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError) as exc:
                    reason = _why(exc)
                    log.warning("tunnel link lost: %s", reason)
                result.append(reason)
                writer.close()
                nursery.cancel_scope.deadline = trio.current_time() + 1.0
            return result[0] if result else "link closed"

    async def _write(self, writer: FrameWriter, scope: trio.CancelScope,
                     result: list[str]) -> None:
        try:
            await writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            writer.closed = True
            result.append(f"write failed: {_why(exc)}")
            scope.cancel()

    async def _session(self, stream: trio.SocketStream, reader: FrameReader,
                       writer: FrameWriter, nursery: trio.Nursery) -> str:
        cfg = self.config
        hs = AgentHandshake(cfg.agent, cfg.token, os.urandom(NONCE_SIZE))
        try:
            with trio.fail_after(cfg.handshake_timeout):
                writer.send(hs.hello())
                challenge = await reader.receive()
                if isinstance(challenge, Reject):
                    return self._rejected(challenge)
                if not isinstance(challenge, Challenge):
                    raise ProtocolError(f"expected challenge, got {challenge.TYPE}")
                try:
                    writer.send(hs.on_challenge(challenge))
                except HandshakeError as exc:
                    log.error("%s", exc)
                    writer.send(Reject(code=exc.code, message="server proof did not verify"))
                    return str(exc)
                welcome = await reader.receive()
                if isinstance(welcome, Reject):
                    return self._rejected(welcome)
                if not isinstance(welcome, Welcome):
                    raise ProtocolError(f"expected welcome, got {welcome.TYPE}")
        except trio.TooSlowError:
            log.warning("handshake with the server timed out after %.0f s", cfg.handshake_timeout)
            return "handshake timed out"
        self._session_ok = True
        self.sessions += 1
        link = ActiveLink(writer, welcome.window)
        log.info("connected to carapace-server %s at %s:%d as agent %s (protocol v%d)",
                 welcome.server, cfg.server_host, cfg.server_port, cfg.agent, hs.version)
        self.mux.link_up(link)
        self.connected.set()
        state = {"last_heard": trio.current_time()}
        nursery.start_soon(self._keepalive, writer, state, nursery.cancel_scope)
        async for msg in reader:
            state["last_heard"] = trio.current_time()
            if isinstance(msg, RequestMessage):
                self.mux.dispatch(msg)
            elif isinstance(msg, Ping):
                writer.send(Pong(nonce=msg.nonce))
            elif isinstance(msg, Pong):
                sent = state.get(f"ping{msg.nonce}")
                if sent is not None:
                    self.last_rtt = trio.current_time() - sent
            elif isinstance(msg, GoAway):
                log.info("server is going away: %s", msg.reason)
                link.accepting = False
            elif msg.TYPE == "ack":
                pass
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} from the server")
        return "server closed the connection"

    def _rejected(self, msg: Reject) -> str:
        log.error("server refused this agent (%s): %s", msg.code, msg.message)
        return f"server refused the handshake: {msg.message}"

    async def _keepalive(self, writer: FrameWriter, state: dict[str, float],
                         scope: trio.CancelScope) -> None:
        cfg = self.config
        nonce = 0
        while True:
            await trio.sleep(cfg.ping_interval)
            if trio.current_time() - state["last_heard"] > cfg.idle_timeout:
                log.warning("no frame from the server for %.0f s; dropping the link",
                            cfg.idle_timeout)
                scope.cancel()
                return
            nonce += 1
            state[f"ping{nonce}"] = trio.current_time()
            state.pop(f"ping{nonce - 8}", None)
            writer.send(Ping(nonce=nonce))


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
