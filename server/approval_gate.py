"""The approval step of the request pipeline: a call the policy marked waits for a person.

``pipeline.py`` calls :meth:`ApprovalGate.admit` after the decision record is
written and before the call runs. For a call that needs no approval it
returns at once. Otherwise the call is covered by a remembered approval, or
it opens a pending approval (``approvals.py``), tells whoever
``--approval-notify`` pages, tells the VM it is waiting (a CLI request's
stderr gets one line after :data:`NOTICE_AFTER`; an HTTP client just waits
for its answer), and waits. Every end is written as an ``approval`` audit
record and counted in the metrics; a call that is not approved ends with
``failed`` code ``not_approved`` (403, shim exit 77).

Each ``tools/call`` an MCP session holds waits through
:meth:`ApprovalGate.ask_mcp` (the same registry, records and metrics); the
session itself answers the client when the call is not approved.

What the operator is shown (:func:`call_summary`) is built from the request
with secrets masked: every secret the server holds, the values of params and
flags whose names look secret (the same word rules as ``env_inject``), and
the tool's ``audit.redact_patterns``; long values are cut.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from carapace.protocol.messages import CliRequest, Exit, HttpRequest, Message, Output, Signal
from carapace.protocol.summary import Redactor

from . import policy as policy_mod
from .approvals import Approvals, Pending, TooManyPending, Verdict
from .audit import AuditEntry, AuditError, AuditTrail, utc_timestamp
from .metrics import ServerMetrics
from .policy.secrets import env_name_is_secret
from .streams import ServerStream

log = logging.getLogger("carapace.server")

NOTICE_AFTER: Final = 1.0
"""Seconds a CLI call waits before its shim prints that it waits: a call decided at
once (a remembered approval, a quick operator) prints nothing."""
NOTIFY_TIMEOUT: Final = 10.0
"""How long an ``--approval-notify`` command may run before it is killed."""
MAX_NOTIFY_RUNNING: Final = 16
"""Notify commands running at once; past it a notification is skipped (and logged),
so a VM opening and withdrawing calls cannot fork the host to death."""
SUMMARY_CHARS: Final = 400
"""Longest summary shown to the operator; each value inside is cut first."""
VALUE_CHARS: Final = 80
"""Longest single param value or argument in a summary."""
MASK: Final = "[REDACTED]"

RunProcess = Callable[..., Any]


def _secret_name(name: str) -> bool:
    word = name.lstrip("-").replace("-", "_")
    return bool(word) and env_name_is_secret(word)


def _named(name: str, patterns: Sequence[str]) -> bool:
    bare = name.lstrip("-")
    return _secret_name(name) or any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(bare, p) for p in patterns)


def _masked_argv(args: list[str], patterns: Sequence[str]) -> list[str]:
    """Values of flags with secret-looking or ``redact_patterns`` names become [REDACTED]."""
    out = list(args)
    for i, arg in enumerate(args):
        if not arg.startswith("-") or arg == "--":
            continue
        name, eq, _ = arg.partition("=")
        if not _named(name, patterns):
            continue
        if eq:
            out[i] = f"{name}={MASK}"
        elif i + 1 < len(out):
            out[i + 1] = MASK
    return out


def _masked_value(value: Any, patterns: Sequence[str]) -> Any:
    """A JSON value with secret-named keys masked and long strings cut, at any depth."""
    if isinstance(value, dict):
        return {str(k)[:VALUE_CHARS]: MASK if _named(str(k), patterns)
                else _masked_value(v, patterns) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked_value(v, patterns) for v in value]
    if isinstance(value, str) and len(value) > VALUE_CHARS:
        return value[:VALUE_CHARS] + "…"
    return value


def _rpc_calls(body: bytes) -> list[dict[str, Any]] | None:
    """The calls of a JSON-RPC body (one, or a batch), or None if it is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    calls = doc if isinstance(doc, list) else [doc]
    if not calls or not all(isinstance(c, dict) for c in calls):
        return None
    return calls


