"""The host-side server: accepts agent links and decides, runs and audits their requests."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import trio

from carapace.protocol.flow import DEFAULT_WINDOW
from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.protocol.messages import CliRequest, HttpRequest, Message

from . import policy as policy_mod
from .audit import (
    DEFAULT_BACKUPS,
    DEFAULT_DENY_LIMIT,
    DEFAULT_MAX_BYTES,
    AuditEntry,
    AuditError,
    AuditLog,
    AuditTrail,
    ResponseTap,
    utc_timestamp,
)
from .debug_listener import serve_debug
from .exec import ExitInfo, run_cli
from .http_dispatch import forward_http, make_client
from .masking import policy_scrubber
from .metrics import ServerMetrics
from .ratelimit import RateLimiter, apply_rate_limits
from .session import AgentSession, ServerLink, TooManyAgents
from .streams import ServerStream
from .tokens import TokenFileError, load_server_tokens
from .upstream_client import UpstreamClient

log = logging.getLogger("carapace.server")

try:
    SERVER_VERSION = version("carapace")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    SERVER_VERSION = "0+unknown"

Direction = Literal["in", "out"]
FrameObserver = Callable[[AgentSession, Direction, Message], None]


@dataclass
class ServerConfig:
    """Everything the server needs, parsed once at the edge (see main.py)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8765
    policy_file: str = "/etc/carapace/policy.yaml"
    token_file: str = ""
    debug_host: str | None = None
    debug_port: int | None = None
    audit_log: str | None = None
    handshake_timeout: float = 5.0
    ping_interval: float = 5.0
    idle_timeout: float = 15.0
    window: int = DEFAULT_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_requests_per_agent: int = 10_000
    max_agents: int = 64
    drain_timeout: float = 10.0
    resume_grace: float = 30.0
    replay_limit: int = 64 * 1024 * 1024
    audit_max_bytes: int = DEFAULT_MAX_BYTES
    audit_backups: int = DEFAULT_BACKUPS
    audit_fsync: bool = False
    audit_deny_limit: tuple[int, float] = DEFAULT_DENY_LIMIT


@dataclass
class Stats:
    """Real counters, read by health, connections and /metrics."""

    started: float = field(default_factory=time.time)
    connections: int = 0
    handshake_failures: int = 0
    protocol_errors: int = 0
    frames_in: int = 0
    frames_out: int = 0
    unknown_id_frames: int = 0
    errors: int = 0
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    sse_events: int = 0

    def count_request(self, kind: str, decision: str) -> None:
        key = (kind, decision)
        self.requests[key] = self.requests.get(key, 0) + 1


