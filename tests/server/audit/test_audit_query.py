"""carapace-debug audit: queries over the JSON-lines audit trail (and its rotated files),
written here by hand and by a real server."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.deployment import Deployment, deployment, rpc
from helpers.jsonlines import json_lines
from helpers.procs import free_port, poll, run_debug, script, start_process, stop_process

POLICY = textwrap.dedent(
    """\
    tools:
      signal-cli:
        type: http
        upstream: "http://127.0.0.1:{upstream_port}"
        timeout_secs: 5
        jsonrpc_allow_methods: [version, send, listAccounts]
    """
)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A real server writing its audit log, for the query that reads it back."""
    tmp = tmp_path_factory.mktemp("audit-query")
    audit_log = tmp / "audit.log"
    debug_port = free_port()
    with deployment(tmp, policy=POLICY, server_args=[
            "--audit-log", str(audit_log), "--debug-listen", f"127.0.0.1:{debug_port}"]) as d:
        d.extra["audit_log"] = audit_log
        d.debug_port = debug_port
        yield d


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pair(when: datetime, rid: int, tool: str, decision: str, reason: str,
         agent: str = "default", kind: str = "http", **done: Any) -> list[dict[str, Any]]:
    base = {"request_id": rid, "agent": agent, "tool": tool, "kind": kind}
    records = [{"ts": iso(when), "event": "decision", **base, "decision": decision,
                "reason": reason, "method": "POST", "target": "/api/v1/rpc"}]
    if done:
        records.append({"ts": iso(when + timedelta(milliseconds=40)), "event": "completion",
                        **base, "decision": decision, **done})
    return records


