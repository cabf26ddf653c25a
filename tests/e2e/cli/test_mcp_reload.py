"""A reload reaches open MCP sessions as it reaches any open request (real processes).

A session whose tool the new policy removes is ended at once (the shim exits
77 saying the policy changed, the host server's process goes, a ``revoked``
record names the rule); a session of a tool still allowed goes on answering.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.jsonlines import read_records
from helpers.procs import poll

from .test_mcp_stdio import McpDeployment, policy_yaml, running_mcp


@pytest.fixture
def mcp(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDeployment]:
    with running_mcp(tmp_path, tmp_path_factory.mktemp("mcp-reload-host"), policy_yaml,
                     ("test-mcp", "slow-mcp")) as deployment:
        yield deployment


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
