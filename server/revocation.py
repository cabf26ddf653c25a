"""A reload reaches what is already open: requests the new policy denies are ended.

After a successful reload the daemon calls :func:`revoke_denied` with the new
policy. Every open request is judged again by the same pure decision
functions (``decide_http`` / ``decide_cli``), *without* the rate limiter: a
judgement that was already counted must not spend budget twice. Each one the
new policy denies — its tool is gone, its agent's grant was removed, its
method, path or argv is no longer allowed — is ended at once:

- the VM gets ``failed`` (403, ``denied``) whose message says the host's
  policy changed and why (as :func:`~.policy.vm_denial` words a deny, so
  an unknown tool and a removed grant still read alike);
- a ``revoked`` audit record names the rule of the new decision, after the
  request's ``decision`` record and before its ``completion`` record
  (outcome ``cancelled``);
- the request's cancel scope is cancelled: the upstream call is dropped and
  a CLI process group is stopped (``cli_runner``: SIGTERM, SIGKILL after the
  grace), as for any cancellation.

A request that is still being decided (a worker-thread decision, a decision
record waiting for fsync) has the new policy noted on it instead; the
pipeline judges it again under that policy before it runs
(:meth:`RequestPipeline.still_allowed`), so no request starts under a policy
that was replaced while it waited. Requests the new policy allows are not
touched: they run on as they were decided and recorded (binary, environment,
upstream), so the audit trail says what actually ran. A large request is
judged again in a worker thread, exactly as its first decision was, and the
pass yields between requests, so a reload never holds the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from carapace.protocol.messages import CliRequest, HttpRequest
from carapace.runtime.frames import LinkClosed

from . import policy as policy_mod
from .streams import ServerStream

if TYPE_CHECKING:
    from .audit import AuditEntry

log = logging.getLogger("carapace.server")

REVOKED_STATUS = 403
REVOKED_CODE = "denied"
"""What the VM is told of a revoked request, whatever the new decision's code: a removed
tool and a removed grant must read alike (see ``vm_denial``), and a shim exits 77."""


@dataclass(eq=False)
class OpenRequest:
    """One request in the pipeline: what is needed to judge it again under a new policy."""

    agent: str
    session_id: bytes
    stream: ServerStream
    msg: HttpRequest | CliRequest
    decided_under: policy_mod.Policy
    """The policy its decision was (or is being) made under."""
    policy: policy_mod.Policy = field(init=False)
    """The policy in force now, as far as this request knows: a reload while it is still
    being decided sets it, and the pipeline judges it again before it runs."""
    entry: AuditEntry | None = None
    """Its audit entry, once its decision record is written and it runs: from then on a
    reload revokes it directly."""

    def __post_init__(self) -> None:
        self.policy = self.decided_under

    @property
    def kind(self) -> str:
        return "http" if isinstance(self.msg, HttpRequest) else "cli"

    @property
    def ended(self) -> bool:
        """Already answered or already being cut off: nothing left to revoke."""
        return self.stream.finished or self.stream.cancel_scope.cancel_called


def decider(open_req: OpenRequest, policy: policy_mod.Policy, limits: policy_mod.ParseLimits
            ) -> tuple[Callable[[], policy_mod.Decision], bool]:
    """The pure decision for this request under ``policy``, and whether it is heavy
    enough for a worker thread (``limits.needs_worker``). No rate limits."""
    msg = open_req.msg
    tool = policy.tools.get(msg.tool)
    if isinstance(tool, policy_mod.McpTool):  # a session (stdio) or one request (url)
        if isinstance(msg, HttpRequest):
            return (partial(policy_mod.decide_mcp_http, policy, open_req.agent, msg.tool,
                            msg.method), False)
        return (partial(policy_mod.decide_mcp_session, policy, open_req.agent, msg.tool,
                        list(msg.argv)), False)
    if isinstance(msg, HttpRequest):
        return (partial(policy_mod.decide_http, policy, open_req.agent, msg.tool, msg.method,
                        msg.target, list(msg.headers), msg.body, limits=limits),
                policy_mod.needs_worker(tool, limits, body=msg.body))
    return (partial(policy_mod.decide_cli, policy, open_req.agent, msg.tool, list(msg.argv),
                    msg.cwd, list(msg.env), limits=limits),
            policy_mod.needs_worker(tool, limits, argv=msg.argv))


def vm_message(decision: policy_mod.Decision, open_req: OpenRequest) -> str:
    """What the VM reads: the policy changed, and the deny as ``vm_denial`` words it."""
    _, _, message = policy_mod.vm_denial(decision, open_req.agent, open_req.msg.tool)
    return f"the host's policy changed: {message}"


def end_request(open_req: OpenRequest, entry: AuditEntry, decision: policy_mod.Decision,
                *, running: bool) -> str:
    """Record the revocation, tell the VM, and (``running``) cancel the request.

    Returns the message the VM was sent. A request that had not started yet
    (``running`` False) gets its completion record here, since nothing else
    will write it.
    """
    message = vm_message(decision, open_req)
    entry.revoked(decision)
    log.warning("revoked request %s (%s, tool %s, agent %s): the reloaded policy denies it: "
                "%s (rule: %s)", entry.request_id, open_req.kind, open_req.msg.tool,
                open_req.agent, decision.reason, decision.rule)
    stream = open_req.stream
    if not stream.finished:
        try:
            stream.fail(REVOKED_STATUS, REVOKED_CODE, message)
        except LinkClosed:
            pass  # the session is gone: its requests are being cancelled anyway
    if running:
        stream.cancel(message)
    else:
        entry.completed(outcome="cancelled", cancelled=message, error=REVOKED_CODE)
    return message


async def revoke_denied(
    open_requests: Sequence[OpenRequest],
    policy: policy_mod.Policy,
    limits: policy_mod.ParseLimits,
    judge: Callable[[OpenRequest, policy_mod.Policy], Awaitable[policy_mod.Decision]],
    revoke: Callable[[OpenRequest, policy_mod.Decision], None],
    current: Callable[[], policy_mod.Policy],
) -> int:
    """Judge every open request under ``policy``; end each one it denies. Returns how many.

    ``judge`` is the pipeline's (inline, or in a worker thread when heavy):
    the cheap ones go first, so a large request waiting for a worker does not
    hold back the others; the loop yields between requests, so a pass over
    thousands of them never holds the event loop. ``current`` is the policy
    in force now: if a newer reload lands meanwhile, its own pass decides and
    this one stops.
    """
    waiting = [r for r in open_requests if r.entry is None]
    for open_req in waiting:
        open_req.policy = policy  # still being decided: the pipeline judges it again
    running = [r for r in open_requests if r.entry is not None]
    running.sort(key=lambda r: decider(r, policy, limits)[1])  # False (cheap) first
    revoked = 0
    for open_req in running:
        await trio.lowlevel.checkpoint()
        if current() is not policy:
            return revoked
        if open_req.ended:
            continue
        decision = await judge(open_req, policy)
        if current() is not policy:
            return revoked
        if decision.allow or open_req.ended:
            continue
        revoke(open_req, decision)
        revoked += 1
    return revoked
