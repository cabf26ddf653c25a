"""Size caps of audit records, the deny byte budget, and the VM's claimed peer credentials."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol.messages import CliRequest, HttpRequest
from carapace.server.audit import REDACTED, AuditLog, AuditTrail, DenyThrottle
from carapace.server.audit.caps import (
    DEFAULT_MAX_RECORD_BYTES,
    MAX_FIELD_BYTES,
    MIN_RECORD_BYTES,
    RecordCap,
    cut_text,
    encode_record,
)
from carapace.server.policy import decide_cli, decide_http, load_policy

POLICY = load_policy("""\
tools:
  op:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
  web:
    type: http
    upstream: "http://127.0.0.1:1"
    audit: {log_body: true}
""")
SESSION = b"\0" * 16


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def marker(full: bytes) -> str:
    return f"…[truncated: {len(full)} bytes, sha256 {hashlib.sha256(full).hexdigest()}]"


def test_a_field_is_measured_as_written_and_cut_with_a_checkable_marker() -> None:
    emoji = "😀" * 2048  # 2,048 characters, 24,576 bytes as written
    cut = cut_text(emoji, MAX_FIELD_BYTES)
    assert cut is not None and cut.endswith(marker(emoji.encode()))
    assert len(json.dumps(cut)) - 2 <= MAX_FIELD_BYTES
    assert cut.startswith("😀" * 100)
    assert cut_text("a" * MAX_FIELD_BYTES, MAX_FIELD_BYTES) is None  # fits exactly
    assert cut_text("\n" * 1025, MAX_FIELD_BYTES) is not None  # 2 bytes each as written


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=40), st.one_of(
    st.text(max_size=3000), st.lists(st.text(max_size=3000), max_size=40),
    st.integers(), st.none()), max_size=12))
def test_no_record_is_ever_over_the_cap(extra: dict[str, Any]) -> None:
    cap = RecordCap(MIN_RECORD_BYTES)
    record = {"ts": "2026-01-01T00:00:00.000Z", "event": "decision", "agent": "vm1",
              **{f"x{k}": v for k, v in extra.items()}}
    data, cut = cap.encode(record)
    assert len(data) <= MIN_RECORD_BYTES
    doc = json.loads(data)
    assert doc["event"] == "decision" and doc["agent"] == "vm1"
    assert sorted(cut) == doc.get("truncated", [])
    assert "*" not in cut


def test_a_list_too_large_as_a_whole_is_cut_from_its_full_json() -> None:
    argv = ["😀" * 2048] * 256  # the attack: 6 MiB as written
    data, cut = RecordCap().encode({"event": "decision", "agent": "vm1", "argv": argv})
    assert len(data) <= DEFAULT_MAX_RECORD_BYTES and cut == ["argv"]
    doc = json.loads(data)
    whole = json.dumps(argv, ensure_ascii=False, separators=(",", ":")).encode()
    assert doc["argv"].startswith('["😀') and doc["argv"].endswith(marker(whole))
    assert doc["truncated"] == ["argv"]


@pytest.mark.parametrize("args", [17, 40, 300])
def test_a_record_just_over_the_cap_keeps_what_makes_it_findable(args: int) -> None:
    """Cutting the large field adds a ``truncated`` entry; the record must still fit
    without cutting the small fields into markers longer than they were, or giving up
    on the record as a whole (which would lose its request id, agent and decision)."""
    record = {"ts": "2026-12-06T12:00:00.000Z", "event": "decision", "request_id": "r-1",
              "agent": "vm1", "kind": "cli", "tool": "sleeper", "decision": "allow",
              "reason": "allowed", "argv": ["a" * 1024] * args, "cwd": "/",
              "vm_claimed_peer_uid": 0}
    data, cut = RecordCap().encode(record)
    doc = json.loads(data)
    assert len(data) <= DEFAULT_MAX_RECORD_BYTES and cut == ["argv"]
    assert {k: doc[k] for k in ("request_id", "agent", "decision", "tool", "cwd")} == {
        "request_id": "r-1", "agent": "vm1", "decision": "allow", "tool": "sleeper",
        "cwd": "/"}
    assert doc["vm_claimed_peer_uid"] == 0 and doc["truncated"] == ["argv"]


def test_the_cap_flag_has_a_floor() -> None:
    with pytest.raises(ValueError, match="at least"):
        RecordCap(MIN_RECORD_BYTES - 1)


async def test_secrets_are_redacted_before_anything_is_cut(tmp_path: Path) -> None:
    """A secret across the cut point must not leave its first half in the record."""
    secret = "S" * 40
    trail = AuditTrail(AuditLog(tmp_path / "a.jsonl"))
    trail.add_secrets([secret])
    arg = ("a" * (MAX_FIELD_BYTES - 120) + secret + "b" * 500).encode()
    req = CliRequest(id=1, tool="op", argv=(arg,), cwd=b"/", env=(), tty=(False,) * 3)
    await trail.cli("vm1", SESSION, req, POLICY,
                    decide_cli(POLICY, "vm1", "op", [arg], b"/", [])).decided()
    text = (tmp_path / "a.jsonl").read_text()
    assert "SSSSSSSS" not in text
    [rec] = [json.loads(line) for line in lines(tmp_path / "a.jsonl")]
    redacted = arg.decode().replace(secret, REDACTED).encode()
    assert rec["argv"][0].endswith(marker(redacted)) and rec["truncated"] == ["argv"]


async def test_a_huge_tool_name_and_target_are_cut_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trail = AuditTrail(AuditLog(tmp_path / "a.jsonl"), deny_limit=(0, 10.0), deny_bytes=0)
    for rid in range(1, 4):
        tool, target = "t\u2028" * 100_000, "/" + "\x00" * 100_000
        req = HttpRequest(id=rid, tool=tool, method="GET", target=target, headers=(), body=b"")
        decision = decide_http(POLICY, "vm1", tool, "GET", target, [], b"")
        with caplog.at_level(logging.WARNING, "carapace.server"):
            await trail.http("vm1", SESSION, req, POLICY, decision).decided()
    recs = lines(tmp_path / "a.jsonl")
    assert len(recs) == 3 and all(len(r) < DEFAULT_MAX_RECORD_BYTES for r in recs)
    assert json.loads(recs[0])["truncated"] == ["path", "tool"]
    assert trail.truncated_records == 3
    cut_logs = [r for r in caplog.records if "to the size caps" in r.getMessage()]
    assert len(cut_logs) == 1  # once a minute, not once a record


def test_deny_byte_budget_counts_past_it_and_says_so() -> None:
    throttle = DenyThrottle(100, 10.0, max_bytes=1000)
    admitted = [throttle.admit("vm1", "op", "denied", 0.1 * n, f"ts{n}", 300)
                for n in range(6)]
    assert admitted == [True, True, True, False, False, False]
    assert throttle.admit("vm2", "op", "denied", 0.5, "t", 300)  # its own budget
    assert throttle.suppressed_bytes == 900
    [summary] = throttle.due(0, everything=True)
    assert summary["count"] == 3 and summary["suppressed_bytes"] == 900
    assert summary["bytes_limit"] == "1000 bytes per 10 s"
    assert "byte budget of 1000 bytes per 10 s (--audit-deny-bytes)" in summary["reason"]
    assert "--audit-deny-limit" not in summary["reason"]
    # the window slides: at 10.05 the first record's bytes have left it
    assert throttle.admit("vm1", "op", "denied", 10.05, "t", 300)
    throttle.charge("vm1", 10.06, 700)  # a summary uses the budget up too
    assert not throttle.admit("vm1", "op", "denied", 10.07, "t", 1)
    with pytest.raises(ValueError):
        DenyThrottle(5, 10.0, max_bytes=-1)


async def test_summaries_of_a_long_flood_stay_within_the_byte_budget(tmp_path: Path) -> None:
    """A deny admitted after suppressed ones writes a summary first: those summaries
    use the budget too, so they cannot become a flood of their own."""
    path = tmp_path / "a.jsonl"
    trail = AuditTrail(AuditLog(path), deny_limit=(1000, 3600.0), deny_bytes=20_000)
    for rid in range(1, 400):
        req = HttpRequest(id=rid, tool=f"tool-{rid}" + "x" * 200, method="GET", target="/",
                          headers=(), body=b"")
        decision = decide_http(POLICY, "vm1", req.tool, "GET", "/", [], b"")
        await trail.http("vm1", SESSION, req, POLICY, decision).decided()
    assert path.stat().st_size <= 20_000 + DEFAULT_MAX_RECORD_BYTES


async def test_peer_credentials_are_recorded_as_the_vms_claim(tmp_path: Path) -> None:
    trail = AuditTrail(AuditLog(tmp_path / "a.jsonl"))
    req = CliRequest(id=1, tool="op", argv=(b"x",), cwd=b"/", env=(), tty=(False,) * 3,
                     peer_uid=0, peer_gid=0, peer_pid=1)
    await trail.cli("vm1", SESSION, req, POLICY,
                    decide_cli(POLICY, "vm1", "op", [b"x"], b"/", [])).decided()
    [rec] = [json.loads(line) for line in lines(tmp_path / "a.jsonl")]
    assert (rec["vm_claimed_peer_uid"], rec["vm_claimed_peer_gid"],
            rec["vm_claimed_peer_pid"]) == (0, 0, 1)
    assert not any(k.startswith("peer_") for k in rec)


def test_encode_record_is_one_ascii_line() -> None:
    data = encode_record({"a": "x\u2028y\n😀"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and data.isascii()


async def test_a_deeply_nested_body_is_noted_not_logged(tmp_path: Path) -> None:
    """Redacting and writing it would recurse past Python's limit."""
    trail = AuditTrail(AuditLog(tmp_path / "a.jsonl"))
    for rid, body in enumerate([b"[" * 900 + b"]" * 900, b'{"a":' * 60 + b"1" + b"}" * 60], 1):
        req = HttpRequest(id=rid, tool="web", method="POST", target="/", headers=(), body=body)
        await trail.http("vm1", SESSION, req, POLICY,
                         decide_http(POLICY, "vm1", "web", "POST", "/", [], body)).decided()
    deep, shallow = [json.loads(line) for line in lines(tmp_path / "a.jsonl")]
    assert "nested over 64 levels" in deep["body_note"] and "body" not in deep
    assert "body" in shallow