@pytest.fixture()
def audit_file(tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    path = tmp_path / "audit.log"
    rotated = [
        *pair(old, 1, "signal-cli", "allow", "method version allowed", status=200,
              duration_ms=12, bytes=66),
        *pair(old + timedelta(seconds=1), 2, "op", "deny", "argv 'item delete x' matches "
              "tools.op.argv_deny_patterns[0]", kind="cli"),
    ]
    (tmp_path / "audit.log.1").write_text("".join(json.dumps(r) + "\n" for r in rotated))
    recent = [
        *pair(now - timedelta(minutes=2), 3, "signal-cli", "allow", "method send allowed",
              status=200, duration_ms=30, bytes=120),
        *pair(now - timedelta(minutes=1), 4, "signal-cli", "deny",
              'the call: method "deleteAccount" is not allowed', status=403, duration_ms=1,
              bytes=0),
        *pair(now - timedelta(seconds=30), 5, "signal-cli", "allow", "GET without a body",
              status=200, duration_ms=310, bytes=480, events=3),
    ]
    lines = [json.dumps(r) for r in recent]
    lines.insert(2, "{not json")
    lines.insert(4, "[1, 2, 3]")
    path.write_text("\n".join(lines) + "\n")
    return path


def audit(path: Path, *args: str) -> Any:
    result = run_debug("audit", "--file", str(path), *args)
    assert result.returncode == 0, result.stderr
    return result


def test_finds_the_deny_with_its_reason(audit_file: Path) -> None:
    result = audit(audit_file, "--decision", "deny", "--json")
    doc = json.loads(result.stdout)
    assert doc["matched"] == 2 and doc["corrupt_lines"] == 2
    assert [r["request_id"] for r in doc["records"]] == [2, 4]
    deny = doc["records"][1]
    assert deny["tool"] == "signal-cli" and deny["decision"] == "deny"
    assert "deleteAccount" in deny["reason"]
    assert deny["completion"]["status"] == 403
    assert "skipped 2 corrupt line(s)" in result.stderr


def test_tool_since_and_limit(audit_file: Path) -> None:
    doc = json.loads(audit(audit_file, "--tool", "op", "--json").stdout)
    assert [(r["request_id"], r["decision"], r["kind"]) for r in doc["records"]] == [
        (2, "deny", "cli")]
    doc = json.loads(audit(audit_file, "--since", "1h", "--json").stdout)
    assert [r["request_id"] for r in doc["records"]] == [3, 4, 5]
    doc = json.loads(audit(audit_file, "--since", "24h", "--json").stdout)
    assert [r["request_id"] for r in doc["records"]] == [1, 2, 3, 4, 5]
    since = iso(datetime.now(UTC) - timedelta(seconds=90))
    doc = json.loads(audit(audit_file, "--since", since, "--json").stdout)
    assert [r["request_id"] for r in doc["records"]] == [4, 5]
    doc = json.loads(audit(audit_file, "--limit", "1", "--json").stdout)
    assert doc["matched"] == 5 and [r["request_id"] for r in doc["records"]] == [5]
    assert doc["records"][0]["completion"]["events"] == 3
    assert doc["files"] == [str(audit_file) + ".1", str(audit_file)]


def test_table_output(audit_file: Path) -> None:
    result = audit(audit_file, "--decision", "deny")
    assert "deleteAccount" in result.stdout
    assert "deny" in result.stdout and "403" in result.stdout
    assert "2 of 2 matching request(s)" in result.stdout
    assert "1 rotated file(s)" in result.stdout


def test_bad_arguments_and_missing_file(tmp_path: Path) -> None:
    result = run_debug("audit", "--file", str(tmp_path / "missing.log"))
    assert result.returncode == 2 and "--audit-log" in result.stderr
    result = run_debug("audit", "--file", str(tmp_path / "x"), "--since", "yesterday")
    assert result.returncode == 2 and "5m, 1h, 24h" in result.stderr


def test_follow_prints_new_records(audit_file: Path) -> None:
    proc = start_process([script("carapace-debug"), "audit", "--file", str(audit_file),
                          "--follow", "--json", "--decision", "deny"])
    try:
        poll(lambda: len(json_lines(proc)) == 2, what="the existing denies")
        new = pair(datetime.now(UTC), 6, "signal-cli", "deny", "rate limited")
        new += pair(datetime.now(UTC), 7, "signal-cli", "allow", "fine")
        with audit_file.open("a") as f:
            for record in new:
                f.write(json.dumps(record) + "\n")
        lines = poll(lambda: len(json_lines(proc)) >= 3 and json_lines(proc), 10,
                     "the appended deny")
        assert lines[2]["request_id"] == 6 and lines[2]["reason"] == "rate limited"
        # rotation: the writer renames the file and starts a new one
        audit_file.rename(audit_file.with_name("audit.log.2"))
        audit_file.write_text(json.dumps(
            pair(datetime.now(UTC), 8, "op", "deny", "after rotation")[0]) + "\n")
        lines = poll(lambda: len(json_lines(proc)) >= 4 and json_lines(proc), 10,
                     "the deny after rotation")
        assert lines[3]["request_id"] == 8
        assert all(line["decision"] == "deny" for line in lines)
    finally:
        stop_process(proc)


def test_a_record_still_being_written_is_neither_corrupt_nor_lost(audit_file: Path) -> None:
    """The server's one write of a record can reach the file in two pieces: the
    first piece is not a corrupt line, and --follow prints the record once whole."""
    line = json.dumps(pair(datetime.now(UTC), 6, "signal-cli", "deny", "half written")[0])
    with audit_file.open("a") as f:
        f.write(line[:40])
    doc = json.loads(audit(audit_file, "--json").stdout)
    assert doc["corrupt_lines"] == 2 and doc["matched"] == 5  # the fixture's two, no third
    proc = start_process([script("carapace-debug"), "audit", "--file", str(audit_file),
                          "--follow", "--json", "--decision", "deny"])
    try:
        poll(lambda: len(json_lines(proc)) == 2, what="the existing denies")
        with audit_file.open("a") as f:
            f.write(line[40:] + "\n")
        lines = poll(lambda: len(json_lines(proc)) >= 3 and json_lines(proc), 10,
                     "the record completed after the first read")
        assert lines[2]["request_id"] == 6 and lines[2]["reason"] == "half written"
    finally:
        stop_process(proc)
    assert proc.stderr_text().count("corrupt") == 1  # the fixture's two, warned at start


def test_real_server_audit_log_has_the_deny(dep: Deployment) -> None:
    path = dep.extra["audit_log"]
    assert isinstance(path, Path)
    assert rpc(dep, "deleteAccount").status_code == 403
    assert rpc(dep, "version").status_code == 200
    r = httpx.get(dep.url("/sse?count=2&interval_ms=5"), timeout=10)
    assert r.text.count("data:") == 2

    def denies() -> list[dict[str, Any]] | None:
        if not path.exists():
            return None
        doc = json.loads(audit(path, "--decision", "deny", "--tool", "signal-cli",
                               "--since", "5m", "--json").stdout)
        return doc["records"] or None

    deny = poll(denies, 10, "a deny in the server's audit log")[-1]
    assert deny["agent"] == "default" and deny["kind"] == "http"
    assert "deleteAccount" in deny["reason"]
    doc = json.loads(audit(path, "--decision", "allow", "--since", "5m", "--json").stdout)
    assert doc["corrupt_lines"] == 0
    done = [r for r in doc["records"] if r.get("completion")]
    assert any(r["completion"].get("status") == 200 for r in done)
    # the id the server logs finds exactly that request
    doc = json.loads(audit(path, "--id", str(deny["request_id"]), "--json").stdout)
    assert [r["request_id"] for r in doc["records"]] == [deny["request_id"]]
    table = audit(path, "--decision", "deny", "--since", "5m").stdout
    assert "deleteAccount" in table and str(deny["request_id"]) in table


# ------------------------------------------------- without --file: where the log is found


@pytest.fixture()
def no_deployed_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The deploy kit's path pointed at a file that does not exist (this machine might
    have a real /var/log/carapace), and no CARAPACE_* in the environment."""
    from carapace.debug import audit_source

    missing = tmp_path / "deployed" / "audit.jsonl"
    monkeypatch.setattr(audit_source, "DEPLOYED_AUDIT_LOG", str(missing))
    for name in ("CARAPACE_AUDIT_LOG", "CARAPACE_DEBUG_LISTEN", "CARAPACE_DEBUG_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    return missing


def debug_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    """carapace-debug in this process, so that a test can move the deploy kit's path."""
    from click.testing import CliRunner

    from carapace.debug.main import cli

    return CliRunner().invoke(cli, list(args), env=env)


