"""A reload reaches open MCP sessions as it reaches any open request (real processes).

A session whose tool the new policy removes is ended at once (the shim exits
77 saying the policy changed, the host server's process goes, a ``revoked``
record names the rule); a session of a tool still allowed goes on answering.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.jsonlines import read_records
from helpers.procs import free_port, poll, script, start_process, stop_process

from .conftest import install_shims, start_agent, wait_until
from .test_mcp_stdio import McpDeployment, policy_yaml


@pytest.fixture
def mcp(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDeployment]:
    token = "mcp-" + secrets.token_hex(20)
    server_log = tmp_path_factory.mktemp("mcp-reload-host") / "host-saw.log"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(token, server_log))
    token_file = tmp_path / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    audit_log = tmp_path / "audit.jsonl"
    port = free_port()
    socket_path = tmp_path / "run" / "agent.sock"
    server = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                            "--policy", str(policy), "--token-file", str(token_file),
                            "--audit-log", str(audit_log)])
    agent = start_agent(socket_path, port, token_file)
    try:
        for proc, what in ((server, "listening on"), (agent, "connected to the Carapace server")):
            wait_until(lambda p=proc, w=what: w in p.stderr_text() or p.poll() is not None,
                       15, what)
            assert proc.poll() is None, proc.output()
        shims = install_shims(tmp_path / "bin", ("test-mcp", "slow-mcp"))
        assert shims.returncode == 0, shims.stderr
        yield McpDeployment(tmp_path, tmp_path / "bin", socket_path, server, agent, token,
                            audit_log, server_log, 0)
    finally:
        for proc in (agent, server):
            stop_process(proc)
            print(proc.output())


def without_tool(policy_text: str, tool: str, next_tool: str) -> str:
    """The policy with ``tool``'s block (up to ``next_tool``'s) taken out."""
    start = policy_text.index(f"  {tool}:\n")
    return policy_text[:start] + policy_text[policy_text.index(f"  {next_tool}:\n"):]


def test_a_reload_ends_the_sessions_of_a_removed_mcp_tool_only(mcp: McpDeployment) -> None:
    removed, kept = mcp.start("test-mcp"), mcp.start("slow-mcp")
    for client in (removed, kept):
        client.initialize()
        assert "result" in client.call("get_time")
    policy = mcp.tmp / "policy.yaml"
    policy.write_text(without_tool(policy.read_text(), "test-mcp", "slow-mcp"))
    mcp.server.send_signal(signal.SIGHUP)
    assert removed.proc.wait(timeout=15) == 77
    assert "policy changed" in removed.stderr()
    assert "result" in kept.call("get_time")  # untouched by the reload
    records = poll(lambda: [r for r in read_records(mcp.audit_log)
                            if r.get("event") == "revoked" and r.get("tool") == "test-mcp"],
                   10, "a revoked record for the removed tool's session")
    assert records[0]["decision"] == "deny"
    assert kept.close() == 0
    assert not [r for r in read_records(mcp.audit_log)
                if r.get("event") == "revoked" and r.get("tool") == "slow-mcp"]
