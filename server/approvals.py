"""Approvals: a person on the host says yes or no to the calls that matter, while the VM waits.

The policy marks an allowed call that must also ask (``Decision.approval``);
the pipeline then opens a :class:`Pending` here and waits on it. An operator
lists the pending approvals and decides them through the operator API
(``carapace-debug approvals``, ``approve ID``, ``deny ID``). The wait ends in
one of these outcomes:

- ``approved`` / ``denied``: an operator decided (``by`` is the name they
  gave: asserted by the operator, not authenticated);
- ``timeout``: nobody answered within the tool's ``approval.timeout_secs``;
- ``withdrawn``: the VM's client went away (its request was cancelled);
- ``shutdown``: the server stops, failing every pending approval at once;
- ``remembered``: no wait at all, an earlier approval ``--for`` SECONDS (or
  the tool's ``remember_secs``) still covers the same call.

A remembered approval is a :class:`Grant` keyed by agent, tool and the call's
canonical form (argv, method + params, or an MCP tool name + arguments); it
expires on the injected clock and a policy reload clears every grant. Each agent may hold at most
``max_pending`` approvals at once, so a VM cannot flood the operator.

The registry is trio-level but owns no tasks: each waiting request awaits
its own :class:`trio.Event`, so cancelling the request withdraws its approval
(in a ``finally``) and nothing outlives it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

log = logging.getLogger("carapace.server")

DEFAULT_MAX_PENDING_APPROVALS: Final = 8
"""Pending approvals one agent may hold at once: more than a person can read at a
glance is a flood, not work; the next call is refused with ``too_many_requests``."""

OUTCOMES: Final = ("approved", "denied", "timeout", "withdrawn", "shutdown", "remembered",
                   "refused")
"""Every way an approval ends (the ``outcome`` of its audit record and metric label);
``refused`` never opened one: the agent was over ``max_pending``."""

MAX_REMEMBER_SECS: Final = 7 * 86400.0
"""Longest ``--for`` an operator may give: a week; longer belongs in the policy."""


class ApprovalError(Exception):
    """An operator's decision cannot be applied; the message says why (unknown id, decided)."""


class TooManyPending(Exception):
    """The agent already holds ``max_pending`` approvals."""


@dataclass
class Verdict:
    """How one approval ended."""

    outcome: str
    by: str = ""
    reason: str = ""

    @property
    def approved(self) -> bool:
        return self.outcome in ("approved", "remembered")


@dataclass
class Pending:
    """One call waiting for a person."""

    id: int
    agent: str
    tool: str
    kind: str
    """``http``, ``cli`` or ``mcp`` (one ``tools/call`` of an MCP session)."""
    summary: str
    """What the call does, secrets masked and long values cut (``approval_gate.summary``)."""
    key: str
    """The call's canonical form: what a remembered approval must match."""
    request_id: str
    """The audit trail's id of the request."""
    rule: str
    created: float
    """On the registry's clock."""
    remember_secs: float = 0.0
    """The tool's ``approval.remember_secs``: used when the operator gives no ``--for``."""
    verdict: Verdict | None = None
    event: trio.Event = field(default_factory=trio.Event)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"id": str(self.id), "kind": "pending", "agent": self.agent, "tool": self.tool,
                "summary": self.summary, "waiting_s": round(now - self.created, 3),
                "request_id": self.request_id, "rule": self.rule, "type": self.kind}


@dataclass
class Grant:
    """A remembered approval: the same call again is approved until ``expires``."""

    id: str
    agent: str
    tool: str
    key: str
    summary: str
    expires: float
    by: str
    reason: str

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "kind": "grant", "agent": self.agent, "tool": self.tool,
                "summary": self.summary, "waiting_s": None,
                "expires_in_s": round(max(0.0, self.expires - now), 3),
                "by": self.by, "reason": self.reason}