def test_audit_reads_CARAPACE_AUDIT_LOG_without_file(audit_file: Path) -> None:
    result = run_debug("audit", "--decision", "deny",
                       env={"CARAPACE_AUDIT_LOG": str(audit_file)})
    assert result.returncode == 0, result.stderr
    assert "deleteAccount" in result.stdout and "(found by CARAPACE_AUDIT_LOG)" in result.stdout
    doc = json.loads(run_debug("audit", "--json",
                               env={"CARAPACE_AUDIT_LOG": str(audit_file)}).stdout)
    assert doc["file"] == str(audit_file) and doc["found_by"] == "CARAPACE_AUDIT_LOG"


def test_audit_reads_the_deploy_kits_path_next(audit_file: Path, no_deployed_log: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from carapace.debug import audit_source

    monkeypatch.setattr(audit_source, "DEPLOYED_AUDIT_LOG", str(audit_file))
    nobody = f"127.0.0.1:{free_port()}"
    result = debug_cli("audit", "--json", "--debug", nobody,
                       env={"CARAPACE_AUDIT_LOG": str(no_deployed_log)})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["file"] == str(audit_file) and doc["found_by"] == "the deploy kit's path"
    assert doc["matched"] == 5
    # the variable named a file that is not there: said, not silently skipped
    assert f"CARAPACE_AUDIT_LOG={no_deployed_log} cannot be read (no such file)" in result.stderr


def test_audit_asks_the_server_last(dep: Deployment, no_deployed_log: Path) -> None:
    assert rpc(dep, "deleteAccount").status_code == 403
    path = dep.extra["audit_log"]
    result = debug_cli("audit", "--json", "--decision", "deny", "--since", "5m", "--debug",
                       f"127.0.0.1:{dep.debug_port}")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["file"] == str(path)
    assert doc["found_by"] == f"the server at 127.0.0.1:{dep.debug_port}"
    assert any("deleteAccount" in r["reason"] for r in doc["records"])


def test_audit_names_all_three_places_when_none_has_a_log(no_deployed_log: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    result = debug_cli("audit", "--since", "5m", "--debug", nobody)
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "no audit log found" in err
    assert "1. CARAPACE_AUDIT_LOG: not set" in err
    assert f"2. {no_deployed_log} (the deploy kit's path): no such file" in err
    assert f"3. the debug listener at {nobody}: cannot reach" in err
    assert "--file F" in err and "Traceback" not in err


def test_a_server_without_an_audit_log_says_so(no_deployed_log: Path) -> None:
    from carapace.debug.audit_source import AuditLogNotFound, find_audit_log
    from carapace.debug.client import DebugClient

    class NoAuditServer(DebugClient):
        def get_json(self, path: str) -> dict[str, Any]:
            assert path == "/debug/health"
            return {"status": "ok", "audit_log": None}

    with pytest.raises(AuditLogNotFound) as caught:
        find_audit_log(None, NoAuditServer("127.0.0.1", 1))
    assert "3. the debug listener at 127.0.0.1:1: the server runs without --audit-log" in (
        caught.value.message)
