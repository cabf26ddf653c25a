"""What an audit record holds: the keys every record has, and the fields of a
request's decision and completion records (all listed in the package doc).

Field order is the order keys appear in the file: the common keys, then the
decision's verdict, then what the request asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from carapace.protocol.messages import CliRequest, HttpRequest

from .caps import KEY_LIMITS, MAX_FIELD_BYTES, cut_text
from .redaction import redact_argv, redact_json, redact_query

if TYPE_CHECKING:
    from ..cli_runner import ExitInfo
    from ..policy import AuditConfig, Decision
    from ..streams import ResponseSent

MAX_TEXT: Final = MAX_FIELD_BYTES
"""Longest VM-supplied string (a path, one argument, a cwd) kept whole in a record, in
bytes as written; :mod:`.caps` cuts every string when the record is written."""
MAX_ARGS: Final = 256
MAX_BODY: Final = 64 * 1024
MAX_BODY_DEPTH: Final = 64
"""Deepest nesting of a logged JSON body: far beyond any real API's documents, far
below the recursion limit that redacting and writing it would hit."""
MAX_TOOL: Final = KEY_LIMITS["tool"]
"""Longest tool name kept, in bytes as written: the VM names tools, a deny records any
name, and the deny throttle remembers up to 20 of them per agent."""


def utc_timestamp(now: float | None = None) -> str:
    """``2025-01-31T12:34:56.789Z``: ISO 8601, UTC, milliseconds."""
    if now is None:
        now = time.time()
    # Rounded to the microsecond first, as datetime.fromtimestamp does.
    frac, whole = math.modf(now)
    second, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    elif us < 0:
        second, us = second - 1, us + 1_000_000
    return f"{_second_prefix(second)}{us // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_prefix(second: int) -> str:
    """``2025-01-31T12:34:56.``: the part of every timestamp within one second (two
    records per request, so formatting it once a second is what most of them cost)."""
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def request_id(agent: str, session_id: bytes, rid: int) -> str:
    """A request id unique across agents and sessions: ``AGENT-SESSION8-ID``."""
    return f"{agent}-{session_id.hex()[:8]}-{rid}"


def truncate(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` bytes as written, with the marker of :mod:`.caps`."""
    return cut_text(text, limit) or text


# ---------------------------------------------------------------------------
# Decision records


def base_fields(agent: str, session_id: bytes, rid: int, tool: str, kind: str,
                decision: Decision) -> dict[str, Any]:
    """The keys a request's decision and completion records share."""
    return {
        "request_id": request_id(agent, session_id, rid),
        "agent": agent,
        "tool": tool,
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
        "method": str(req.method),
        "path": path,
        "bytes_in": len(req.body),
    }
    if cfg.log_body and not decision.limit:  # over a parse limit: its size is in the reason
        if has_query:
            fields["query"] = redact_query(query, cfg.redact_patterns)
        fields.update(body_fields(req.body, cfg.redact_patterns))
    return fields


def cli_decision_fields(req: CliRequest, cfg: AuditConfig,
                        decision: Decision) -> dict[str, Any]:
    fields: dict[str, Any] = verdict_fields(decision)
    if cfg.log_argv and not decision.limit:  # over a parse limit: its size is in the reason
        args = [a.decode("utf-8", "backslashreplace") for a in req.argv[:MAX_ARGS]]
        fields["argv"] = redact_argv(args, cfg.redact_patterns)
        if len(req.argv) > MAX_ARGS:
            fields["argv_truncated"] = len(req.argv)
    fields["cwd"] = req.cwd.decode("utf-8", "backslashreplace")
    # What the VM's agent says it read from SO_PEERCRED: a claim, not a fact the host saw.
    fields["vm_claimed_peer_uid"] = req.peer_uid
    fields["vm_claimed_peer_gid"] = req.peer_gid
    fields["vm_claimed_peer_pid"] = req.peer_pid
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
        return {"body_text": body.decode("utf-8", "replace")}
    if _deeper_than(doc, MAX_BODY_DEPTH):
        return {"body_note": f"JSON body nested over {MAX_BODY_DEPTH} levels: not logged"}
    return {"body": redact_json(doc, patterns)}


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests lists and objects more than ``limit`` deep (no recursion)."""
    level = [doc]
    for _ in range(limit + 1):
        level = [child for node in level if isinstance(node, list | dict)
                 for child in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return False
    return True


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
