"""Audit records end to end: an event stream's completion, and a flood of denials."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from helpers.deployment import deployment
from helpers.jsonlines import read_records
from helpers.procs import free_port, script, stop_process, wait_until


def test_stream_closed_by_its_reader_is_audited_with_its_events(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--audit-log", str(audit)]) as d:
        seen = 0
        with httpx.stream("GET", d.url("/sse-forever?interval_ms=10"), timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == 5:
                        break

        def completion() -> dict[str, object] | None:
            records = read_records(audit)
            ids = {r["request_id"] for r in records
                   if r["event"] == "decision" and r.get("path") == "/sse-forever"}
            done = [r for r in records if r["event"] == "completion" and r["request_id"] in ids]
            return done[0] if done else None

        wait_until(completion, 10, "the stream's completion record")
        record = completion()
        assert record is not None
        assert record["outcome"] == "cancelled"
        assert isinstance(record["events"], int) and record["events"] >= 5


DENYING_POLICY = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["GET /api/v1/check", "GET /mid"]
"""


def _denials(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(deny decision records, denials counted in denials_suppressed records)."""
    written = sum(1 for r in records if r["event"] == "decision" and r["decision"] == "deny")
    counted = sum(int(r["count"]) for r in records if r["event"] == "denials_suppressed")
    return written, counted


def test_a_flood_of_denials_cannot_push_the_trail_out(tmp_path: Path) -> None:
    """Past --audit-deny-limit an agent's denials are counted, not written one by one:
    the allowed request in the middle of the flood keeps its records, and shutdown
    writes the count."""
    audit = tmp_path / "audit.jsonl"
    debug = free_port()
    with deployment(tmp_path, policy=DENYING_POLICY, server_args=[
            "--audit-log", str(audit), "--audit-deny-limit", "20/600",
            "--debug-listen", f"127.0.0.1:{debug}"]) as d, httpx.Client(timeout=10) as client:
        for n in range(300):
            assert client.get(d.url(f"/secret/{n}")).status_code == 403
            if n == 150:
                assert client.get(d.url("/mid")).status_code != 403
        health = client.get(f"http://127.0.0.1:{debug}/debug/health").json()
        assert health["audit_denials_suppressed"] == 280
        assert health["denied_total"] == 300  # metrics still count every one
        assert d.server is not None
        stop_process(d.server)
    records = read_records(audit)
    assert _denials(records) == (20, 280)
    mid = {r["request_id"] for r in records if r.get("path") == "/mid"}
    assert [r["event"] for r in records if r.get("request_id") in mid] == [
        "decision", "completion"], "the allowed request amid the flood lost records"
    [summary] = [r for r in records if r["event"] == "denials_suppressed"]
    assert summary["agent"] == "default" and summary["limit"] == "20 per 600 s"
    assert summary["by"] == [{"tool": "signal-cli", "code": "denied", "count": 280}]
    # The operator's query for denies shows the count too, not only the 20.
    shown = subprocess.run([script("carapace-debug"), "audit", "--file", str(audit),
                            "--decision", "deny", "--limit", "0", "--json"],
                           capture_output=True, text=True, timeout=30, check=True)
    rows = json.loads(shown.stdout)["records"]
    assert len(rows) == 21 and "280 denial(s) not recorded" in rows[-1]["reason"]


def test_suppressed_denials_are_reported_when_their_window_ends(tmp_path: Path) -> None:
    """No shutdown and no later request needed: the count is written by itself."""
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, policy=DENYING_POLICY, server_args=[
            "--audit-log", str(audit), "--audit-deny-limit", "5/1"]) as d, \
            httpx.Client(timeout=10) as client:
        for n in range(60):
            assert client.get(d.url(f"/secret/{n}")).status_code == 403
        wait_until(lambda: sum(_denials(read_records(audit))) == 60, 10,
                   "every denial written or counted")
        written, counted = _denials(read_records(audit))
        assert counted > 0 and written < 60
