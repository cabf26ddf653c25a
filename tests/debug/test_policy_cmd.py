"""``carapace-debug policy check`` and ``lint`` through click's CliRunner."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from carapace.debug.policy_cmd import policy

ANCHORS = Path(__file__).resolve().parents[2].parent / "shared" / "anchor-policies"

OP = """
tools:
  op:
    type: cli
    binary: /usr/bin/op
    argv_allow_patterns: ["item get *", "whoami"]
    argv_deny_patterns: ["item delete *"]
    env_inject: {OP_SERVICE_ACCOUNT_TOKEN: "ops_secret_value_0123456789"}
    timeout_secs: 30
  sig:
    type: http
    upstream: "http://127.0.0.1:18080"
    allow_paths: ["POST /api/v1/rpc", "GET /api/v1/events"]
    jsonrpc_allow_methods: [send, version]
    jsonrpc_param_filters:
      send: {field: recipient, allow_patterns: ["+1*"]}
    timeout_secs: 30
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(OP)
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(policy, list(args), env=env or {"CARAPACE_POLICY_FILE": ""})
    return result.exit_code, result.output


def test_check_cli_allow_json(policy_file: Path) -> None:
    code, out = invoke("check", str(policy_file), "--tool", "op", "--json", "--",
                       "item", "get", "foo")
    assert code == 0
    assert json.loads(out) == {
        "decision": "allow",
        "reason": "the arguments match an allow pattern; runs in /",
        "rule": 'tools.op.argv_allow_patterns[0] "item get *"',
    }


def test_check_cli_deny_json(policy_file: Path) -> None:
    code, out = invoke("check", str(policy_file), "--tool", "op", "--json", "--",
                       "item", "delete", "foo")
    assert code == 1
    doc = json.loads(out)
    assert set(doc) == {"decision", "reason", "rule"}
    assert doc["decision"] == "deny"
    assert doc["rule"] == 'tools.op.argv_deny_patterns[0] "item delete *"'


def test_check_cli_human(policy_file: Path) -> None:
    code, out = invoke("check", str(policy_file), "--tool", "op", "--", "item", "get", "x")
    assert code == 0
    assert "ALLOW" in out and 'argv_allow_patterns[0] "item get *"' in out
    assert "OP_SERVICE_ACCOUNT_TOKEN" in out  # names of the environment...
    assert "ops_secret_value" not in out  # ...never the values
    code, out = invoke("check", str(policy_file), "--tool", "op", "--", "signin")
    assert code == 1 and "DENY" in out and "default deny" in out


def test_check_space_forging(policy_file: Path) -> None:
    code, _ = invoke("check", str(policy_file), "--tool", "op", "--", "item get x")
    assert code == 1


def test_check_http(policy_file: Path) -> None:
    ok = json.dumps({"jsonrpc": "2.0", "method": "send", "params": {"recipient": ["+15551"]}})
    code, out = invoke("check", str(policy_file), "--tool", "sig", "--http", "POST",
                       "/api/v1/rpc", "--body", ok, "--json")
    assert code == 0, out
    assert json.loads(out)["decision"] == "allow"
    bad = json.dumps([{"method": "version"}, {"method": "send",
                                               "params": {"recipient": ["+15551", "+4477"]}}])
    code, out = invoke("check", str(policy_file), "--tool", "sig", "--http", "POST",
                       "/api/v1/rpc", "--body", bad, "--json")
    assert code == 1
    assert "recipient[1]" in json.loads(out)["reason"]
    code, out = invoke("check", str(policy_file), "--tool", "sig", "--http", "GET",
                       "/api/v1/events")
    assert code == 0 and "ALLOW" in out
    code, out = invoke("check", str(policy_file), "--tool", "sig", "--http", "GET",
                       "/api/v1/%2e%2e/admin", "--json")
    assert code == 1 and "encoded" in json.loads(out)["reason"]
    code, out = invoke("check", str(policy_file), "--tool", "sig", "--http", "GET",
                       "/api/v1/events", "--header", "X-A: b", "--json")
    assert code == 0


def test_check_policy_from_env(policy_file: Path) -> None:
    env = {"CARAPACE_POLICY_FILE": str(policy_file)}
    code, out = invoke("check", "--tool", "op", "--json", "--", "whoami", env=env)
    assert code == 0, out
    code, out = invoke("check", "--tool", "sig", "--http", "GET", "/api/v1/events", env=env)
    assert code == 0, out
    # an explicit --policy makes every positional part of argv
    code, out = invoke("check", "--policy", str(policy_file), "--tool", "op", "--json",
                       "--", "whoami")
    assert code == 0, out


