"""What an audit record holds: the keys every record has, and the fields of a
request's decision and completion records (all listed in the package doc).

Field order is the order keys appear in the file: the common keys, then the
decision's verdict, then what the request asked for.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from carapace.protocol.messages import CliRequest, HttpRequest

from .redaction import redact_argv, redact_json, redact_query

if TYPE_CHECKING:
    from ..cli_runner import ExitInfo
    from ..policy import AuditConfig, Decision
    from ..streams import ResponseSent

MAX_TEXT: Final = 2048
"""Longest VM-supplied string (a path, one argument, a cwd) kept in a record."""
MAX_ARGS: Final = 256
MAX_BODY: Final = 64 * 1024
MAX_TOOL: Final = 256
"""Longest tool name kept: the VM names tools, and a deny records any name."""


def utc_timestamp(now: float | None = None) -> str:
    """``2025-01-31T12:34:56.789Z``: ISO 8601, UTC, milliseconds."""
    dt = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def request_id(agent: str, session_id: bytes, rid: int) -> str:
    """A request id unique across agents and sessions: ``AGENT-SESSION8-ID``."""
    return f"{agent}-{session_id.hex()[:8]}-{rid}"


def truncate(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + "…[truncated]"


# ---------------------------------------------------------------------------
# Decision records


def base_fields(agent: str, session_id: bytes, rid: int, tool: str, kind: str,
                decision: Decision) -> dict[str, Any]:
    """The keys a request's decision and completion records share."""
    return {
        "request_id": request_id(agent, session_id, rid),
        "agent": agent,
        "tool": truncate(tool, MAX_TOOL),
        "kind": kind,
        "decision": decision.decision,
    }


def verdict_fields(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {"reason": decision.reason, "rule": decision.rule}
    if not decision.allow:
        out["code"] = decision.code or "denied"
    if decision.retry_after is not None:
        out["retry_after"] = decision.retry_after
    if decision.limit:
        out["limit"] = decision.limit
    if decision.needs_approval:
        out["approval_required"] = True
        out["approval_rule"] = decision.approval
    return out


def http_decision_fields(req: HttpRequest, cfg: AuditConfig,
                         decision: Decision) -> dict[str, Any]:
    target = req.target if isinstance(req.target, str) else repr(req.target)
    path, has_query, query = target.partition("?")
    fields = {
        **verdict_fields(decision),
        "method": truncate(str(req.method), 64),
        "path": truncate(path),
        "bytes_in": len(req.body),
    }
    if cfg.log_body and not decision.limit:  # over a parse limit: its size is in the reason
        if has_query:
            fields["query"] = truncate(redact_query(query, cfg.redact_patterns))
        fields.update(body_fields(req.body, cfg.redact_patterns))
    return fields


def cli_decision_fields(req: CliRequest, cfg: AuditConfig,
                        decision: Decision) -> dict[str, Any]:
    fields: dict[str, Any] = verdict_fields(decision)
    if cfg.log_argv and not decision.limit:  # over a parse limit: its size is in the reason
        args = [truncate(a.decode("utf-8", "backslashreplace")) for a in req.argv[:MAX_ARGS]]
        fields["argv"] = redact_argv(args, cfg.redact_patterns)
        if len(req.argv) > MAX_ARGS:
            fields["argv_truncated"] = len(req.argv)
    fields["cwd"] = truncate(req.cwd.decode("utf-8", "backslashreplace"))
    fields["peer_uid"] = req.peer_uid
    fields["peer_gid"] = req.peer_gid
    fields["peer_pid"] = req.peer_pid
    # A rate-limited deny is a plain Decision, without the resolved binary and cwd.
    binary = getattr(decision, "binary", "")
    if decision.allow and binary:
        fields["binary"] = binary
        fields["run_cwd"] = os.fsdecode(getattr(decision, "cwd", b"/"))
    return fields


def body_fields(body: bytes, patterns: Sequence[str]) -> dict[str, Any]:
    """A logged body: JSON redacted by name, text as it is, or a note why not logged."""
    if not body:
        return {}
    if len(body) > MAX_BODY:  # before parsing: a large body is not parsed a second time
        return {"body_note": f"body of {len(body)} bytes: over {MAX_BODY}, not logged"}
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        if patterns:
            return {"body_note": "not JSON: not logged, redact_patterns cannot be applied"}
        return {"body_text": truncate(body[:MAX_BODY].decode("utf-8", "replace"), MAX_BODY)}
    return {"body": redact_json(doc, patterns)}


# ---------------------------------------------------------------------------
# Completion records (None values are left out when written)


def http_completion_fields(sent: ResponseSent, bytes_in: int, aborted: str | None,
                           cancel_reason: str | None) -> dict[str, Any]:
    """From what the request's stream recorded sending; ``aborted``: None if the relay
    ran to its end, ``cancelled`` or ``error`` if not."""
    if aborted is not None:
        outcome = aborted
    else:
        outcome = "failed" if sent.failed else "completed"
    return {"outcome": outcome, "status": sent.status, "error": sent.failed,
            "cancelled": cancel_reason if aborted == "cancelled" else None,
            "bytes_in": bytes_in, "bytes_out": sent.body_bytes, "events": sent.events}


def cli_completion_fields(info: ExitInfo) -> dict[str, Any]:
    if info.cancelled is not None:
        outcome = "cancelled"
    elif info.error is not None or info.code is None:
        outcome = "failed"
    else:
        outcome = "completed"
    return {"outcome": outcome, "exit_code": info.code, "signal": info.signal,
            "timed_out": info.timed_out or None, "cancelled": info.cancelled,
            "error": info.error, "host_pid": info.pid, "bytes_in": info.bytes_in,
            "bytes_out": info.bytes_out}
