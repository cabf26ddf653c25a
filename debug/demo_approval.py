"""The demo's approval step: a call the policy marks waits until a person says yes.

The VM calls ``listAccounts`` (``jsonrpc_approve_methods`` in the demo's
policy); the call waits on the host while the demo, playing the operator,
finds it in ``GET /debug/approvals`` (what ``carapace-debug approvals``
shows), checks that signal-cli has not seen it, and approves it through
the debug API (what ``carapace-debug approve ID`` does). Then the call
completes and the audit log holds its ``approval`` record.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table
from rich.text import Text

GATED_METHOD = "listAccounts"
"""The call the demo's policy makes wait for a person."""
WAIT_FOR_PENDING = 15.0
"""Seconds the demo looks for the waiting call before it gives up."""


def _upstream_calls(upstream_url: str) -> int:
    stats = httpx.get(upstream_url + "/stats", timeout=5).json()
    return int(stats.get("rpc_calls", {}).get(GATED_METHOD, 0))


def _approval_record(audit_log: Path, approval_id: str) -> dict[str, Any]:
    try:
        lines = audit_log.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "approval" and str(record.get("approval_id")) == approval_id:
            return dict(record)
    return {}


def _find_pending(debug_url: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + WAIT_FOR_PENDING
    while time.monotonic() < deadline:
        doc = httpx.get(debug_url + "/debug/approvals", timeout=5).json()
        for item in doc.get("pending") or []:
            if item.get("tool") == "signal-cli":
                return dict(item)
        time.sleep(0.05)
    return None


def approval_step(agent_url: str, upstream_url: str, debug_url: str,
                  audit_log: Path) -> Table:
    """Run the gated call, approve it as an operator would, and tell what happened."""
    table = Table(title=f"1b · A call that needs a person: {GATED_METHOD} waits until the "
                  "host approves it", title_justify="left", title_style="bold", expand=True)
    table.add_column("step", style="cyan", ratio=3)
    table.add_column("what happened", ratio=8, overflow="fold")
    before = _upstream_calls(upstream_url)
    answer: dict[str, Any] = {}

    def call() -> None:
        try:
            r = httpx.post(agent_url + "/api/v1/rpc", timeout=30,
                           json={"jsonrpc": "2.0", "id": 1, "method": GATED_METHOD})
            answer["status"], answer["body"] = r.status_code, r.text
        except httpx.HTTPError as exc:
            answer["status"], answer["body"] = 0, str(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    pending = _find_pending(debug_url)
    if pending is None:
        table.add_row("the VM asks", Text("the call never showed up as pending", "bold red"))
        return table
    reached = _upstream_calls(upstream_url) > before
    table.add_row(f"the VM asks: JSON-RPC {GATED_METHOD}", Text.assemble(
        ("⏳ waiting for approval", "bold yellow"),
        f" · approval {pending['id']}: {pending['summary']}\n",
        ("!! signal-cli already got it" if reached else "signal-cli has not seen it",
         "red" if reached else "dim")))
    httpx.post(f"{debug_url}/debug/approvals/{pending['id']}/approve", timeout=5,
               json={"by": "demo", "reason": "shown in the demo"})
    table.add_row(f"the host: carapace-debug approve {pending['id']} --as demo",
                  Text.assemble(("✓ approved", "bold green"), " by demo"))
    caller.join(30)
    ok = answer.get("status") == 200
    result = str(answer.get("body", "")).strip()
    try:
        result = json.dumps(json.loads(result).get("result"), separators=(",", ":"))
    except (ValueError, AttributeError):
        pass
    table.add_row("the call completes", Text(f"{answer.get('status')}: {result[:120]}",
                                              "" if ok else "bold red"))
    record = _approval_record(audit_log, str(pending["id"]))
    waited = record.get("waited_ms")
    table.add_row("audit log", Text(
        f"outcome {record.get('outcome')} by {record.get('by')} after "
        f"{waited if not isinstance(waited, float) else round(waited)} ms "
        f"({record.get('by_source')})" if record else "no approval record found", "dim"))
    return table