class Server:
    def __init__(
        self,
        config: ServerConfig,
        policy: policy_mod.Policy,
        tokens: dict[str, bytes],
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
        self.http_client: UpstreamClient | None = None
        self.listeners: list[trio.SocketListener] = []
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.stream_done = trio.Event()
        # Audit and rate limits (issue 4). The AuditLog opens the file now, so a bad
        # --audit-log path stops the server before it serves anything (AuditError).
        self.audit = AuditTrail(AuditLog(
            config.audit_log, max_bytes=config.audit_max_bytes, backups=config.audit_backups,
            fsync=config.audit_fsync) if config.audit_log else None,
            deny_limit=config.audit_deny_limit)
        self.audit.add_secrets(policy.secrets())
        self.audit.add_secrets(tokens.values())
        self.rate_limiter = RateLimiter()
        self.clock: Callable[[], float] = time.monotonic
        self.on_reload: Callable[[bool, str], None] | None = None
        """Called after each reload attempt with (accepted, message); main.py reports it."""

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
        session = AgentSession(self, agent, version)
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
        policy = self.policy  # a request finishes under the policy it began with
        if isinstance(msg, HttpRequest):
            await self._handle_http(session, stream, msg, policy)
        else:
            await self._handle_cli(session, stream, msg, policy)

    async def _handle_http(
        self,
        session: AgentSession,
        stream: ServerStream,
        req: HttpRequest,
        policy: policy_mod.Policy,
    ) -> None:
        decision = policy_mod.decide_http(
            policy, session.agent, req.tool, req.method, req.target, list(req.headers), req.body
        )
        decision = apply_rate_limits(self.rate_limiter, decision, policy, session.agent,
                                     req.tool, self.clock())
        self.stats.count_request("http", "allow" if decision.allow else "deny")
        self.metrics.count_request("http", decision.allow, session.agent, req.tool)
        entry = self.audit.http(session.agent, session.session_id, req, policy, decision)
        if not await self._audited(entry, stream, req.id):
            return
        if not decision.allow:
            log.info("denied http %s %s on tool %s for agent %s (%s): %s", req.method,
                     req.target[:200], req.tool, session.agent, entry.request_id,
                     decision.reason)
            self._deny(stream, req.id, decision, session.agent, req.tool)
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.HttpTool)
        headers = policy_mod.prepare_http_headers(tool, list(req.headers))
        assert self.http_client is not None
        tap = ResponseTap(stream)
        events = 0
        aborted: str | None = "cancelled"  # unless forward_http returns or raises
        try:
            events = await forward_http(self.http_client, stream, req, req.tool, tool, headers,
                                        scrubber=policy_scrubber(policy))
            aborted = None
            self.stats.sse_events += events
        except Exception:
            aborted = "error"
            raise
        finally:
            entry.completed_http(tap, len(req.body), max(events, tap.events), aborted,
                                 stream.cancel_reason)

    async def _audited(self, entry: AuditEntry, stream: ServerStream, rid: int) -> bool:
        """Write the decision record before anything runs; if that fails, refuse (fail closed)."""
        try:
            await entry.decided()
        except AuditError as exc:
            log.error("refusing request %s: %s", entry.request_id, exc)
            stream.fail(503, "audit_unavailable",
                        "the Carapace server cannot write its audit trail, so nothing was run; "
                        "its operator must check the server log")
            return False
        return True

    @staticmethod
    def _deny(stream: ServerStream, rid: int, decision: policy_mod.Decision, agent: str,
              tool: str) -> None:
        """Tell the VM no: unknown and not-granted tools look alike (policy.vm_denial)."""
        status, code, message = policy_mod.vm_denial(decision, agent, tool)
        stream.fail(status, code, message, decision.retry_after)

    async def _handle_cli(
        self,
        session: AgentSession,
        stream: ServerStream,
        req: CliRequest,
        policy: policy_mod.Policy,
    ) -> None:
        """Decide under ``policy``, then run the tool with its output streamed (server/exec.py)."""
        cli_decision = policy_mod.decide_cli(
            policy, session.agent, req.tool, list(req.argv), req.cwd, list(req.env)
        )
        decision = apply_rate_limits(self.rate_limiter, cli_decision, policy, session.agent,
                                     req.tool, self.clock())
        self.stats.count_request("cli", "allow" if decision.allow else "deny")
        self.metrics.count_request("cli", decision.allow, session.agent, req.tool)
        entry = self.audit.cli(session.agent, session.session_id, req, policy, decision)
        if not await self._audited(entry, stream, req.id):
            return
        if not decision.allow:
            log.info("denied cli tool %s for agent %s (peer uid %s pid %s, %s): %s", req.tool,
                     session.agent, req.peer_uid, req.peer_pid, entry.request_id,
                     decision.reason)
            self._deny(stream, req.id, decision, session.agent, req.tool)
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.CliTool)
        # ``info`` is filled in place, also when the run is cancelled.
        info = ExitInfo()
        try:
            await run_cli(stream, req, cli_decision, tool, info=info,
                          filters=policy_scrubber(policy).output_filters())
        finally:
            entry.completed_cli(info)

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
        async with make_client() as client, trio.open_nursery() as nursery:
            self.http_client = client
            self.metrics = ServerMetrics(self)
            self.listeners = await trio.open_tcp_listeners(
                self.config.listen_port, host=self.config.listen_host
            )
            self._nursery = nursery
            nursery.start_soon(self._accept, self.listeners)
            for listener in self.listeners:
                host, port = listener.socket.getsockname()[:2]
                log.info("carapace-server %s listening on %s:%d", self.version, host, port)
            if self.config.debug_host is not None:
                await nursery.start(serve_debug, self)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            if self.audit.log is not None and self.audit.deny_throttle.max_records:
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
