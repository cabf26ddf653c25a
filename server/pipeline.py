"""The request pipeline: decide, limit, audit, run, complete — for HTTP and CLI alike.

Each step has one place: the policy decides (``policy/``), the per-tool
rate limits may turn an allow into a deny, the decision record is written
before anything runs (and the request is refused if it cannot be: the
trail fails closed), the allowed request runs (``upstream/relay.py`` or
``cli_runner.py``), and the completion record says how it ended. A request
finishes under the policy it began with.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import trio

from carapace.protocol.messages import CliRequest, HttpRequest

from . import policy as policy_mod
from .audit import AuditEntry, AuditError, AuditTrail
from .audit.records import cli_completion_fields, http_completion_fields
from .cli_runner import ExitInfo, run_cli
from .masking import policy_scrubber
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
                 mcp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 mcp_max_pending: int = MAX_PENDING) -> None:
        self.audit = audit
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
        self.mcp_max_message_bytes = mcp_max_message_bytes
        self.mcp_max_pending = mcp_max_pending
        self.mcp_observers: list[McpObserver] = []
        """Told of each MCP call (the sniff feed adds itself)."""

    async def handle(self, agent: str, session_id: bytes, stream: ServerStream,
                     msg: HttpRequest | CliRequest, policy: policy_mod.Policy) -> None:
        if isinstance(msg, HttpRequest):
            await self._handle_http(agent, session_id, stream, msg, policy)
        else:
            await self._handle_cli(agent, session_id, stream, msg, policy)

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
        self._counted("http", decision, agent, req.tool)
        entry = self.audit.http(agent, session_id, req, policy, decision)
        if not await self._audited(entry, stream):
            return
        if not decision.allow:
            log.log(entry.log_level, "denied http %s %s on tool %s for agent %s (%s): %s",
                    req.method, req.target[:200], req.tool, agent, entry.request_id,
                    decision.reason)
            self._deny(stream, decision, agent, req.tool)
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.HttpTool)
        headers = policy_mod.prepare_http_headers(tool, list(req.headers))
        aborted: str | None = "cancelled"  # unless forward_http returns or raises
        try:
            await forward_http(self.http_client, stream, req, req.tool, tool, headers,
                               scrubber=policy_scrubber(policy))
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
        self._counted("cli", decision, agent, req.tool)
        entry = self.audit.cli(agent, session_id, req, policy, decision)
        if not await self._audited(entry, stream):
            return
        if not decision.allow:
            log.log(entry.log_level,
                    "denied cli tool %s for agent %s (VM-claimed peer uid %s pid %s, %s): %s",
                    req.tool, agent, req.peer_uid, req.peer_pid, entry.request_id,
                    decision.reason)
            self._deny(stream, decision, agent, req.tool)
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

    async def _handle_mcp(self, agent: str, session_id: bytes, stream: ServerStream,
                          req: CliRequest, policy: policy_mod.Policy) -> None:
        """An MCP stdio session: a CLI run of the tool's command with the MCP filter on it."""
        decision = policy_mod.decide_mcp_session(policy, agent, req.tool, list(req.argv))
        self._counted("mcp", decision, agent, req.tool)
        entry = self.audit.cli(agent, session_id, req, policy, decision, kind="mcp")
        if not await self._audited(entry, stream):
            return
        if not decision.allow:
            log.log(entry.log_level, "denied mcp tool %s for agent %s (%s): %s", req.tool,
                    agent, entry.request_id, decision.reason)
            self._deny(stream, decision, agent, req.tool)
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.McpTool)
        session = self._mcp_session(tool, agent, req.id, entry, policy)
        info = ExitInfo()
        try:
            # The session lasts as long as its client; timeout_secs bounds each call.
            await run_cli(stream, req, decision, tool, info=info, hook=session.hook,
                          timeout=math.inf, filters=output_filters(policy_scrubber(policy)))
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
            offload=lambda fn: self._decide(agent, fn, True))

    async def _handle_mcp_http(self, agent: str, session_id: bytes, stream: ServerStream,
                               req: HttpRequest, policy: policy_mod.Policy) -> None:
        """One HTTP request to an MCP server's url, judged message by message."""
        decision = policy_mod.decide_mcp_http(policy, agent, req.tool, req.method)
        self._counted("mcp", decision, agent, req.tool)
        entry = self.audit.http(agent, session_id, req, policy, decision, kind="mcp")
        if not await self._audited(entry, stream):
            return
        if not decision.allow:
            log.log(entry.log_level, "denied mcp %s on tool %s for agent %s (%s): %s",
                    req.method, req.tool, agent, entry.request_id, decision.reason)
            self._deny(stream, decision, agent, req.tool)
            return
        tool = policy.tools[req.tool]
        assert isinstance(tool, policy_mod.McpTool)
        session = self._mcp_session(tool, agent, req.id, entry, policy)
        aborted: str | None = "cancelled"
        try:
            await forward_mcp_http(self.http_client, stream, req, tool, session,
                                   policy_scrubber(policy),
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