@pytest.mark.parametrize(("args", "env"), [
    (["--audit-max-record-bytes", "100"], {}),
    ([], {"CARAPACE_AUDIT_MAX_RECORD_BYTES": "100"}),
    ([], {"CARAPACE_AUDIT_DENY_BYTES": "-1"}),
])
def test_the_new_flags_and_their_env_vars_are_checked(args: list[str],
                                                      env: dict[str, str]) -> None:
    from click.testing import CliRunner

    from carapace.server.main import main

    result = CliRunner().invoke(main, ["--token-file", "/nonexistent", *args], env=env)
    assert result.exit_code == 2
    assert "audit-max-record-bytes" in result.output or "audit-deny-bytes" in result.output


def test_the_documented_retention_bound_holds_for_a_flood_at_the_highest_rate() -> None:
    """DEPLOYMENT.md: one agent writes at most 65,536 + 2 x 16,384 bytes in any 10 s,
    however it times maximal denials; summaries are charged as the trail does."""
    from carapace.server.audit.throttle import DEFAULT_DENY_BYTES, DEFAULT_DENY_LIMIT

    throttle = DenyThrottle(*DEFAULT_DENY_LIMIT, max_bytes=DEFAULT_DENY_BYTES)
    big = DEFAULT_MAX_RECORD_BYTES
    writes: list[tuple[float, int]] = []
    for step in range(20_000):  # 200 s, a maximal deny every 10 ms
        now = step / 100
        if throttle.admit("vm1", "gh", "unknown_tool", now, "t", big):
            for _ in throttle.due(now, agent="vm1"):  # a summary first, as the trail does
                throttle.charge("vm1", now, big)
                writes.append((now, big))
            writes.append((now, big))
        if step % 100 == 0:  # the server's once-a-second flush
            for _ in throttle.due(now):
                throttle.charge("vm1", now, big)
                writes.append((now, big))
    worst = max(sum(n for t, n in writes if start <= t < start + 10)
                for start in (s / 100 for s in range(0, 19_000, 10)))
    assert worst <= DEFAULT_DENY_BYTES + 2 * big
    assert worst >= DEFAULT_DENY_BYTES  # and the budget is used, not starved


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=600), st.integers(min_value=120, max_value=700))
def test_a_cut_is_a_prefix_and_its_marker_within_the_limit(text: str, limit: int) -> None:
    cut = cut_text(text, limit)
    if cut is None:
        assert len(json.dumps(text)) - 2 <= limit
        return
    mark = marker(text.encode("utf-8", "surrogatepass"))
    assert cut.endswith(mark) and text.startswith(cut[: -len(mark)])
    assert len(json.dumps(cut)) - 2 <= limit
    kept = len(cut) - len(mark)  # and no shorter than it has to be
    assert len(json.dumps(text[: kept + 1] + mark)) - 2 > limit
