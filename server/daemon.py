"""The daemon: accepts agent links, owns their sessions, reloads, shuts down, handles signals.

What happens to one request is the pipeline's business (``pipeline.py``);
what an operator sees of the running server goes through the narrow view
the operator API and the metrics are given (``view.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio

from carapace.protocol.messages import CliRequest, HttpRequest, Message
from carapace.runtime.accept import serve_listeners
from carapace.runtime.tokens import TokenFileError, load_server_tokens
from carapace.runtime.transports import describe_local, describe_peer, listening, transport_of

from . import policy as policy_mod
from .admission import HandshakeSlots, LogThrottle, Slot
from .approval_gate import ApprovalGate
from .approvals import Approvals
from .audit import AuditError, AuditLog, AuditTrail, utc_timestamp
from .config import ServerConfig
from .link import ServerLink
from .metrics import ServerMetrics
from .operator_api import OperatorApi
from .pipeline import RequestPipeline
from .sandbox import Sandbox, SandboxError, SandboxStatus, server_files
from .session import AgentSession, TooManyAgents
from .shares import FairShares
from .stats import Stats
from .streams import ServerStream
from .upstream import UpstreamClient
from .view import Direction, FrameObserver

log = logging.getLogger("carapace.server")

try:
    SERVER_VERSION = version("carapace")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    SERVER_VERSION = "0+unknown"

def admission_source(peer: str) -> str:
    """What a per-source cap on unauthenticated connections counts against: a TCP peer's
    address, a vsock peer's CID, a unix peer's socket path (every peer of one unix
    socket is on this host, and the socket's mode already says who may connect)."""
    if peer.startswith("unix:"):
        return peer.split(" ", 1)[0]
    return peer.rpartition(":")[0] or peer


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
        secret_resolver: policy_mod.SecretResolver | None = None,
        tls_key_material: Sequence[bytes] = (),
        sandbox: Sandbox | None = None,
    ) -> None:
        """Raises AuditError (the audit log cannot be opened) or SandboxError
        (``settings.sandbox: bwrap`` where bwrap does not work)."""
        if policy.unresolved_refs():
            raise ValueError("the policy's secret references are not resolved (resolve_policy)")
        self.config = config
        self.secret_resolver = secret_resolver or policy_mod.SecretResolver({})
        """Resolves the secret references of each reloaded policy (main.py gives it the
        server's environment and $CREDENTIALS_DIRECTORY)."""
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
        self.tls_key_material = tuple(tls_key_material)
        self.sandbox = sandbox if sandbox is not None else Sandbox(server_files(
            config.policy_file, config.token_file, tls_key=config.tls_key,
            debug_token_file=config.debug_token_file, audit_log=config.audit_log))
        self.sandbox.configure(policy.settings.sandbox)
        self.metrics = ServerMetrics(self)
        self.http_client = UpstreamClient()
        self.shares = FairShares(config.shares)
        self.metrics.watch_shares(self.shares)
        self.approvals = Approvals(max_pending=config.max_pending_approvals)
        self.approval_gate = ApprovalGate(self.approvals, self.audit, self.metrics,
                                          self.secrets, config.approval_notify)
        self.pipeline = RequestPipeline(audit=self.audit, metrics=self.metrics,
                                        stats=self.stats, http_client=self.http_client,
                                        limits=config.parse_limits,
                                        sandbox=self.sandbox,
                                        shares=self.shares,
                                        gate=self.approval_gate,
                                        mcp_max_message_bytes=config.mcp_max_message_bytes,
                                        mcp_max_pending=config.mcp_max_pending)
        self._hold_secrets()
        self.on_reload: Callable[[bool, str], None] | None = None
        """Called after each reload attempt with (accepted, message); main.py reports it."""
        self.admission = HandshakeSlots(config.max_unauthenticated,
                                        config.max_unauthenticated_per_address)
        """Slots of connections that have not authenticated yet."""
        self._refusals_log = LogThrottle()

    # -- what the operator API and the metrics read (view.OperatorView) ---------------
    @property
    def mcp_observers(self) -> list[Callable[[dict[str, Any]], None]]:
        return self.pipeline.mcp_observers

    def secrets(self) -> list[bytes]:
        """Every secret the server holds that a frame summary must never show."""
        return [*self.held_secrets(), *self.policy.secrets()]

    def held_secrets(self) -> list[bytes]:
        """The server's own secrets: every agent's token, the debug token, TLS key material."""
        own = [*self.tokens.values(), *self.tls_key_material]
        if self.debug_token:
            own.append(self.debug_token)
        return own

    def _hold_secrets(self) -> None:
        """Mask the server's own secrets in everything sent to a VM and in the audit trail."""
        held = self.held_secrets()
        self.pipeline.held_secrets = tuple(held)
        self.audit.add_secrets(held)

    @property
    def sandbox_status(self) -> SandboxStatus:
        """How CLI tools are confined now (health and metrics show it)."""
        return self.sandbox.status

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

    def _admit_connection(self, stream: trio.SocketStream
                          ) -> Callable[[], Awaitable[None]]:
        """Counted and given a slot (or not) at once, in the order connections were
        accepted, however many are taken in one turn; then served in a task."""
        peer = describe_peer(stream.socket)
        self.stats.connections += 1
        self.stats.count_transport(transport_of(stream.socket))
        slot = self.admission.admit(admission_source(peer))
        return functools.partial(self._handle_connection, stream, peer, slot)

    async def _handle_connection(self, stream: trio.SocketStream, peer: str,
                                 slot: Slot | str) -> None:
        if isinstance(slot, str):
            await self._turn_away(stream, peer, slot)
            return
        link_stream: trio.abc.Stream = stream
        if self.ssl_context is not None:
            # The TLS handshake runs on first use, inside the link's handshake timeout.
            link_stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        try:
            await ServerLink(self, link_stream, peer, slot).run()
        finally:
            slot.release()

    async def _turn_away(self, stream: trio.SocketStream, peer: str, reason: str) -> None:
        """Close a connection over an unauthenticated-connection cap.

        Without a ``reject``: an agent takes a reject as final and gives up the
        session it was resuming, but retries a closed connection (and resumes).
        """
        cfg = self.config
        cap = (f"{cfg.max_unauthenticated} connections in their handshake"
               " (--max-unauthenticated)" if reason == "total" else
               f"{cfg.max_unauthenticated_per_address} connections in their handshake from "
               "this address (--max-unauthenticated-per-address)")
        self.refuse_unauthenticated(reason, peer, f"already {cap}")
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()

    def refuse_unauthenticated(self, reason: str, peer: str, detail: str) -> None:
        """Count a connection closed before its handshake for a cap; log at most one line
        per interval however many there are (a flood must not flood the log)."""
        refused = self.stats.unauthenticated_refused
        refused[reason] = refused.get(reason, 0) + 1
        skipped = self._refusals_log.allow(trio.current_time())
        if skipped is not None:
            log.warning("closing unauthenticated connections: %s from %s: %s (%d more "
                        "closed since the last such line; totals: %s)", reason, peer, detail,
                        skipped, refused)

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
        the server keeps serving, and the error is logged. Open requests are
        judged again under the new policy: those it denies are ended at once,
        the rest finish under the policy they began with (``revocation.py``).
        An agent whose token was removed or changed has its live session
        ended at once, so a revoked VM is cut off now, not at its next
        reconnect; its next handshake is refused. The audit log is reopened
        (for an external logrotate).
        """
        try:
            new, tokens = self.read_files()
        except (policy_mod.PolicyError, TokenFileError) as exc:
            return self.reload_rejected(exc)
        return self.apply_reload(new, tokens)

    async def reload_in_thread(self) -> bool:
        """:meth:`reload`, with the files read and secrets resolved in a worker thread:
        a ``{command:}`` reference may take seconds, and streams must not wait for it."""
        try:
            new, tokens = await trio.to_thread.run_sync(self.read_files)
        except (policy_mod.PolicyError, TokenFileError) as exc:
            return self.reload_rejected(exc)
        return self.apply_reload(new, tokens)

    def read_files(self) -> tuple[policy_mod.Policy, dict[str, bytes]]:
        """The new policy, its secret references resolved, and the new tokens."""
        loaded = policy_mod.load_policy_file(self.config.policy_file)
        new = policy_mod.resolve_policy(loaded, self.secret_resolver, self.secrets())
        tokens = load_server_tokens(self.config.token_file) if self.config.token_file \
            else self.tokens
        return new, tokens

    def reload_rejected(self, exc: Exception) -> bool:
        if isinstance(exc, policy_mod.UnresolvedSecret):
            self.metrics.secret_ref_failures.labels(exc.ref.kind).inc()
        message = f"reload rejected, the previous policy and tokens stay in force: {exc}"
        log.error("%s", message)
        if self.on_reload is not None:
            self.on_reload(False, message)
        return False

    def apply_reload(self, new: policy_mod.Policy, tokens: dict[str, bytes]) -> bool:
        """Put a read, valid policy and token set in force (see :meth:`reload`)."""
        if new.settings.sandbox != self.policy.settings.sandbox:
            try:  # a policy asking for bwrap where it does not work is refused whole
                self.sandbox.configure(new.settings.sandbox)
            except SandboxError as exc:
                return self.reload_rejected(exc)
        revoked = sorted(name for name, token in self.tokens.items()
                         if tokens.get(name) != token)
        self.audit.add_secrets(new.secrets())
        self.audit.add_secrets(tokens.values())
        self.policy = new
        self.tokens = tokens
        self._hold_secrets()
        policy_mod.prune_rate_limits(self.pipeline.rate_limiter, new, tokens)
        for name in revoked:
            session = self.sessions.get(name)
            if session is not None:
                log.warning("token of agent %s was revoked or changed: ending its session", name)
                session.end("token revoked")
        self._revoke_open_requests(new)
        self.audit.reopen()
        forgotten = self.approvals.clear_grants()
        if forgotten:
            log.info("reload: %d remembered approval(s) forgotten", forgotten)
        message = (f"reloaded policy {self.config.policy_file} ({len(new.tools)} tools) and "
                   f"{len(tokens)} agent token(s)"
                   + (f"; revoked: {', '.join(revoked)}" if revoked else ""))
        log.info("%s", message)
        if self.on_reload is not None:
            self.on_reload(True, message)
        return True

    def _revoke_open_requests(self, policy: policy_mod.Policy) -> None:
        """A reload reaches what is already open: end the requests ``policy`` denies.

        In a task of its own, since judging a large request again waits for a
        worker thread; the cheap ones are ended as soon as the task first runs.
        """
        if self._nursery is not None:
            self._nursery.start_soon(self._revoke, policy)

    async def _revoke(self, policy: policy_mod.Policy) -> None:
        try:
            count = await self.pipeline.revoke_denied(policy, lambda: self.policy)
        except Exception:  # never take the server down over it; the requests run on
            log.exception("could not judge the open requests again after a reload")
            return
        if count:
            log.info("reload: ended %d open request(s) that the new policy denies", count)

    async def run(self, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
                  = trio.TASK_STATUS_IGNORED) -> None:
        async with self.http_client, listening(
            self.config.listen, unix_mode=self.config.unix_socket_mode
        ) as listeners, trio.open_nursery() as nursery:
            self.listeners = listeners
            self._nursery = nursery
            self.approval_gate.nursery = nursery
            nursery.start_soon(self._accept, self.listeners)
            for listener in self.listeners:
                log.info("carapace-server %s listening on %s", self.version,
                         describe_local(listener.socket))
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
            # In batches: after a restart every agent dials at once (runtime/accept.py).
            assert self._nursery is not None
            await serve_listeners(self._admit_connection, listeners,
                                  handler_nursery=self._nursery)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading the policy and tokens")
                    await self.reload_in_thread()
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
        failed = self.approvals.fail_all("the Carapace server is shutting down before anyone "
                                         "answered; retry once it is back")
        if failed:
            log.info("shutting down: %d pending approval(s) failed", failed)
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
        hits = self.stats.limit_hits
        hits[limit] = hits.get(limit, 0) + 1
        try:
            self.audit.emit({"ts": utc_timestamp(), "event": "limit", "limit": limit,
                             "agent": agent, "peer": peer, "detail": detail})
        except AuditError as exc:
            log.error("audit: cannot record a %s limit: %s", limit, exc)

    def request_finished(self) -> None:
        self.stream_done.set()
        self.stream_done = trio.Event()
