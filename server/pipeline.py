"""The request pipeline: decide, limit, audit, [approve], run, complete — for HTTP and CLI alike.

Each step has one place: the policy decides (``policy/``); the rate limits
and the fair shares (``shares.py``: what one agent, and all together, may
hold at once) may turn an allow into a deny; the decision record is written
before anything runs (and the request is refused if it cannot be: the trail
fails closed); a call the policy marks waits for a person
(``approval_gate.py``; a rate-limited or denied call never asks); the
allowed request runs (``upstream/relay.py``, ``cli_runner.py``, or
``mcp/`` for an MCP server); and the completion record says how it ended.
After a reload, a request the new policy still allows finishes as it was
decided and recorded; one it denies is ended at once (``revocation.py``),
also after it waited for a person.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import trio

from carapace.protocol.messages import CliRequest, HttpRequest

from . import policy as policy_mod
from .approval_gate import ApprovalGate
from .audit import AuditEntry, AuditError, AuditTrail
from .audit.records import cli_completion_fields, http_completion_fields
from .cli_runner import ExitInfo, run_cli
from .masking import policy_scrubber, server_scrubber
from .mcp.filter import DEFAULT_MAX_MESSAGE_BYTES, MAX_PENDING
from .mcp.http import forward_mcp_http
from .mcp.session import McpObserver, McpSession, output_filters
from .metrics import ServerMetrics
from .policy import (
    DECIDE_WORKERS,
    DEFAULT_LIMITS,
    ParseLimits,
    RateLimiter,
    apply_rate_limits,
    needs_worker,
)
from .revocation import OpenRequest, decider, end_request, revoke_denied
from .sandbox import Sandbox
from .shares import FairShares, Limit, Refusal, Slot
from .stats import Stats
from .streams import ServerStream
from .upstream import UpstreamClient
from .upstream.relay import forward_http

log = logging.getLogger("carapace.server")

D = TypeVar("D", bound=policy_mod.Decision)


def _on_loop() -> bool:
    """Whether this runs in trio's thread (not in a worker thread)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class RequestPipeline:
    """Takes one agent request from its decision to its completion record."""

    def __init__(self, *, audit: AuditTrail, metrics: ServerMetrics, stats: Stats,
                 http_client: UpstreamClient,
                 clock: Callable[[], float] = time.monotonic,
                 limits: ParseLimits = DEFAULT_LIMITS,
                 sandbox: Sandbox | None = None,
                 shares: FairShares | None = None,
                 gate: ApprovalGate | None = None,
                 mcp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 mcp_max_pending: int = MAX_PENDING) -> None:
        self.audit = audit
        self.gate = gate
        """Holds the calls the policy marks until a person answers (``approval_gate.py``)."""
        self.metrics = metrics
        self.stats = stats
        self.http_client = http_client
        self.rate_limiter = RateLimiter()
        self.clock = clock
        self.limits = limits
        """Server-wide parse limits (the flags); tools may override them in the policy."""
        self.deciders = trio.CapacityLimiter(DECIDE_WORKERS)
        """Worker threads for decisions too large for the event loop (``limits.py``)."""
        self._agent_deciders: dict[str, trio.CapacityLimiter] = {}
        """One large decision per agent at a time, so one agent cannot hold every worker.
        Keyed by authenticated agent name: bounded by the token file."""
        self.sandbox = sandbox
        """How CLI tools are confined (None: not at all)."""
        self.held_secrets: tuple[bytes, ...] = ()
        """The server's own secrets (agent tokens, debug token, TLS key), masked in all
        output besides the policy's; the daemon sets them at start and on reload."""
        self.shares = shares if shares is not None else FairShares()
        self.open: dict[ServerStream, OpenRequest] = {}
        """Every request in the pipeline, for a reload to judge again (``revocation.py``)."""
        self.mcp_max_message_bytes = mcp_max_message_bytes
        self.mcp_max_pending = mcp_max_pending
        self.mcp_observers: list[McpObserver] = []
        """Told of each MCP call (the sniff feed adds itself)."""

    async def handle(self, agent: str, session_id: bytes, stream: ServerStream,
                     msg: HttpRequest | CliRequest, policy: policy_mod.Policy) -> None:
        self.open[stream] = OpenRequest(agent, session_id, stream, msg, policy)
        try:
            if isinstance(msg, HttpRequest):
                await self._handle_http(agent, session_id, stream, msg, policy)
            else:
                await self._handle_cli(agent, session_id, stream, msg, policy)
        finally:
            del self.open[stream]

    def _counted(self, kind: str, decision: policy_mod.Decision, agent: str, tool: str) -> None:
        self.stats.count_request(kind, "allow" if decision.allow else "deny")
        self.metrics.count_request(kind, decision.allow, agent, tool)
        if decision.limit:
            self.metrics.count_parse_limit(decision.limit)

    async def _decide(self, agent: str, decide: Callable[[], D], heavy: bool) -> D:
        """Run a decision: inline if it is small, else in a worker thread.

        A large one (over ``INLINE_DECIDE_BYTES`` to parse) would hold the
        event loop, and every agent with it, for tens of milliseconds; in a
        worker the loop keeps running (the interpreter hands it the GIL at
        least every switch interval, 5 ms). The policy is immutable, so the
        thread may read it while the loop goes on.
        """
        if not heavy:
            return decide()
        own = self._agent_deciders.get(agent)
        if own is None:
            own = self._agent_deciders[agent] = trio.CapacityLimiter(1)
        async with own:
            return await trio.to_thread.run_sync(decide, limiter=self.deciders)

    async def _handle_http(self, agent: str, session_id: bytes, stream: ServerStream,
                           req: HttpRequest, policy: policy_mod.Policy) -> None:
        if isinstance(policy.tools.get(req.tool), policy_mod.McpTool):
            await self._handle_mcp_http(agent, session_id, stream, req, policy)
            return
        decide = partial(policy_mod.decide_http, policy, agent, req.tool, req.method,
                         req.target, list(req.headers), req.body, limits=self.limits)
        heavy = needs_worker(policy.tools.get(req.tool), self.limits, body=req.body)
        decision = await self._decide(agent, decide, heavy)
        decision = apply_rate_limits(self.rate_limiter, decision, policy, agent, req.tool,
                                     self.clock())
        if decision.allow and _asks_for_events(req.headers):
            refusal = self.shares.full("sse_streams", agent)
            if refusal is not None:
                decision = self._refusal_decision(refusal)
        slot, decision = self._share(decision, "upstream_connections", agent, req.tool)
        with slot:
            await self._run_http(agent, session_id, stream, req, policy, decision)

    async def _run_http(self, agent: str, session_id: bytes, stream: ServerStream,
                        req: HttpRequest, policy: policy_mod.Policy,
                        decision: policy_mod.Decision) -> None:
        self._counted("http", decision, agent, req.tool)
        entry = self.audit.http(agent, session_id, req, policy, decision)
        if not await self._admitted(agent, stream, req, policy, decision, entry,
                                    f"http {req.method} {req.target[:200]} on tool"):
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.HttpTool)
        headers = policy_mod.prepare_http_headers(tool, list(req.headers))
        # An upstream never receives the server's own secrets (agent tokens, TLS key), so
        # its answers are scrubbed of them only when the policy injects secrets and every
        # body is scrubbed anyway: otherwise bodies pass as they are (compressed, with
        # their Content-Length), which is the upstream relay's fast path.
        scrubber = policy_scrubber(policy)
        if scrubber.active:
            scrubber = server_scrubber(policy, self.held_secrets)
        aborted: str | None = "cancelled"  # unless forward_http returns or raises
        try:
            await forward_http(self.http_client, stream, req, req.tool, tool, headers,
                               scrubber=scrubber,
                               admit_sse=lambda: self._stream_share(agent, req.tool,
                                                                    entry.request_id))
            aborted = None
        except Exception:
            aborted = "error"
            raise
        finally:
            entry.completed_http(stream.sent, len(req.body), aborted, stream.cancel_reason)

    async def _handle_cli(self, agent: str, session_id: bytes, stream: ServerStream,
                          req: CliRequest, policy: policy_mod.Policy) -> None:
        if isinstance(policy.tools.get(req.tool), policy_mod.McpTool):
            await self._handle_mcp(agent, session_id, stream, req, policy)
            return
        decide = partial(policy_mod.decide_cli, policy, agent, req.tool, list(req.argv),
                         req.cwd, list(req.env), limits=self.limits)
        heavy = needs_worker(policy.tools.get(req.tool), self.limits, argv=req.argv)
        cli_decision = await self._decide(agent, decide, heavy)
        decision = apply_rate_limits(self.rate_limiter, cli_decision, policy, agent, req.tool,
                                     self.clock())
        slot, decision = self._share(decision, "cli_processes", agent, req.tool)
        with slot:
            await self._run_cli(agent, session_id, stream, req, policy, cli_decision, decision)

    async def _run_cli(self, agent: str, session_id: bytes, stream: ServerStream,
                       req: CliRequest, policy: policy_mod.Policy,
                       cli_decision: policy_mod.CliDecision,
                       decision: policy_mod.Decision) -> None:
        self._counted("cli", decision, agent, req.tool)
        entry = self.audit.cli(agent, session_id, req, policy, decision)
        if not await self._admitted(agent, stream, req, policy, decision, entry, "cli tool",
                                    f"VM-claimed peer uid {req.peer_uid} pid {req.peer_pid}, "):
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.CliTool)
        # ``info`` is filled in place, also when the run is cancelled.
        info = ExitInfo()
        try:
            await run_cli(stream, req, cli_decision, tool, info=info,
                          filters=server_scrubber(policy, self.held_secrets).output_filters(),
                          sandbox=self.sandbox)
        finally:
            entry.completed_cli(info)

    def _share(self, decision: policy_mod.Decision, limit: Limit, agent: str,
               tool: str) -> tuple[Slot | contextlib.nullcontext[None], policy_mod.Decision]:
        """Take a slot of ``limit`` for an allowed request, or turn it into a deny.

        The deny goes down the same path as any other (decision record, log
        line, a ``failed`` frame): 429 ``too_many_requests`` at the agent's
        own cap, 503 ``server_busy`` at the host-wide one, with Retry-After.
        """
        if not decision.allow:
            return contextlib.nullcontext(), decision
        taken = self.shares.acquire(limit, agent, tool)
        if isinstance(taken, Slot):
            return taken, decision
        return contextlib.nullcontext(), self._refusal_decision(taken)

    def _refusal_decision(self, refusal: Refusal) -> policy_mod.Decision:
        """A fair-share refusal as a deny: counted, logged, then audited like any deny."""
        self._refused(refusal)
        return policy_mod.Decision(
            allow=False, reason=refusal.reason, rule=refusal.flag, code=refusal.code,
            retry_after=refusal.retry_after)

    def _stream_share(self, agent: str, tool: str, request_id: str) -> Slot | Refusal:
        """A slot for an event stream, asked once the upstream has answered with one."""
        taken = self.shares.acquire("sse_streams", agent, tool)
        if isinstance(taken, Refusal):
            self._refused(taken, request_id)
        return taken

    def _refused(self, refusal: Refusal, request_id: str = "") -> None:
        """Count and log a refusal (the audit trail records its decision or completion)."""
        self.metrics.count_refusal(refusal.limit, refusal.scope, refusal.agent)
        log.warning("refused %s of agent %s: %s",
                    f"request {request_id}" if request_id else "a request", refusal.agent,
                    refusal.reason)

    async def _approved(self, agent: str, stream: ServerStream, req: HttpRequest | CliRequest,
                        decision: policy_mod.Decision, entry: AuditEntry,
                        policy: policy_mod.Policy) -> bool:
        """An allowed call the policy marks waits here for a person (after its decision
        record, so the trail shows the wait); False once the VM has been told no."""
        if self.gate is None or not decision.needs_approval:
            return True
        return await self.gate.admit(agent, stream, req, decision, entry, policy)

    async def _handle_mcp(self, agent: str, session_id: bytes, stream: ServerStream,
                          req: CliRequest, policy: policy_mod.Policy) -> None:
        """An MCP stdio session: a CLI run of the tool's command with the MCP filter on it,
        holding one of the agent's CLI process slots while it runs."""
        session_decision = policy_mod.decide_mcp_session(policy, agent, req.tool,
                                                         list(req.argv))
        slot, decision = self._share(session_decision, "cli_processes", agent, req.tool)
        with slot:
            await self._run_mcp(agent, session_id, stream, req, policy, session_decision,
                                decision)

    async def _run_mcp(self, agent: str, session_id: bytes, stream: ServerStream,
                       req: CliRequest, policy: policy_mod.Policy,
                       session_decision: policy_mod.CliDecision,
                       decision: policy_mod.Decision) -> None:
        self._counted("mcp", decision, agent, req.tool)
        entry = self.audit.cli(agent, session_id, req, policy, decision, kind="mcp")
        if not await self._admitted(agent, stream, req, policy, decision, entry, "mcp tool"):
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.McpTool)
        session = self._mcp_session(tool, agent, req.id, entry, policy)
        info = ExitInfo()
        try:
            # The session lasts as long as its client; timeout_secs bounds each call. Its
            # process is a CLI tool's like any other: confined, and every server secret
            # masked in what it writes.
            await run_cli(stream, req, session_decision, tool, info=info, hook=session.hook,
                          timeout=math.inf, sandbox=self.sandbox,
                          filters=output_filters(server_scrubber(policy, self.held_secrets)))
        finally:
            session.finish()
            entry.completed(**cli_completion_fields(info), mcp_refused=session.refusal)

    def _mcp_session(self, tool: policy_mod.McpTool, agent: str, request_id: int,
                     entry: AuditEntry, policy: policy_mod.Policy) -> McpSession:
        """The filter and records of one MCP session (stdio) or HTTP request (url)."""
        def limit(allowed: policy_mod.Decision) -> policy_mod.Decision:
            """The rate limits on one MCP call, on the event loop even from a worker."""
            def apply() -> policy_mod.Decision:
                return apply_rate_limits(self.rate_limiter, allowed, policy, agent, tool.name,
                                         self.clock())
            return apply() if _on_loop() else trio.from_thread.run_sync(apply)

        return McpSession(
            tool, agent, request_id, entry, audit=self.audit, metrics=self.metrics,
            observers=self.mcp_observers, max_message_bytes=self.mcp_max_message_bytes,
            max_pending=self.mcp_max_pending, limit=limit,
            offload=lambda fn: self._decide(agent, fn, True), gate=self.gate)

    async def _handle_mcp_http(self, agent: str, session_id: bytes, stream: ServerStream,
                               req: HttpRequest, policy: policy_mod.Policy) -> None:
        """One HTTP request to an MCP server's url, judged message by message."""
        decision = policy_mod.decide_mcp_http(policy, agent, req.tool, req.method)
        self._counted("mcp", decision, agent, req.tool)
        entry = self.audit.http(agent, session_id, req, policy, decision, kind="mcp")
        if not await self._admitted(agent, stream, req, policy, decision, entry,
                                    f"mcp {req.method} on tool"):
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.McpTool)
        session = self._mcp_session(tool, agent, req.id, entry, policy)
        scrubber = policy_scrubber(policy)
        if scrubber.active:  # as for any HTTP tool (see _run_http)
            scrubber = server_scrubber(policy, self.held_secrets)
        aborted: str | None = "cancelled"
        try:
            await forward_mcp_http(self.http_client, stream, req, tool, session, scrubber,
                                   lambda fn: self._decide(agent, fn, True))
            aborted = None
        except Exception:
            aborted = "error"
            raise
        finally:
            session.finish()
            entry.completed(**http_completion_fields(stream.sent, len(req.body), aborted,
                                                     stream.cancel_reason),
                            mcp_refused=session.refusal)

    async def _admitted(self, agent: str, stream: ServerStream, req: HttpRequest | CliRequest,
                        policy: policy_mod.Policy, decision: policy_mod.Decision,
                        entry: AuditEntry, what: str, claimed: str = "") -> bool:
        """The steps from a decision record to the run, the same for every kind: the
        record is written (else refuse), a deny is told, a marked call waits for a
        person, and a reload that came meanwhile judges the request again. True: it
        runs now, and a later reload reaches it (``revocation.py``)."""
        if not await self._audited(entry, stream):
            return False
        if not decision.allow:
            log.log(entry.log_level, "denied %s %s for agent %s (%s%s): %s", what, req.tool,
                    agent, claimed, entry.request_id, decision.reason)
            self._deny(stream, decision, agent, req.tool)
            return False
        if not await self._approved(agent, stream, req, decision, entry, policy):
            return False
        return await self.still_allowed(stream, entry)

    async def _audited(self, entry: AuditEntry, stream: ServerStream) -> bool:
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
    def _deny(stream: ServerStream, decision: policy_mod.Decision, agent: str,
              tool: str) -> None:
        """Tell the VM no: unknown and not-granted tools look alike (policy.vm_denial)."""
        status, code, message = policy_mod.vm_denial(decision, agent, tool)
        stream.fail(status, code, message, decision.retry_after)

    # -- reloads reach open requests (revocation.py) ----------------------------------
    async def rejudge(self, open_req: OpenRequest,
                      policy: policy_mod.Policy) -> policy_mod.Decision:
        """The request's decision under ``policy``, without rate limits (nothing is
        counted twice); in a worker thread if it is large, as its first decision was."""
        decide, heavy = decider(open_req, policy, self.limits)
        return await self._decide(open_req.agent, decide, heavy)

    async def still_allowed(self, stream: ServerStream, entry: AuditEntry) -> bool:
        """Before an allowed request runs: judge it again if a reload came while it was
        being decided; end it if the new policy denies it. From here on it is running."""
        open_req = self.open[stream]
        while open_req.policy is not open_req.decided_under:
            policy = open_req.decided_under = open_req.policy
            decision = await self.rejudge(open_req, policy)
            if not decision.allow:
                end_request(open_req, entry, decision, running=False)
                self.metrics.count_revoked(open_req.kind)
                return False
        open_req.entry = entry
        return True

    def revoke(self, open_req: OpenRequest, decision: policy_mod.Decision) -> None:
        """End a running request that a reloaded policy denies."""
        assert open_req.entry is not None
        end_request(open_req, open_req.entry, decision, running=True)
        self.metrics.count_revoked(open_req.kind)

    async def revoke_denied(self, policy: policy_mod.Policy,
                            current: Callable[[], policy_mod.Policy]) -> int:
        """After a reload to ``policy``: end every open request it denies (see
        ``revocation.py``); ``current`` is the policy in force when each is judged."""
        return await revoke_denied(list(self.open.values()), policy, self.limits,
                                   self.rejudge, self.revoke, current)


def _asks_for_events(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the request's ``Accept`` names ``text/event-stream`` (EventSource always does)."""
    return any(k.lower() == b"accept" and b"text/event-stream" in v.lower() for k, v in headers)
