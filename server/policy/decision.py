"""Verdicts: what a decision says, the lookup both request kinds start with, what the VM is told."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .model import _NAME_RE, DEFAULT_CWD, CliTool, HttpTool, McpTool, Policy, Tool, _grant_denial
from .quoting import _show


@dataclass(frozen=True)
class Decision:
    """The verdict on one request.

    ``rule`` names what decided: a policy entry such as
    ``tools.op.argv_allow_patterns[0] "item get *"`` or a default such as
    ``default deny: no tools.op.argv_allow_patterns entry matches``. ``code``
    says why a deny happened (``denied``, ``unknown_tool``, ``not_granted``,
    ``wrong_type``, ``bad_request``, ``rate_limited``; the server's fair
    shares add ``too_many_requests`` and ``server_busy``) and is ``""`` for an
    allow. Reasons never
    quote parameter values, argv or bodies, which the audit settings may want
    kept out.

    The server does not send ``unknown_tool``, ``not_granted`` and
    ``wrong_type`` apart to the VM (see :attr:`tool_unavailable`): telling
    them apart would let a VM enumerate the host's tools and other agents'
    grants. The precise reason goes to the audit trail and the log only.
    """

    allow: bool
    reason: str
    rule: str
    code: str = ""
    retry_after: int | None = None
    """For a ``rate_limited`` (or fair-share) deny: whole seconds until a retry can succeed."""
    limit: str = ""
    """For a deny by a parse limit (``policy/limits.py``): the limit's name."""
    approval: str = ""
    """For an allow that must wait for a person: the approve rule(s) that matched."""

    @property
    def needs_approval(self) -> bool:
        """Allowed, but only once a person on the host says yes (``server/approvals.py``)."""
        return self.allow and bool(self.approval)

    @property
    def tool_unavailable(self) -> bool:
        """Denied because the agent has no such tool (unknown, not granted, other type)."""
        return self.code in UNAVAILABLE_CODES

    @property
    def decision(self) -> str:
        """``"allow"`` or ``"deny"``, as written in the audit trail."""
        return "allow" if self.allow else "deny"

    def as_dict(self) -> dict[str, str]:
        """The JSON form used by ``carapace-debug policy check --json``."""
        out = {"decision": self.decision, "reason": self.reason, "rule": self.rule}
        if self.needs_approval:
            out["approval"] = self.approval
        return out


@dataclass(frozen=True)
class CliDecision(Decision):
    """A CLI verdict; when allowed, exactly what to execute.

    ``argv`` starts with ``binary``; ``env`` is the complete environment (it
    holds injected secrets, so it is not in the repr); ``cwd`` is resolved.
    """

    binary: str = ""
    argv: list[bytes] = field(default_factory=list)
    env: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    cwd: bytes = DEFAULT_CWD


UNAVAILABLE_CODES: Final = frozenset({"unknown_tool", "not_granted", "wrong_type"})

BUSY_CODES: Final = {"too_many_requests": 429, "server_busy": 503}
"""Deny codes of the server's fair shares (an agent's own cap, the host's) and their status."""
"""Deny codes meaning "no such tool for you"; the VM sees them all as one."""


def _deny(reason: str, rule: str, code: str = "denied") -> Decision:
    return Decision(allow=False, reason=reason, rule=rule, code=code)


def _cli_deny(reason: str, rule: str, code: str = "denied") -> CliDecision:
    return CliDecision(allow=False, reason=reason, rule=rule, code=code)


def _quoted_name(name: str) -> str:
    """A VM-supplied name for a message: as is if it is a valid name, else escaped."""
    if isinstance(name, str) and _NAME_RE.match(name):
        return f"'{name}'"
    return _show(str(name), 60)


def vm_denial(decision: Decision, agent: str, tool: str) -> tuple[int, str, str]:
    """What the VM is told about a deny: (HTTP status, wire code, message).

    An unknown tool, a tool the agent is not granted and a tool of the other
    type all read the same — 403, ``denied``, "denied by policy: tool 'X' is
    not available to agent 'Y'" — so a VM cannot probe which tools exist or
    what other agents may use; the precise reason stays in the audit trail.
    A malformed request is 400 ``bad_request``, a rate-limited one 429
    ``rate_limited`` (with ``decision.retry_after``), a fair-share refusal 429
    ``too_many_requests`` or 503 ``server_busy`` (also with ``retry_after``),
    any other deny 403 ``denied`` with the reason (which never quotes request
    content).
    """
    if decision.tool_unavailable:
        return (403, "denied", f"denied by policy: tool {_quoted_name(tool)} is not available "
                f"to agent {_quoted_name(agent)}")
    if decision.code == "bad_request":
        return 400, "bad_request", f"bad request, denied by policy: {decision.reason}"
    if decision.code == "rate_limited":
        return 429, "rate_limited", f"rate limited: {decision.reason}"
    if decision.code in BUSY_CODES:
        return BUSY_CODES[decision.code], decision.code, f"refused: {decision.reason}"
    return 403, "denied", f"denied by policy: {decision.reason}"


def _rule(tool: str, key: str, index: int, text: str) -> str:
    return f"tools.{tool}.{key}[{index}] {_show(text, 200)}"


def _lookup(
    policy: Policy, agent: str, tool: str,
    want: type[CliTool] | type[HttpTool] | type[McpTool],
) -> Tool | Decision:
    """The tool if it exists, is of the wanted type and ``agent`` may use it; else the deny."""
    if not isinstance(agent, str) or not isinstance(tool, str):
        return _deny("agent and tool names must be strings", "default deny: malformed request",
                     "bad_request")
    found = policy.tools.get(tool)
    if found is None:
        return _deny(f"unknown tool {_show(tool)}",
                     f"default deny: {_show(tool)} is not in the policy's tools", "unknown_tool")
    if not isinstance(found, want):
        asked = {HttpTool: "http", CliTool: "cli"}.get(want, "mcp")
        return _deny(
            f"tool {_show(tool)} is a {found.type} tool, not a {asked} tool",
            f"default deny: tools.{tool}.type is {found.type}",
            "wrong_type",
        )
    denial = _grant_denial(policy, agent, tool)
    if denial is not None:
        return _deny(*denial, "not_granted")
    return found
