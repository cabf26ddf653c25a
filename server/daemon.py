"""The daemon: accepts agent links, owns their sessions, reloads, shuts down, handles signals.

What happens to one request is the pipeline's business (``pipeline.py``);
what an operator sees of the running server goes through the narrow view
the operator API and the metrics are given (``view.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio

from carapace.protocol.messages import CliRequest, HttpRequest, Message
from carapace.runtime.tokens import TokenFileError, load_server_tokens

from . import policy as policy_mod
from .audit import AuditError, AuditLog, AuditTrail, utc_timestamp
from .config import ServerConfig
from .link import ServerLink
from .metrics import ServerMetrics
from .operator_api import OperatorApi
from .pipeline import RequestPipeline
from .session import AgentSession, TooManyAgents
from .stats import Stats
from .streams import ServerStream
from .upstream import UpstreamClient
from .view import Direction, FrameObserver

log = logging.getLogger("carapace.server")

try:
    SERVER_VERSION = version("carapace")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    SERVER_VERSION = "0+unknown"

class Server:
    """One running server: its links, its agents' sessions, its policy and tokens."""

    def __init__(
        self,
        config: ServerConfig,
        policy: policy_mod.Policy,
        tokens: dict[str, bytes],
        *,
        debug_token: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.tokens = tokens
        self.version = SERVER_VERSION
        self.decoy_key = os.urandom(32)
        self.sessions: dict[str, AgentSession] = {}
        self.stats = Stats()
        self.frame_observers: list[FrameObserver] = []
        self.draining = False
        self.listeners: list[trio.SocketListener] = []
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.ssl_context = ssl_context
        self.debug_token = debug_token
        self.stream_done = trio.Event()
        # The AuditLog opens the file now, so a bad --audit-log path stops the server
        # before it serves anything (AuditError).
        self.audit = AuditTrail(AuditLog(
            config.audit_log, max_bytes=config.audit_max_bytes, backups=config.audit_backups,
            fsync=config.audit_fsync) if config.audit_log else None,
            deny_limit=config.audit_deny_limit, deny_bytes=config.audit_deny_bytes,
            max_record_bytes=config.audit_max_record_bytes)
        self.audit.add_secrets(policy.secrets())
        self.audit.add_secrets(tokens.values())
        self.metrics = ServerMetrics(self)
        self.http_client = UpstreamClient()
        self.pipeline = RequestPipeline(audit=self.audit, metrics=self.metrics,
                                        stats=self.stats, http_client=self.http_client,
                                        limits=config.parse_limits,
                                        mcp_max_message_bytes=config.mcp_max_message_bytes,
                                        mcp_max_pending=config.mcp_max_pending)
        self.on_reload: Callable[[bool, str], None] | None = None
        """Called after each reload attempt with (accepted, message); main.py reports it."""

    # -- what the operator API and the metrics read (view.OperatorView) ---------------
    @property
    def mcp_observers(self) -> list[Callable[[dict[str, Any]], None]]:
        return self.pipeline.mcp_observers

    def secrets(self) -> list[bytes]:
        """Every secret the server holds that a frame summary must never show."""
        return [*self.tokens.values(), *self.policy.secrets()]

    @property
    def denials_suppressed(self) -> int:
        return self.audit.deny_throttle.suppressed_total

    def audit_counts(self) -> dict[str, int]:
        return {"records_truncated": self.audit.truncated_records,
                "denials_suppressed": self.audit.deny_throttle.suppressed_total,
                "denied_bytes_suppressed": self.audit.deny_throttle.suppressed_bytes}

    # -- sessions ---------------------------------------------------------------
    def resumable(self, agent: str, session_id: bytes | None,
                  received: int) -> AgentSession | None:
        """The agent's live session, if the one it asks to resume is still here."""
        session = self.sessions.get(agent)
        if session is None or session_id is None or session.ended:
            return None
        if session.session_id != session_id:
            return None
        if not session.replay.acked <= received <= session.replay.sent:
            log.warning("agent %s asked to resume from frame %d, outside %d..%d; "
                        "starting a new session", agent, received, session.replay.acked,
                        session.replay.sent)
            return None
        return session

    async def new_session(self, agent: str, version: int) -> AgentSession:
        old = self.sessions.get(agent)
        if old is None and len(self.sessions) >= self.config.max_agents:
            raise TooManyAgents(
                f"{len(self.sessions)} agents already have sessions (--max-agents); "
                "try again later or raise the limit"
            )
        if old is not None:
            log.warning("agent %s started a new session; ending its old one", agent)
            old.end("the agent started a new session")
        session = AgentSession(self, agent, version, on_events=self.metrics.count_events)
        self.sessions[agent] = session
        assert self._nursery is not None
        await self._nursery.start(session.run)
        return session

    def unregister(self, session: AgentSession) -> None:
        if self.sessions.get(session.agent) is session:
            del self.sessions[session.agent]

    def observe(self, session: AgentSession, direction: Direction, msg: Message) -> None:
        for observer in list(self.frame_observers):
            observer(session, direction, msg)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        self.stats.connections += 1
        link_stream: trio.abc.Stream = stream
        if self.ssl_context is not None:
            # The TLS handshake runs on first use, inside the link's handshake timeout.
            link_stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        await ServerLink(self, link_stream, peer).run()

    # -- requests ---------------------------------------------------------------
    async def handle_request(
        self, session: AgentSession, stream: ServerStream, msg: HttpRequest | CliRequest
    ) -> None:
        """Run one request through the pipeline, under the policy in force now."""
        await self.pipeline.handle(session.agent, session.session_id, stream, msg, self.policy)

    # -- running ------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the policy and the token file (SIGHUP, ``carapace-server reload``).

        All or nothing: if either file is invalid, both old ones stay in force,
        the server keeps serving, and the error is logged. Requests in flight
        finish under the policy they began with (handle_request took it).
        An agent whose token was removed or changed has its live session
        ended at once, so a revoked VM is cut off now, not at its next
        reconnect; its next handshake is refused. The audit log is reopened
        (for an external logrotate).
        """
        try:
            new = policy_mod.load_policy_file(self.config.policy_file)
            tokens = load_server_tokens(self.config.token_file) if self.config.token_file \
                else self.tokens
        except (policy_mod.PolicyError, TokenFileError) as exc:
            message = f"reload rejected, the previous policy and tokens stay in force: {exc}"
            log.error("%s", message)
            if self.on_reload is not None:
                self.on_reload(False, message)
            return False
        revoked = sorted(name for name, token in self.tokens.items()
                         if tokens.get(name) != token)
        self.audit.add_secrets(new.secrets())
        self.audit.add_secrets(tokens.values())
        self.policy = new
        self.tokens = tokens
        for name in revoked:
            session = self.sessions.get(name)
            if session is not None:
                log.warning("token of agent %s was revoked or changed: ending its session", name)
                session.end("token revoked")
        self.audit.reopen()
        message = (f"reloaded policy {self.config.policy_file} ({len(new.tools)} tools) and "
                   f"{len(tokens)} agent token(s)"
                   + (f"; revoked: {', '.join(revoked)}" if revoked else ""))
        log.info("%s", message)
        if self.on_reload is not None:
            self.on_reload(True, message)
        return True

    async def run(self, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
                  = trio.TASK_STATUS_IGNORED) -> None:
        async with self.http_client, trio.open_nursery() as nursery:
            self.listeners = await trio.open_tcp_listeners(
                self.config.listen_port, host=self.config.listen_host
            )
            self._nursery = nursery
            nursery.start_soon(self._accept, self.listeners)
            for listener in self.listeners:
                host, port = listener.socket.getsockname()[:2]
                log.info("carapace-server %s listening on %s:%d", self.version, host, port)
            if self.config.debug_host is not None:
                api = OperatorApi(self, self.metrics, self.config.debug_host,
                                  self.config.debug_port or 0, self.debug_token)
                await nursery.start(api.serve)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            if self.audit.log is not None and self.audit.deny_throttle.active:
                nursery.start_soon(self._flush_suppressed_denials)
            task_status.started(self.listeners)

    async def _flush_suppressed_denials(self) -> None:
        """Write each agent's denials_suppressed record once its window is over, also
        when the flood has stopped and no later record would carry it."""
        while True:
            await trio.sleep(1.0)
            self.audit.flush_suppressed()

    async def _accept(self, listeners: list[trio.SocketListener]) -> None:
        with self._accept_scope:
            # Links run in the server's nursery, so that stopping the accept loop on
            # shutdown does not cut the links whose requests are draining.
            await trio.serve_listeners(self._handle_connection, listeners,
                                       handler_nursery=self._nursery)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading the policy and tokens")
                    self.reload()
                else:
                    await self.shutdown(scope)
                    return

    async def shutdown(self, scope: trio.CancelScope) -> None:
        """Stop accepting, tell agents, let requests finish up to the drain timeout.

        Event streams never finish by themselves: they end at once, cleanly, so
        that clients reconnect (with Last-Event-ID) to wherever the service comes back.
        """
        open_streams = sum(len(s.streams) for s in self.sessions.values())
        log.info("shutting down: %d agent session(s), %d request(s) in flight; draining for "
                 "up to %.0f s", len(self.sessions), open_streams, self.config.drain_timeout)
        self.draining = True
        self._accept_scope.cancel()
        for session in list(self.sessions.values()):
            session.go_away("server shutting down")
            for stream in list(session.streams.values()):
                if stream.sse:
                    stream.cancel("server shutting down")
        with trio.move_on_after(self.config.drain_timeout) as drain:
            while any(s.streams for s in self.sessions.values()):
                await self.stream_done.wait()
        if drain.cancelled_caught:
            log.warning("drain timeout: cancelling %d unfinished request(s)",
                        sum(len(s.streams) for s in self.sessions.values()))
        links = [s.link for s in self.sessions.values() if s.link is not None]
        for session in list(self.sessions.values()):
            session.end("server shut down")
        # The last answers may still be queued on a link: let each link send them
        # (its writer gets up to 1 s) before everything is cancelled.
        with trio.move_on_after(2.5):
            for link in links:
                await link.done.wait()
        self.on_shutdown()
        scope.cancel()

    def on_shutdown(self) -> None:
        """Last words before exit: the audit trail is flushed and closed."""
        if self.audit.log is not None:
            self.audit.flush_suppressed(everything=True)
            self.audit.log.close()

    def audit_limit(self, limit: str, agent: str, peer: str, detail: str) -> None:
        """Record that a limit was hit: which, by whom, and what was refused."""
        try:
            self.audit.emit({"ts": utc_timestamp(), "event": "limit", "limit": limit,
                             "agent": agent, "peer": peer, "detail": detail})
        except AuditError as exc:
            log.error("audit: cannot record a %s limit: %s", limit, exc)

    def request_finished(self) -> None:
        self.stream_done.set()
        self.stream_done = trio.Event()
