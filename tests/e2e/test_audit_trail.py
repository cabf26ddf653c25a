"""The audit log of a running server: crash safety, rotation, failing closed."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from helpers.deployment import deployment, free_port
from helpers.jsonlines import read_records
from helpers.procs import script

POLICY = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["GET /api/v1/check", "GET /hang", "POST /api/v1/rpc"]
    timeout_secs: 30
"""


def records(path: Path) -> list[dict[str, object]]:
    return read_records(path)


def test_a_crash_loses_no_decided_record(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, policy=POLICY,
                    server_args=["--audit-log", str(audit), "--audit-fsync"]) as d:
        assert d.server is not None
        for n in range(20):
            r = httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version",
                                                       "id": n})
            assert r.status_code == 200
        sock = socket.create_connection(("127.0.0.1", d.tool_ports["signal-cli"]))
        try:
            sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 5
            while httpx.get(d.upstream_url + "/stats").json()["paths"].get("/hang", 0) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            d.server.kill()  # SIGKILL: no shutdown code runs
            d.server.wait()
        finally:
            sock.close()
    recs = records(audit)
    decided = [r for r in recs if r["event"] == "decision"]
    # 1 readiness probe + 20 calls + the hanging request, all decided and recorded.
    assert len(decided) == 22
    assert decided[-1]["path"] == "/hang"
    assert not any(r["event"] == "completion" and r["request_id"] == decided[-1]["request_id"]
                   for r in recs)


def test_rotation_by_size_keeps_the_configured_backups(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, policy=POLICY,
                    server_args=["--audit-log", str(audit), "--audit-max-bytes", "2000",
                                 "--audit-backups", "2"]) as d:
        for _ in range(30):
            assert httpx.get(d.url("/api/v1/check")).status_code == 200
        deadline = time.monotonic() + 5
        while sum(1 for r in records(audit) if r["event"] == "completion") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    ids: list[int] = []
    for name in reversed(names):  # oldest first
        path = tmp_path / name
        assert path.stat().st_size <= 2000
        for rec in records(path):  # every line whole
            if rec["event"] == "decision":
                ids.append(int(str(rec["request_id"]).rsplit("-", 1)[1]))
    assert ids == sorted(ids)  # decisions in order across files
    assert ids[-1] == 31  # the readiness probe was 1, then 30 requests


def test_unwritable_audit_log_stops_the_server_at_start(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("x" * 32 + "\n")
    policy = tmp_path / "p.yaml"
    policy.write_text("tools: {}\n")
    done = subprocess.run(
        [script("carapace-server"), "--listen", f"127.0.0.1:{free_port()}", "--policy",
         str(policy), "--token-file", str(token), "--audit-log",
         str(tmp_path / "missing-dir" / "audit.jsonl")],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "cannot open the audit log" in done.stderr and "missing-dir" in done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_requests_are_refused_when_the_audit_log_cannot_be_written(tmp_path: Path) -> None:
    """Fail closed: a request that cannot be recorded is not run."""
    with deployment(tmp_path, policy=POLICY, wait=False,
                    server_args=["--audit-log", "/dev/full", "--audit-max-bytes", "0"]) as d:
        deadline = time.monotonic() + 15
        while True:
            r = httpx.get(d.url("/api/v1/check"))
            if r.status_code != 502 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "audit_unavailable"
        stats = httpx.get(d.upstream_url + "/stats").json()
        assert stats["total_requests"] == 1  # only this /stats read
        assert d.server is not None and "cannot write the audit log" in d.server.stderr_text()