class Approvals:
    """The pending approvals and the remembered grants of one server."""

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING_APPROVALS,
                 clock: Callable[[], float] = trio.current_time,
                 on_new: Callable[[Pending], None] | None = None) -> None:
        self.max_pending = max_pending
        self.clock = clock
        self.on_new = on_new
        """Told of each new pending approval (the ``--approval-notify`` command)."""
        self.pending: dict[int, Pending] = {}
        self.grants: dict[tuple[str, str, str], Grant] = {}
        self._ids = itertools.count(1)
        self._grant_ids = itertools.count(1)
        self.closed = False
        """Set at shutdown: no new approval is opened (it would only fail)."""

    # -- the waiting side (the pipeline) ----------------------------------------------
    def remembered(self, agent: str, tool: str, key: str) -> Grant | None:
        """The unexpired grant covering this call, if any (expired ones are dropped)."""
        grant = self.grants.get((agent, tool, key))
        if grant is None:
            return None
        if grant.expires <= self.clock():
            del self.grants[(agent, tool, key)]
            return None
        return grant

    def open(self, *, agent: str, tool: str, kind: str, summary: str, key: str,
             request_id: str, rule: str, remember_secs: float = 0.0) -> Pending:
        """Register a call that waits; :class:`TooManyPending` over the per-agent cap."""
        held = sum(1 for p in self.pending.values() if p.agent == agent)
        if held >= self.max_pending:
            raise TooManyPending(
                f"agent {agent} already has {held} calls waiting for approval "
                "(--max-pending-approvals); retry once the operator has answered them")
        pending = Pending(id=next(self._ids), agent=agent, tool=tool, kind=kind,
                          summary=summary, key=key, request_id=request_id, rule=rule,
                          created=self.clock(), remember_secs=remember_secs)
        self.pending[pending.id] = pending
        if self.closed:
            self._settle(pending, Verdict("shutdown", reason="the server is shutting down"))
        elif self.on_new is not None:
            self.on_new(pending)
        return pending

    async def wait(self, pending: Pending, timeout: float) -> Verdict:
        """Wait for the operator; ``timeout`` seconds without an answer is a ``timeout``.

        Cancellation (the client went away) withdraws the approval; it is
        removed from the registry however the wait ends.
        """
        try:
            with trio.move_on_after(timeout):
                await pending.event.wait()
            if pending.verdict is None:
                pending.verdict = Verdict(
                    "timeout", reason=f"nobody answered within {timeout:g} s")
            return pending.verdict
        finally:
            if pending.verdict is None:
                pending.verdict = Verdict("withdrawn", reason="the client went away")
            self.pending.pop(pending.id, None)

    # -- the deciding side (the operator) ------------------------------------------------
    def decide(self, approval_id: str, *, approve: bool, by: str = "", reason: str = "",
               for_secs: float | None = None) -> Pending:
        """Apply an operator's answer; :class:`ApprovalError` for an unknown or decided id.

        An approval with ``for_secs`` (or, without it, the tool's
        ``remember_secs``) above 0 also remembers the call for that long.
        """
        pending = self._find(approval_id)
        if not approve:
            self._settle(pending, Verdict("denied", by=by, reason=reason))
            return pending
        self._settle(pending, Verdict("approved", by=by, reason=reason))
        keep = pending.remember_secs if for_secs is None else for_secs
        if keep > 0:
            self.remember(pending, min(keep, MAX_REMEMBER_SECS), by, reason)
        return pending

    def revoke(self, grant_id: str) -> Grant:
        """Forget a remembered approval (``deny g-N``); ApprovalError if there is none."""
        for key, grant in self.grants.items():
            if grant.id == grant_id:
                del self.grants[key]
                return grant
        raise ApprovalError(f"no remembered approval {grant_id!r} (it may have expired)")

    def remember(self, pending: Pending, secs: float, by: str, reason: str) -> Grant:
        grant = Grant(id=f"g{next(self._grant_ids)}", agent=pending.agent, tool=pending.tool,
                      key=pending.key, summary=pending.summary,
                      expires=self.clock() + secs, by=by, reason=reason)
        self.grants[(pending.agent, pending.tool, pending.key)] = grant
        return grant

    def _find(self, approval_id: str) -> Pending:
        try:
            number = int(approval_id)
        except (TypeError, ValueError):
            raise ApprovalError(f"{str(approval_id)[:40]!r} is not an approval id "
                                "(a number, as 'carapace-debug approvals' lists)") from None
        pending = self.pending.get(number)
        if pending is None:
            raise ApprovalError(f"no pending approval {number}: it was never opened, or it "
                                "has already been decided, timed out or withdrawn")
        if pending.verdict is not None:
            raise ApprovalError(f"approval {number} is already {pending.verdict.outcome}")
        return pending

    @staticmethod
    def _settle(pending: Pending, verdict: Verdict) -> None:
        pending.verdict = verdict
        pending.event.set()

    # -- the server's lifecycle ---------------------------------------------------------------
    def clear_grants(self) -> int:
        """A reload: every remembered approval is forgotten (the new policy decides afresh)."""
        count = len(self.grants)
        self.grants.clear()
        return count

    def fail_all(self, reason: str) -> int:
        """Shutdown: every pending approval ends now with ``shutdown``; none opens after."""
        self.closed = True
        waiting = [p for p in self.pending.values() if p.verdict is None]
        for pending in waiting:
            self._settle(pending, Verdict("shutdown", reason=reason))
        return len(waiting)

    # -- what the operator sees ---------------------------------------------------------
    def listing(self) -> dict[str, Any]:
        """``GET /debug/approvals``: pending approvals (oldest first) and live grants."""
        now = self.clock()
        for key in [k for k, g in self.grants.items() if g.expires <= now]:
            del self.grants[key]
        return {
            "pending": [p.as_dict(now) for p in sorted(self.pending.values(),
                                                       key=lambda p: p.id)
                        if p.verdict is None],
            "grants": [g.as_dict(now) for g in self.grants.values()],
        }
