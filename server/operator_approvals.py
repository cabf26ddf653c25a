"""The operator API's approval endpoints (``operator_api.py`` routes them here).

- ``GET /debug/approvals``: ``{"pending": [...], "grants": [...]}``; each
  pending approval has ``id``, ``kind`` (``pending``), ``agent``, ``tool``,
  ``summary``, ``waiting_s``, ``request_id``, ``rule``, ``type``; each
  remembered grant ``id`` (``gN``), ``kind`` (``grant``), ``agent``,
  ``tool``, ``summary``, ``waiting_s`` (null), ``expires_in_s``, ``by``,
  ``reason``.
- ``POST /debug/approvals/ID/approve`` and ``POST /debug/approvals/ID/deny``
  with an optional JSON body ``{"for_secs": S, "reason": T, "by": NAME}``
  (``for_secs`` only when approving). 200 with the decided approval; 404 for
  an unknown or already decided id; 400 for a bad body. ``deny gN`` forgets
  a remembered grant.

``by`` is whatever name the operator gives: the API cannot tell who is
behind the debug token, so the audit trail marks it operator-asserted.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .approval_gate import for_secs, operator_text
from .approvals import ApprovalError, Approvals

PREFIX: Final = "/debug/approvals"
MAX_BODY: Final = 16 * 1024
"""Largest decision body read: a name, a reason and a number."""


def approvals_response(approvals: Approvals, method: str, path: str,
                       body: bytes) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """(status, JSON document, extra headers) for a request under ``/debug/approvals``."""
    rest = path[len(PREFIX):].strip("/")
    if not rest:
        if method != "GET":
            return 405, {"error": "use GET to list approvals"}, [("Allow", "GET")]
        return 200, approvals.listing(), []
    parts = rest.split("/")
    if len(parts) != 2 or parts[1] not in ("approve", "deny"):
        return 404, {"error": f"no such endpoint {path[:100]!r}; use POST "
                     f"{PREFIX}/ID/approve or {PREFIX}/ID/deny"}, []
    if method != "POST":
        return 405, {"error": "use POST to decide an approval"}, [("Allow", "POST")]
    approval_id, action = parts
    try:
        doc = json.loads(body) if body.strip() else {}
        if not isinstance(doc, dict):
            raise ValueError("the body must be a JSON object")
        unknown = sorted(set(doc) - {"for_secs", "reason", "by"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)[:100]}; "
                             "allowed: for_secs, reason, by")
        keep = for_secs(doc.get("for_secs"))
        if keep is not None and action == "deny":
            raise ValueError("for_secs applies to approve only")
    except ValueError as exc:
        return 400, {"error": str(exc)}, []
    by, reason = operator_text(doc.get("by")), operator_text(doc.get("reason"), 500)
    try:
        if action == "deny" and approval_id.startswith("g"):
            grant = approvals.revoke(approval_id)
            return 200, {"id": grant.id, "kind": "grant", "outcome": "revoked"}, []
        pending = approvals.decide(approval_id, approve=action == "approve", by=by,
                                   reason=reason, for_secs=keep)
    except ApprovalError as exc:
        return 404, {"error": str(exc)}, []
    verdict = pending.verdict
    assert verdict is not None
    return 200, {"id": str(pending.id), "kind": "pending", "agent": pending.agent,
                 "tool": pending.tool, "outcome": verdict.outcome, "by": verdict.by,
                 "reason": verdict.reason, "for_secs": keep}, []
