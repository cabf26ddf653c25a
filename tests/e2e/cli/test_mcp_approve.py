"""An MCP ``tools/call`` the policy holds for approval waits for a person on the host.

Real processes: carapace-server with ``tools_approve`` on ``type: mcp`` tools,
carapace-agent, the shims, and ``tests/helpers/mcp_server.py`` on the host (it
logs every request it receives, so a test can show a call that was not
approved never reached it). The operator answers with ``carapace-debug``.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.confined import REAL_PYTHON, visible_copy
from helpers.jsonlines import read_records
from helpers.procs import poll, run_debug

from .test_mcp_stdio import HELPER, McpClient, McpDeployment, running_mcp

ANSWER_WITHIN = 20.0


def policy_yaml(token: str, server_log: Path) -> str:
    # Confined, the server sees no /tmp, where this clone and its venv may be.
    command = json.dumps([REAL_PYTHON, "-I", str(visible_copy(HELPER))])
    common = textwrap.dedent(f"""\
        command: {command}
        env_inject:
          CARAPACE_TEST_TOKEN: "{token}"
          MCP_TEST_LOG: "{server_log}"
        tools_allow: ["get_*", "echo", "sleep", "delete_*"]
        tools_deny: ["delete_*"]
        tools_approve: ["echo", "delete_*"]
        sandbox: {{writable_paths: ["{server_log.parent}"]}}
        """)
    body = textwrap.indent(common, "    ")
    return (f"tools:\n  gated-mcp:\n    type: mcp\n{body}"
            f"    approval: {{timeout_secs: 30}}\n"
            f"  hasty-mcp:\n    type: mcp\n{body}"
            f"    approval: {{timeout_secs: 1}}\n")


@pytest.fixture(scope="module")
def mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDeployment]:
    tmp = tmp_path_factory.mktemp("mcp-approve")
    notified = tmp / "notified.jsonl"
    with running_mcp(tmp, tmp_path_factory.mktemp("mcp-approve-host"), policy_yaml,
                     ("gated-mcp", "hasty-mcp"),
                     ["--approval-notify", f"cat >> {notified}"]) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.fixture
def client(mcp: McpDeployment) -> Iterator[McpClient]:
    c = mcp.start("gated-mcp")
    c.initialize()
    yield c
    if c.proc.poll() is None:
        c.close()


def debug(mcp: McpDeployment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_debug(*args, "--debug", f"127.0.0.1:{mcp.debug_port}")


def listing(mcp: McpDeployment) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"http://127.0.0.1:{mcp.debug_port}/debug/approvals",
                                    timeout=5).json()
    return doc


def wait_pending(mcp: McpDeployment) -> dict[str, Any]:
    found: dict[str, Any] = poll(lambda: (listing(mcp)["pending"] or [None])[0], 15,
                                 "a pending approval")
    return found


def ask(client: McpClient, rid: int, name: str, **arguments: Any) -> None:
    """Send a tools/call without reading its answer."""
    client.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                 "params": {"name": name, "arguments": arguments}})


def read(client: McpClient, pool: ThreadPoolExecutor) -> dict[str, Any]:
    answer: dict[str, Any] = pool.submit(client.read).result(timeout=ANSWER_WITHIN)
    return answer


def host_calls(mcp: McpDeployment, name: str) -> int:
    return mcp.host_saw().count(f"tools/call {name}")


def records(mcp: McpDeployment, event: str) -> list[dict[str, Any]]:
    return [r for r in read_records(mcp.audit_log) if r.get("event") == event]


def approval_record(mcp: McpDeployment, approval_id: str) -> dict[str, Any]:
    found: dict[str, Any] = poll(lambda: next(
        (r for r in records(mcp, "approval") if str(r.get("approval_id")) == approval_id),
        None), 10, f"the approval record of {approval_id}")
    return found


def test_a_gated_call_waits_while_the_session_goes_on_then_runs_once_approved(
        mcp: McpDeployment, client: McpClient, pool: ThreadPoolExecutor) -> None:
    before = host_calls(mcp, "echo")
    ask(client, 100, "echo", text="hello approved")
    item = wait_pending(mcp)
    assert item["tool"] == "gated-mcp" and item["type"] == "mcp"
    assert item["summary"] == 'tools/call echo {"text": "hello approved"}'
    printed = debug(mcp, "approvals", "--json")
    assert printed.returncode == 0, printed.stderr
    assert item["id"] in printed.stdout and "tools/call echo" in printed.stdout
    table = debug(mcp, "approvals")
    assert table.returncode == 0 and "tools/call echo" in table.stdout, table.stderr
    # Another call of the same session is answered while the gated one waits.
    answer = client.call("get_time")
    assert answer["result"]["content"][0]["text"] == "2026-01-01T00:00:00Z"
    assert host_calls(mcp, "echo") == before, "the call ran before anyone approved it"

    done = debug(mcp, "approve", item["id"], "--as", "alice", "--reason", "expected")
    assert done.returncode == 0, done.stderr
    answer = read(client, pool)
    assert answer["id"] == 100
    assert answer["result"]["content"][0]["text"] == "hello approved"
    assert host_calls(mcp, "echo") == before + 1
    record = approval_record(mcp, item["id"])
    assert record["outcome"] == "approved" and record["by"] == "alice"
    assert record["mcp_tool"] == "echo" and "tools_approve" in record["rule"]
    call = poll(lambda: next((r for r in records(mcp, "mcp_call")
                              if r.get("approval") == "approved"), None), 10, "mcp_call")
    assert call["approval_required"] is True and call["outcome"] == "answered"
    notices = poll(lambda: (mcp.tmp / "notified.jsonl").exists()
                   and (mcp.tmp / "notified.jsonl").read_text(), 10, "the notification")
    assert f'"id": "{item["id"]}"' in notices
    assert client.close() == 0


def test_a_denied_call_gets_an_error_and_never_reaches_the_host(
        mcp: McpDeployment, client: McpClient, pool: ThreadPoolExecutor) -> None:
    before = host_calls(mcp, "echo")
    ask(client, "call-7", "echo", text="not this", api_key="sk-live-12345",
        note=mcp.token)
    item = wait_pending(mcp)
    # Secrets in the arguments are masked in what the operator is shown.
    assert "sk-live-12345" not in item["summary"] and mcp.token not in item["summary"]
    assert "[REDACTED]" in item["summary"]
    done = debug(mcp, "deny", item["id"], "--as", "bob", "--reason", "not today")
    assert done.returncode == 0, done.stderr
    answer = read(client, pool)
    assert answer == {"jsonrpc": "2.0", "id": "call-7",
                      "error": {"code": -32001, "message": "denied by bob: not today"}}
    assert client.call("get_time")["result"]["content"][0]["text"]  # the session goes on
    assert host_calls(mcp, "echo") == before
    assert approval_record(mcp, item["id"])["outcome"] == "denied"
    call = poll(lambda: next((r for r in records(mcp, "mcp_call")
                              if r.get("approval") == "denied"), None), 10, "mcp_call")
    assert call["outcome"] == "not_approved"
    assert client.close() == 0


def test_a_call_the_policy_denies_never_asks(mcp: McpDeployment, client: McpClient) -> None:
    denied = client.call("delete_everything")
    assert denied["error"]["code"] == -32001
    assert "denied by the host policy" in denied["error"]["message"]
    assert listing(mcp)["pending"] == []
    assert client.close() == 0


def test_a_call_nobody_answers_times_out(mcp: McpDeployment) -> None:
    c = mcp.start("hasty-mcp")
    c.initialize()
    answer = c.call("echo", text="anyone?")
    assert answer["error"]["code"] == -32001
    assert "nobody answered within 1 s" in answer["error"]["message"]
    assert c.close() == 0


def test_closing_the_session_withdraws_its_approval(mcp: McpDeployment,
                                                    client: McpClient) -> None:
    ask(client, 5, "echo", text="then gone")
    item = wait_pending(mcp)
    assert client.close() == 0
    poll(lambda: not listing(mcp)["pending"], 15, "the approval to be withdrawn")
    assert approval_record(mcp, item["id"])["outcome"] == "withdrawn"
    assert debug(mcp, "approve", item["id"]).returncode == 1


def test_approve_for_remembers_the_same_tool_and_arguments(
        mcp: McpDeployment, client: McpClient, pool: ThreadPoolExecutor) -> None:
    ask(client, 1, "echo", text="again and again")
    item = wait_pending(mcp)
    assert debug(mcp, "approve", item["id"], "--for", "60").returncode == 0
    assert read(client, pool)["result"]["content"][0]["text"] == "again and again"
    # The same call again (another id) runs at once; other arguments still ask.
    assert client.call("echo", text="again and again")["result"]["content"][0]["text"] == \
        "again and again"
    assert records(mcp, "approval")[-1]["outcome"] == "remembered"
    ask(client, 50, "echo", text="something else")
    other = wait_pending(mcp)
    assert debug(mcp, "deny", other["id"]).returncode == 0
    assert read(client, pool)["error"]["code"] == -32001
    grants = listing(mcp)["grants"]
    assert len(grants) == 1
    assert debug(mcp, "deny", grants[0]["id"]).returncode == 0
    assert client.close() == 0


def test_a_client_cancel_withdraws_the_approval_and_the_session_goes_on(
        mcp: McpDeployment, client: McpClient) -> None:
    ask(client, 42, "echo", text="never mind")
    item = wait_pending(mcp)
    client.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                 "params": {"requestId": 42, "reason": "user gave up"}})
    poll(lambda: not listing(mcp)["pending"], 15, "the approval to be withdrawn")
    assert approval_record(mcp, item["id"])["outcome"] == "withdrawn"
    # No answer is due for 42: the next line is the answer to the next call.
    assert client.call("get_time")["result"]["content"][0]["text"]
    assert client.close() == 0