def call_summary(req: HttpRequest | CliRequest, tool: policy_mod.Tool | None,
                 redactor: Redactor) -> str:
    """What the operator reads before saying yes: argv, or method + params; secrets masked."""
    patterns = tool.audit.redact_patterns if tool is not None else ()
    if isinstance(req, CliRequest):
        args = [a.decode("utf-8", "replace")[:VALUE_CHARS] for a in req.argv[:64]]
        words = _masked_argv(args, patterns)
        line = redactor.argv([req.tool.encode(), *(w.encode() for w in words)])
        if len(req.argv) > 64:
            line += f" … ({len(req.argv)} arguments)"
        return line
    calls = _rpc_calls(req.body) if req.body else None
    if calls is None:
        text = f"{req.method} {req.target.split('?', 1)[0]}"
        if req.body:
            text += f" ({len(req.body)} bytes of body)"
        return redactor.text(text)
    parts = []
    for call in calls:
        params = _masked_value(call.get("params"), patterns)
        shown = "" if params is None else " " + json.dumps(params, ensure_ascii=False)
        parts.append(f"{str(call.get('method'))[:VALUE_CHARS]}{shown}")
    head = f"batch of {len(calls)}: " if len(calls) > 1 else ""
    return redactor.text(head + "; ".join(parts))