def test_check_unloadable_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tools:\n  op: {type: cli, binary: /usr/bin/op, argv_allow: [x]}\n")
    code, out = invoke("check", str(bad), "--tool", "op", "--", "x")
    assert code == 2
    assert "tools.op.argv_allow" in out
    code, out = invoke("check", str(bad), "--tool", "op", "--json", "--", "x")
    assert code == 2 and "tools.op.argv_allow" in json.loads(out)["error"]
    code, out = invoke("check", str(tmp_path / "missing.yaml"), "--tool", "op")
    assert code == 2 and "cannot read" in out
    code, out = invoke("check", "--tool", "op")
    assert code == 2 and "no policy file" in out


def test_check_usage_errors(policy_file: Path) -> None:
    code, _ = invoke("check", str(policy_file), "--tool", "op", "--body", "{}")
    assert code == 2
    code, _ = invoke("check", str(policy_file), "--tool", "sig", "--http", "GET", "/", "x")
    assert code == 2


@pytest.mark.skipif(not ANCHORS.is_dir(), reason=f"anchor policies not found at {ANCHORS}")
def test_check_anchor_examples() -> None:
    cases = [
        ("1password.yaml", "op", ["item", "get", "foo"], 0),
        ("1password.yaml", "op", ["item", "create", "x"], 1),
        ("gogcli.yaml", "gog", ["calendar", "events", "list"], 0),
        ("gogcli.yaml", "gog", ["gmail", "send"], 1),
    ]
    for name, tool, argv, expected in cases:
        code, out = invoke("check", str(ANCHORS / name), "--tool", tool, "--json", "--", *argv)
        assert code == expected, (argv, out)


def test_lint_clean_and_json(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    clean = tmp_path / "clean.yaml"
    clean.write_text(
        f"tools:\n  t: {{type: cli, binary: {binary}, argv_allow_patterns: [x], timeout_secs: 5}}\n"
        "  s:\n    type: http\n    upstream: 'http://127.0.0.1:1'\n"
        "    allow_paths: ['POST /rpc']\n    jsonrpc_allow_methods: [a]\n    timeout_secs: 5\n"
    )
    code, out = invoke("lint", str(clean))
    assert code == 0 and "no warnings" in out
    code, out = invoke("lint", str(clean), "--json")
    assert code == 0 and json.loads(out) == []


def test_lint_warnings(tmp_path: Path) -> None:
    risky = tmp_path / "risky.yaml"
    risky.write_text(
        "tools:\n"
        "  t: {type: cli, binary: /nonexistent/tool, argv_allow_patterns: ['*']}\n"
        "  e: {type: cli, binary: /bin/sh, argv_allow_patterns: [], timeout_secs: 1}\n"
        "  s:\n    type: http\n    upstream: 'http://127.0.0.1:1'\n"
        "    jsonrpc_deny_methods: [x]\n    timeout_secs: 5\n"
        "  m:\n    type: http\n    upstream: 'http://127.0.0.1:1'\n    allow_paths: ['* /*']\n"
        "    jsonrpc_allow_methods: []\n    timeout_secs: 5\n"
    )
    code, out = invoke("lint", str(risky), "--json")
    assert code == 1
    items = json.loads(out)
    assert all(set(i) == {"tool", "level", "message"} for i in items)
    messages = {(i["tool"], i["message"].split(":")[0]) for i in items}
    assert ("t", "no timeout_secs") in messages
    assert any(i["tool"] == "t" and "allows every argument list" in i["message"] for i in items)
    assert any(i["tool"] == "t" and "does not exist" in i["message"] and i["level"] == "error"
               for i in items)
    assert any(i["tool"] == "e" and "argv_allow_patterns is empty" in i["message"] for i in items)
    assert any(i["tool"] == "s" and "every path" in i["message"] for i in items)
    assert any(i["tool"] == "s" and "without jsonrpc_allow_methods" in i["message"]
               for i in items)
    assert any(i["tool"] == "m" and "opens every path" in i["message"] for i in items)
    assert any(i["tool"] == "m" and "jsonrpc_allow_methods is empty" in i["message"]
               for i in items)
    code, out = invoke("lint", str(risky))
    assert code == 1 and "warning" in out


def test_lint_unloadable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tools: {x: {type: cli, binary: /b, timeout_secs: -1}}\n")
    code, out = invoke("lint", str(bad))
    assert code == 2 and "tools.x.timeout_secs" in out
    code, out = invoke("lint", "--json", str(bad))
    assert code == 2 and "error" in json.loads(out)


def test_lint_not_executable(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_text("")
    binary.chmod(0o644)
    path = tmp_path / "p.yaml"
    path.write_text(f"tools: {{t: {{type: cli, binary: {binary}, argv_allow_patterns: [x], "
                    "timeout_secs: 1}}\n")
    code, out = invoke("lint", str(path), "--json")
    assert code == 1 and "not executable" in out


def test_registered_in_carapace_debug(policy_file: Path) -> None:
    from carapace.debug.main import cli

    result = CliRunner().invoke(cli, ["policy", "check", str(policy_file), "--tool", "op",
                                      "--json", "--", "whoami"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["decision"] == "allow"
