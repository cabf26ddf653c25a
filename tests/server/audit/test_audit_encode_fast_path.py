"""A record is encoded once and searched for secrets; the result is what redacting first gives."""

from __future__ import annotations

from typing import Any

import pytest

from carapace.server.audit.trail import AuditTrail

SECRET = "tok-3f9a8b7c6d5e4f3a2b1c"


def slow(trail: AuditTrail, record: dict[str, Any]) -> tuple[bytes, list[str]]:
    """Redact, then cap: the rule the fast path must match."""
    return trail.cap.encode(trail.redactor.redact(record))


def trail_with(*secrets: str) -> AuditTrail:
    trail = AuditTrail(None)
    trail.add_secrets(secrets)
    return trail


@pytest.mark.parametrize("record", [
    {"ts": "t", "event": "decision", "agent": "a", "path": "/api/v1/rpc", "bytes_in": 3},
    {"ts": "t", "event": "decision", "path": f"/x/{SECRET}/y"},
    {"ts": "t", "event": "decision", f"key-{SECRET}": 1},
    {"ts": "t", "event": "decision", "argv": ["--token", SECRET], "n": None},
    {"ts": "t", "event": "decision", "path": "a" * 5000 + SECRET},  # cut: full path
    {"ts": "t", "event": "decision", "path": "a" * 2040 + SECRET + "b" * 100},  # cut mid-secret
    {"ts": "t", "event": "decision", "text": "é ünïcode \u2028 and \"quotes\""},
])
def test_same_line_as_redacting_first(record: dict[str, Any]) -> None:
    trail = trail_with(SECRET, "Bearer abcdefghijkl")
    assert trail.redactor.verbatim_in_json
    data, cut = trail.encode(record)
    assert (data, cut) == slow(trail, record)
    assert SECRET.encode() not in data and b"abcdefghijkl" not in data
    assert SECRET[:12].encode() not in data  # no cut left half a secret behind


def test_secrets_json_would_escape_take_the_full_path() -> None:
    odd = 'pa"ss\\word-with-ü'
    trail = trail_with(odd)
    assert not trail.redactor.verbatim_in_json
    record = {"ts": "t", "event": "decision", "path": f"/x/{odd}"}
    data, _ = trail.encode(record)
    assert (data, []) == slow(trail, record)
    assert b"[REDACTED]" in data


def test_no_secrets_at_all() -> None:
    trail = AuditTrail(None)
    record = {"ts": "t", "event": "decision", "path": "/x"}
    assert trail.encode(record) == slow(trail, record)


def test_plain_fields_pass_the_caps_untouched_and_long_ones_are_still_cut() -> None:
    trail = AuditTrail(None)
    record = {"ts": "t", "event": "decision", "n": 3, "ok": True, "none": None, "f": 1.5,
              "method": "M" * 100, "path": "p" * 3000}
    data, cut = trail.encode(record)
    assert sorted(cut) == ["method", "path"]
    assert b'"n":3,"ok":true,"none":null,"f":1.5' in data