def call_key(req: HttpRequest | CliRequest) -> str:
    """The canonical form of a call (hashed): what a remembered approval must match.

    CLI: the argv. HTTP JSON-RPC: the method and params of each call (not the
    ids, which change every time). Other HTTP: method, target and body.
    """
    if isinstance(req, CliRequest):
        shape: Any = ["cli", [a.hex() for a in req.argv]]
    else:
        calls = _rpc_calls(req.body) if req.body else None
        if calls is not None:
            shape = ["rpc", req.method, req.target.split("?", 1)[0],
                     [[c.get("method"), c.get("params")] for c in calls]]
        else:
            shape = ["http", req.method, req.target, hashlib.sha256(req.body).hexdigest()]
    text = json.dumps(shape, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def mcp_call_key(name: str, arguments: Any) -> str:
    """An MCP ``tools/call``'s canonical form (hashed): the tool name and its arguments."""
    text = json.dumps(["mcp", name, arguments], sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def mcp_call_summary(name: str, arguments: Any, tool: policy_mod.McpTool,
                     redactor: Redactor) -> str:
    """``tools/call NAME {arguments}``, secrets masked as in :func:`call_summary`."""
    masked = _masked_value(arguments, tool.audit.redact_patterns)
    shown = "" if arguments is None else " " + json.dumps(masked, ensure_ascii=False)
    return redactor.text(f"tools/call {name[:VALUE_CHARS]}{shown}")


def vm_message(verdict: Verdict, pending: Pending | None = None) -> str:
    """What the VM is told when its call was not approved."""
    if verdict.outcome == "denied":
        return f"denied by {verdict.by or 'the operator'}: {verdict.reason or 'no reason given'}"
    if verdict.outcome == "timeout":
        return f"not approved: {verdict.reason} (approval {pending.id if pending else '?'})"
    return f"not approved: {verdict.reason}"


class ApprovalGate:
    """Holds a marked call until a person answers; records and counts how it ended."""

    def __init__(self, approvals: Approvals, audit: AuditTrail, metrics: ServerMetrics,
                 secrets: Callable[[], list[bytes]], notify_command: str | None = None,
                 run_process: RunProcess = trio.run_process) -> None:
        self.approvals = approvals
        self.audit = audit
        self.metrics = metrics
        self.secrets = secrets
        self.notify_command = notify_command
        self.run_process = run_process
        self.nursery: trio.Nursery | None = None
        """Where notify commands run (the daemon's); none: nobody is paged."""
        self._notifying = 0
        approvals.on_new = self.notify

    async def admit(self, agent: str, stream: ServerStream, req: HttpRequest | CliRequest,
                    decision: policy_mod.Decision, entry: AuditEntry,
                    policy: policy_mod.Policy) -> bool:
        """True if the call may run; False once its stream has been told why not."""
        if not decision.needs_approval:
            return True
        tool = policy.tools.get(req.tool)
        config = (tool.approval if isinstance(tool, policy_mod.CliTool | policy_mod.HttpTool
                                               | policy_mod.McpTool)
                  else policy_mod.ApprovalConfig())
        key = call_key(req)
        grant = self.approvals.remembered(agent, req.tool, key)
        if grant is not None:
            self._record(entry, Verdict("remembered", by=grant.by, reason=grant.reason),
                         0.0, decision, grant=grant.id)
            return True
        redactor = Redactor(self.secrets(), limit=SUMMARY_CHARS)
        try:
            pending = self.approvals.open(
                agent=agent, tool=req.tool, kind="cli" if isinstance(req, CliRequest) else "http",
                summary=call_summary(req, tool, redactor), key=key, request_id=entry.request_id,
                rule=decision.approval, remember_secs=config.remember_secs)
        except TooManyPending as exc:
            log.warning("%s", exc)
            self._emit({"ts": utc_timestamp(), "event": "limit", "limit": "max_pending_approvals",
                        "agent": agent, "detail": f"request {entry.request_id} refused"})
            self.metrics.count_approval("refused", None)
            stream.fail(503, "too_many_requests", str(exc))
            entry.completed(outcome="failed", error="too_many_requests", status=503)
            return False
        log.info("approval %d: agent %s waits for approval of %s (%s)", pending.id, agent,
                 req.tool, entry.request_id)
        try:
            verdict, signum = await self._wait(stream, req, pending, entry, decision,
                                               config.timeout_secs)
        except BaseException:  # cancelled: the client went away, the session ended
            entry.completed(outcome="cancelled", cancelled=stream.cancel_reason
                            or "withdrawn while waiting for approval")
            raise
        if verdict.approved:
            return True
        if signum is not None:
            # The shim was interrupted (Ctrl-C): it ends as the tool would have.
            stream.send_control(Exit(id=stream.id, code=128 + signum, signal=signum,
                                     reason="interrupted while waiting for approval"))
            entry.completed(outcome="cancelled", cancelled="signal while waiting for approval")
            return False
        stream.fail(403, "not_approved", vm_message(verdict, pending))
        entry.completed(outcome="failed", error="not_approved", status=403)
        return False

    async def ask_mcp(self, agent: str, tool: policy_mod.McpTool, name: str, arguments: Any,
                      decision: policy_mod.Decision, entry: AuditEntry) -> Verdict:
        """One gated MCP ``tools/call`` of a session: how its approval ended.

        A cancelled wait (the session ended) is withdrawn, recorded, and re-raised.
        """
        key = mcp_call_key(name, arguments)
        grant = self.approvals.remembered(agent, tool.name, key)
        if grant is not None:
            known = Verdict("remembered", by=grant.by, reason=grant.reason)
            self._record(entry, known, 0.0, decision, grant=grant.id, mcp_tool=name)
            return known
        redactor = Redactor(self.secrets(), limit=SUMMARY_CHARS)
        try:
            pending = self.approvals.open(
                agent=agent, tool=tool.name, kind="mcp",
                summary=mcp_call_summary(name, arguments, tool, redactor), key=key,
                request_id=entry.request_id, rule=decision.approval,
                remember_secs=tool.approval.remember_secs)
        except TooManyPending as exc:
            log.warning("%s", exc)
            self._emit({"ts": utc_timestamp(), "event": "limit", "limit": "max_pending_approvals",
                        "agent": agent, "detail": f"an MCP call of {entry.request_id} refused"})
            self.metrics.count_approval("refused", None)
            return Verdict("refused", reason=str(exc))
        log.info("approval %d: agent %s waits for approval of MCP tool %s on %s (%s)",
                 pending.id, agent, name, tool.name, entry.request_id)
        started = trio.current_time()
        verdict: Verdict | None = None
        try:
            verdict = await self.approvals.wait(pending, tool.approval.timeout_secs)
        finally:
            final = verdict or pending.verdict or Verdict("withdrawn")
            self._record(entry, final, trio.current_time() - started, decision,
                         approval_id=pending.id, mcp_tool=name)
        return verdict

    async def _wait(self, stream: ServerStream, req: HttpRequest | CliRequest, pending: Pending,
                    entry: AuditEntry, decision: policy_mod.Decision,
                    timeout: float) -> tuple[Verdict, int | None]:
        """Wait for the verdict; a CLI request's signal withdraws it (its signal number)."""
        started = trio.current_time()
        held: list[Message] = []
        signalled: list[int] = []
        verdict: Verdict | None = None
        try:
            async with trio.open_nursery() as nursery:
                if isinstance(req, CliRequest):
                    nursery.start_soon(self._tell_shim, stream, pending)
                    nursery.start_soon(_watch_inbox, stream, held, signalled,
                                       nursery.cancel_scope)
                verdict = await self.approvals.wait(pending, timeout)
                nursery.cancel_scope.cancel()
        finally:
            stream.put_back(held)
            final = verdict or pending.verdict or Verdict("withdrawn")
            if signalled:
                final = Verdict("withdrawn", reason=f"interrupted by signal {signalled[0]}")
            self._record(entry, final, trio.current_time() - started, decision,
                         approval_id=pending.id)
        return final, (signalled[0] if signalled else None)

    @staticmethod
    async def _tell_shim(stream: ServerStream, pending: Pending) -> None:
        await trio.sleep(NOTICE_AFTER)
        line = f"carapace: waiting for approval on the host (request {pending.id})…\n"
        await stream.send(Output(id=stream.id, fd=2, data=line.encode()))

    def _record(self, entry: AuditEntry, verdict: Verdict, waited: float,
                decision: policy_mod.Decision, **extra: Any) -> None:
        """The ``approval`` audit record and the metrics of one ended approval."""
        self.metrics.count_approval(verdict.outcome, waited)
        log.info("approval of %s: %s%s", entry.request_id, verdict.outcome,
                 f" by {verdict.by}" if verdict.by else "")
        record = {"ts": utc_timestamp(), "event": "approval", **entry.base, **extra,
                  "outcome": verdict.outcome, "by": verdict.by,
                  "by_source": "operator-asserted" if verdict.by else "",
                  "reason": verdict.reason, "waited_ms": round(waited * 1000, 3),
                  "rule": decision.approval}
        self._emit(record)

    def _emit(self, record: dict[str, Any]) -> None:
        try:
            self.audit.emit(record)
        except AuditError as exc:
            log.error("audit: lost an approval record: %s", exc)

    # -- paging a person ----------------------------------------------------------------
    def notify(self, pending: Pending) -> None:
        """Start the ``--approval-notify`` command for a new pending approval; never waits."""
        if not self.notify_command or self.nursery is None:
            return
        if self._notifying >= MAX_NOTIFY_RUNNING:
            log.warning("approval %d: %d notify commands still run; this one is skipped",
                        pending.id, self._notifying)
            return
        doc = {**pending.as_dict(pending.created), "ts": utc_timestamp(),
               "event": "approval_pending", "timestamp": time.time(),
               "approve": f"carapace-debug approve {pending.id}",
               "deny": f"carapace-debug deny {pending.id}"}
        self._notifying += 1
        try:
            self.nursery.start_soon(self._run_notify, pending.id,
                                    json.dumps(doc).encode() + b"\n")
        except RuntimeError:  # the server's nursery is closing: it stops, nobody is paged
            self._notifying -= 1

    async def _run_notify(self, approval_id: int, payload: bytes) -> None:
        try:
            with trio.move_on_after(NOTIFY_TIMEOUT) as scope:
                result = await self.run_process(
                    ["/bin/sh", "-c", self.notify_command or "true"], stdin=payload,
                    capture_stdout=True, capture_stderr=True, check=False)
            if scope.cancelled_caught:
                log.warning("approval %d: --approval-notify did not finish within %g s; "
                            "killed", approval_id, NOTIFY_TIMEOUT)
            elif result.returncode != 0:
                err = result.stderr.decode("utf-8", "replace").strip()[-300:]
                log.warning("approval %d: --approval-notify exited with status %d: %s",
                            approval_id, result.returncode, err or "(no output)")
        except OSError as exc:
            log.warning("approval %d: cannot run --approval-notify: %s", approval_id,
                        exc.strerror or exc)
        finally:
            self._notifying -= 1


async def _watch_inbox(stream: ServerStream, held: list[Message], signalled: list[int],
                       scope: trio.CancelScope) -> None:
    """Hold the stdin frames that arrive while a CLI call waits; a signal withdraws the call."""
    async for msg in stream.incoming():
        if isinstance(msg, Signal):
            signalled.append(msg.signum)
            scope.cancel()
            return
        held.append(msg)


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def operator_text(value: Any, limit: int = 200) -> str:
    """An operator-given name or reason as it may be stored and shown: text, one line, cut."""
    if not isinstance(value, str):
        return ""
    return _CONTROL.sub(" ", value).strip()[:limit]


def for_secs(value: Any) -> float | None:
    """An operator's ``for_secs``: a positive finite number, or None (ValueError if bad)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < math.inf):
        raise ValueError("for_secs must be a positive number of seconds")
    return float(value)
