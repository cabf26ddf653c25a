"""The agent's tunnel: dial, authenticate, keep alive, reconnect and resume, forever.

A *session* (:class:`ClientSession`) outlives links. When a link drops, local
requests keep their connections and their streams stay open; the agent
reconnects with the session id and the count of frames it has received, and
both sides resend what the other missed (``protocol/resume.py``). Only if the
server cannot resume (it restarted, its grace expired, it said goodbye, or it
is plainly not running) do the open streams end — cleanly and at once.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
from dataclasses import dataclass

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.protocol.handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    NONCE_SIZE,
    AgentHandshake,
    HandshakeError,
)
from carapace.protocol.keepalive import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    Expired,
    Keepalive,
)
from carapace.protocol.messages import (
    Ack,
    Challenge,
    GoAway,
    Message,
    Ping,
    Pong,
    Reject,
    RequestMessage,
    Welcome,
)
from carapace.protocol.resume import DEFAULT_REPLAY_LIMIT, ReplayOverflow, SessionLedger
from carapace.runtime.addresses import Address, TcpAddress
from carapace.runtime.errors import consists_of
from carapace.runtime.frames import FrameReader, FrameWriter, LinkClosed
from carapace.runtime.transports import open_stream

from .multiplexer import LinkDown, Multiplexer

log = logging.getLogger("carapace.agent")

DEFAULT_RESUME_TIMEOUT = 30.0
"""Seconds open requests wait for a dropped link to come back: the server's default
resume grace, so the agent gives up when the server would."""

DEFAULT_BACKOFF_INITIAL = 0.2
"""Seconds before the first retry after a link drops (times a jitter of 0.5-1):
fast, since most drops are a passing outage or a restart."""
DEFAULT_BACKOFF_MAX = 10.0
"""The longest wait between attempts that failed for a reason that may mean load
(a timeout, a connection closed by a server cap, a TLS failure): doubling up to
this spreads a crowd of agents out instead of hammering a struggling server."""
DEFAULT_BACKOFF_MAX_REFUSED = 2.0
"""The longest wait while the connection is refused: nothing listens, so the server
is restarting (a restart takes a second or two) or is gone. A refused dial costs the
host one SYN and one RST, nothing of the server's; so the agent keeps trying every
1-2 s and is back within about two seconds of the server, not up to ten."""
REPEAT_LOG_INTERVAL = 60.0
"""Seconds between repeats of one identical connection failure in the log."""


@dataclass
class LinkConfig:
    server: Address
    agent: str
    token: bytes
    connect_timeout: float = 5.0
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX
    backoff_max_refused: float = DEFAULT_BACKOFF_MAX_REFUSED
    max_frame: int = DEFAULT_MAX_FRAME
    resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    replay_limit: int = DEFAULT_REPLAY_LIMIT
    ssl_context: ssl.SSLContext | None = None
    tls_server_name: str | None = None


class ClientSession:
    """The agent's side of one server session; what the multiplexer sends through."""

    def __init__(self, session_id: bytes, window: int, replay_limit: int,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.session_id = session_id
        self.window = window
        self.ledger = SessionLedger(replay_limit, max_frame=max_frame, peer="server")
        self.writer: FrameWriter | None = None
        self.accepting = True
        self.broken: str | None = None

    def send(self, msg: Message) -> None:
        """Queue ``msg`` to the server; FrameTooLarge if it could not take it."""
        if self.broken is not None:
            raise LinkDown(self.broken)
        try:
            frame = self.ledger.outgoing(msg)
        except ReplayOverflow as exc:
            self.broken = f"too much unacknowledged data for the server ({exc})"
            raise LinkDown(self.broken) from None
        writer = self.writer
        if writer is not None:
            try:
                writer.send_bytes(frame)
            except LinkClosed:
                pass  # replayed on the next link

    def attach(self, writer: FrameWriter, peer_received: int) -> int:
        """Make ``writer`` current and resend what the server missed; return how many."""
        frames = self.ledger.replay_after(peer_received)
        for frame in frames:
            writer.send_bytes(frame)
        self.writer = writer
        return len(frames)


class _Outcome:
    """How one connection attempt ended, for the reconnect loop."""

    def __init__(self, reason: str, *, resumable: bool = True, refused: bool = False) -> None:
        self.reason = reason
        self.resumable = resumable
        self.refused = refused
        """Nothing listened at the server's address (it restarts, or is gone)."""
        self.quiet = False
        """The failure repeated one logged moments ago: not logged again."""


def next_backoff(delay: float, outcome: _Outcome, config: LinkConfig) -> tuple[float, float]:
    """(seconds to sleep now, the delay after that) for a retry after ``outcome``:
    jittered, doubling, capped lower while nothing listens (see the defaults)."""
    cap = config.backoff_max_refused if outcome.refused else config.backoff_max
    delay = min(delay, cap)
    return delay * random.uniform(0.5, 1.0), min(delay * 2, cap)


class RepeatLog:
    """Logs a failure, then the same failure again at most once per interval (with how
    many attempts met it meanwhile): a server down for an hour costs a few lines."""

    def __init__(self, interval: float = REPEAT_LOG_INTERVAL) -> None:
        self.interval = interval
        self._last = ""
        self._logged_at = float("-inf")
        self._quiet = 0

    def allow(self, reason: str, now: float) -> str | None:
        """The line to log for ``reason`` now, or None to stay quiet (counted)."""
        if reason == self._last and now - self._logged_at < self.interval:
            self._quiet += 1
            return None
        quiet, self._quiet = self._quiet, 0
        repeated = reason == self._last
        self._last, self._logged_at = reason, now
        if repeated and quiet:
            return f"{reason} ({quiet} more attempt(s) failed the same way meanwhile)"
        return reason

    def reset(self) -> None:
        self._last = ""


class TunnelClient:
    def __init__(self, config: LinkConfig, mux: Multiplexer) -> None:
        self.config = config
        self.mux = mux
        self.connected = trio.Event()
        self.sessions = 0
        self.links = 0
        self.last_rtt: float | None = None
        self.session: ClientSession | None = None
        self._suspended_since: float | None = None
        self._session_ok = False
        self._failures = RepeatLog()

    async def run(self) -> None:
        """Connect, serve, and on any failure reconnect with backoff and jitter, forever."""
        cfg = self.config
        delay = cfg.backoff_initial
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_suspended)
            while True:
                outcome = await self._connect_once()
                self._after_link(outcome)
                if self._session_ok:
                    delay = cfg.backoff_initial
                    self._failures.reset()
                sleep, delay = next_backoff(delay, outcome, cfg)
                log.log(logging.DEBUG if outcome.quiet else logging.INFO,
                        "reconnecting to %s in %.1f s", cfg.server.describe(), sleep)
                await trio.sleep(sleep)

    def _after_link(self, outcome: _Outcome) -> None:
        session = self.session
        reason = f"tunnel to the Carapace server is down ({outcome.reason})"
        if session is None:
            self.mux.link_down(reason)
            return
        if not outcome.resumable or session.broken is not None or not session.accepting:
            self._end_session(reason if session.broken is None else session.broken)
            return
        session.writer = None
        if self._suspended_since is None:
            self._suspended_since = trio.current_time()
            log.warning("tunnel link lost (%s); keeping %d open request(s) for up to %.0f s "
                        "while reconnecting", outcome.reason, len(self.mux.streams),
                        self.config.resume_timeout)
        self.mux.link_suspended(reason)

    def _end_session(self, reason: str) -> None:
        if self.mux.streams:
            log.warning("ending %d open request(s): %s", len(self.mux.streams), reason)
        self.session = None
        self._suspended_since = None
        self.mux.link_down(reason)

    async def _expire_suspended(self) -> None:
        while True:
            await trio.sleep(0.25)
            since = self._suspended_since
            if since is not None and trio.current_time() - since > self.config.resume_timeout:
                self._end_session(
                    f"the tunnel was down for more than {self.config.resume_timeout:.0f} s"
                )

    async def _connect_once(self) -> _Outcome:
        cfg = self.config
        self._session_ok = False
        stream: trio.abc.Stream
        try:
            with trio.fail_after(cfg.connect_timeout):
                plain = await open_stream(cfg.server)
                stream = plain
                if cfg.ssl_context is not None:
                    tls = trio.SSLStream(plain, cfg.ssl_context,
                                         server_hostname=cfg.tls_server_name or _host(cfg.server))
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError as exc:
                        await plain.aclose()
                        reason = f"TLS handshake with {cfg.server.describe()} " \
                                 f"failed: {exc.__cause__ or exc}"
                        log.error("%s", reason)
                        return _Outcome(reason)
                    stream = tls
        except (OSError, trio.TooSlowError) as exc:
            reason = f"cannot connect to {cfg.server.describe()}: {_why(exc)}"
            # Refused: nothing listens there, so the server restarted or is gone and
            # no session of ours survives; anything else may be a passing outage.
            refused = _is_refused(exc)
            outcome = _Outcome(reason, resumable=not refused, refused=refused)
            line = self._failures.allow(reason, trio.current_time())
            if line is None:
                outcome.quiet = True
            else:
                log.warning("%s", line)
            return outcome
        self.links += 1
        async with stream:
            writer = FrameWriter(stream)
            reader = FrameReader(stream, cfg.max_frame)
            result: list[_Outcome] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, writer, nursery.cancel_scope, result)
                try:
                    outcome = await self._session(reader, writer, nursery, result)
                except (ProtocolError, LinkClosed, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError) as exc:
                    outcome = _Outcome(_why(exc))
                    if not self._session_ok:
                        if cfg.ssl_context is None:
                            hint = " (does the server expect TLS? then pass --tls-ca)"
                        elif "SSL" in outcome.reason:
                            hint = (" (does the server require a client certificate? then "
                                    "pass --tls-cert and --tls-key)")
                        else:
                            hint = ""
                        log.warning("handshake with the server failed: %s%s", outcome.reason,
                                    hint)
                    else:
                        log.warning("tunnel link lost: %s", outcome.reason)
                result.append(outcome)
                writer.close()
                nursery.cancel_scope.deadline = trio.current_time() + 1.0
            if self.session is not None and self.session.writer is writer:
                self.session.writer = None
            return result[0] if result else _Outcome("link closed")

    async def _write(self, writer: FrameWriter, scope: trio.CancelScope,
                     result: list[_Outcome]) -> None:
        try:
            await writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            writer.closed = True
            result.append(_Outcome(f"write failed: {_why(exc)}"))
            scope.cancel()

    async def _handshake(self, reader: FrameReader, writer: FrameWriter) -> Welcome | _Outcome:
        cfg = self.config
        hs = AgentHandshake(cfg.agent, cfg.token, os.urandom(NONCE_SIZE))
        session = self.session
        try:
            with trio.fail_after(cfg.handshake_timeout):
                writer.send(hs.hello(
                    resume=session.session_id if session is not None else None,
                    received=session.ledger.received if session is not None else 0,
                ))
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
                    return _Outcome(str(exc))
                welcome = await reader.receive()
                if isinstance(welcome, Reject):
                    return self._rejected(welcome)
                if not isinstance(welcome, Welcome):
                    raise ProtocolError(f"expected welcome, got {welcome.TYPE}")
                return welcome
        except trio.TooSlowError:
            log.warning("handshake with the server timed out after %.0f s", cfg.handshake_timeout)
            return _Outcome("handshake timed out")

    async def _session(self, reader: FrameReader, writer: FrameWriter, nursery: trio.Nursery,
                       result: list[_Outcome]) -> _Outcome:
        cfg = self.config
        welcome = await self._handshake(reader, writer)
        if isinstance(welcome, _Outcome):
            return welcome
        self._session_ok = True
        session = self.session
        if session is not None and welcome.resumed and session.broken is None:
            try:
                replayed = session.attach(writer, welcome.received)
            except ValueError as exc:
                raise ProtocolError(f"server resumed at an impossible frame: {exc}") from None
            log.info("resumed the session with the Carapace server at %s (%d frame(s) resent)",
                     cfg.server.describe(), replayed)
        else:
            if session is not None:
                self._end_session("the server could not resume the session (it restarted, or "
                                  "the link was down longer than its resume grace)")
            session = ClientSession(welcome.session, welcome.window, cfg.replay_limit,
                                    welcome.max_frame)
            session.writer = writer
            self.session = session
            self.sessions += 1
            log.info("connected to the Carapace server %s at %s as agent %s",
                     welcome.server, cfg.server.describe(), cfg.agent)
        self._suspended_since = None
        self.mux.link_up(session)
        self.connected.set()
        keepalive = Keepalive(cfg.ping_interval, cfg.idle_timeout, trio.current_time())
        ledger = session.ledger
        nursery.start_soon(self._keepalive, writer, session, keepalive, nursery.cancel_scope,
                           result)
        async for msg in reader:
            now = trio.current_time()
            keepalive.heard(now)
            if isinstance(msg, Ping):
                writer.send(keepalive.on_ping(msg, now))
                continue
            if isinstance(msg, Pong):
                rtt = keepalive.on_pong(msg.nonce, now)
                if rtt is not None:
                    self.last_rtt = rtt
                continue
            ledger.incoming(msg)
            if isinstance(msg, RequestMessage):
                self.mux.dispatch(msg)
            elif isinstance(msg, Ack):
                ledger.on_ack(msg)
            elif isinstance(msg, GoAway):
                log.info("server is going away: %s", msg.reason)
                session.accepting = False
                self.mux.link_suspended(f"the server is shutting down ({msg.reason})")
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} from the server")
            ack = ledger.ack_due()
            if ack is not None:
                writer.send(ack)
        return _Outcome("server closed the connection", resumable=session.accepting)

    def _rejected(self, msg: Reject) -> _Outcome:
        log.error("server refused this agent (%s): %s", msg.code, msg.message)
        return _Outcome(f"server refused the handshake: {msg.message}", resumable=False)

    async def _keepalive(self, writer: FrameWriter, session: ClientSession,
                         keepalive: Keepalive, scope: trio.CancelScope,
                         result: list[_Outcome]) -> None:
        cfg = self.config
        while True:
            await trio.sleep_until(keepalive.next_tick)
            ping = keepalive.tick(trio.current_time())
            if isinstance(ping, Expired):
                log.warning("no frame from the server for %.0f s; dropping the link",
                            cfg.idle_timeout)
                result.append(_Outcome("keepalive timeout"))
                scope.cancel()
                return
            if ping is None:
                continue
            try:
                ack = session.ledger.ack()
                if ack is not None:
                    writer.send(ack)
                writer.send(ping)
            except LinkClosed:
                return


def _is_refused(exc: BaseException | None) -> bool:
    """True if every address we tried refused the connection (trio groups the attempts
    under an OSError's cause), or said what means the same on another transport."""
    while (isinstance(exc, OSError) and not isinstance(exc, _NOBODY_THERE)
           and exc.__cause__ is not None):
        exc = exc.__cause__
    return exc is not None and consists_of(exc, _NOBODY_THERE)


_NOBODY_THERE = (ConnectionRefusedError, FileNotFoundError, ConnectionResetError)
"""What connecting says when nothing listens: TCP refuses; a unix socket's file is
missing (or refuses, when stale); vsock answers a connection to a port nobody
listens on with a reset."""


def _host(address: Address) -> str | None:
    """The name TLS checks in the server certificate by default: a TCP address's host."""
    return address.host if isinstance(address, TcpAddress) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        # trio wraps the real reason (an ssl.SSLError, a reset): name that one.
        return _why(exc.__cause__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and isinstance(exc.__cause__, BaseExceptionGroup):
        return "; ".join(sorted({_why(inner) for inner in exc.__cause__.exceptions}))
    return str(exc) or type(exc).__name__
