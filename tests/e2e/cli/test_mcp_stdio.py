"""A VM's MCP client uses a host stdio MCP server through Carapace, MCP tool by MCP tool.

Real processes: carapace-server with a ``type: mcp`` policy, carapace-agent,
a shim installed by ``carapace-agent shims install``, and on the host
``tests/helpers/mcp_server.py`` (a small stdio MCP server that logs every
request it receives, so a test can show a denied call never reached it).
The client here writes JSON-RPC lines into the shim's stdin itself; the
official SDK client is in ``tests/interop/test_mcp_sdk.py``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.confined import REAL_PYTHON, visible_copy
from helpers.jsonlines import read_records
from helpers.procs import (
    CapturedProcess,
    free_port,
    poll,
    run_debug,
    script,
    start_process,
    stop_process,
)

from .conftest import install_shims, start_agent, wait_until

HELPER = Path(__file__).resolve().parents[2] / "helpers" / "mcp_server.py"
MAX_MESSAGE = 64 * 1024
MAX_PENDING = 8
ALLOWED_TOOLS = {"get_time", "echo", "print_secret", "sleep", "big"}


@dataclass
class McpDeployment:
    tmp: Path
    bin: Path
    socket: Path
    server: CapturedProcess
    agent: CapturedProcess
    token: str
    audit_log: Path
    server_log: Path
    debug_port: int

    def start(self, tool: str = "test-mcp", *args: str) -> McpClient:
        proc = subprocess.Popen([str(self.bin / tool), *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"CARAPACE_AGENT_SOCKET": str(self.socket),
                                     "PATH": "/usr/bin:/bin"})
        return McpClient(proc)

    def host_saw(self) -> list[str]:
        return self.server_log.read_text().splitlines() if self.server_log.exists() else []


class McpClient:
    """Writes JSON-RPC lines to a shim and reads its answers (with a deadline)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.next_id = 1

    def send(self, msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the shim closed its stdout; stderr: {self.stderr()}"
        return json.loads(line)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        answer: dict[str, Any] = self.read()
        assert answer.get("id") == rid, answer
        return answer

    def initialize(self) -> None:
        answer = self.request("initialize", {"protocolVersion": "2025-06-18",
                                             "capabilities": {},
                                             "clientInfo": {"name": "test", "version": "1"}})
        assert answer["result"]["serverInfo"]["name"] == "carapace-test-mcp"
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def call(self, name: str, **arguments: Any) -> dict[str, Any]:
        return self.request("tools/call", {"name": name, "arguments": arguments})

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=20)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


def policy_yaml(token: str, server_log: Path) -> str:
    # Confined, the server sees no /tmp, where this clone and its venv may be.
    helper = str(visible_copy(HELPER))
    command = json.dumps([REAL_PYTHON, "-I", helper])
    announce = json.dumps([REAL_PYTHON, "-I", helper, "--announce"])
    common = textwrap.dedent(f"""\
        env_inject:
          CARAPACE_TEST_TOKEN: "{token}"
          MCP_TEST_LOG: "{server_log}"
        tools_allow: ["get_*", "echo", "print_secret", "sleep", "big"]
        tools_deny: ["delete_*"]
        tool_param_filters:
          echo: {{field: text, allow_patterns: ["hello*"]}}
        resources_allow: ["file:///public/*"]
        prompts_allow: ["greet"]
        sandbox: {{writable_paths: ["{server_log.parent}"]}}
        """)
    body = textwrap.indent(common, "    ")
    return (f"tools:\n  test-mcp:\n    type: mcp\n    command: {command}\n{body}"
            f"    timeout_secs: 30\n"
            f"  slow-mcp:\n    type: mcp\n    command: {command}\n{body}"
            f"    timeout_secs: 1\n"
            f"  announce-mcp:\n    type: mcp\n    command: {announce}\n{body}")


@contextlib.contextmanager
def running_mcp(tmp: Path, host_dir: Path, policy_text: Callable[[str, Path], str],
                tools: Sequence[str], server_args: Sequence[str] = ()) -> Iterator[McpDeployment]:
    """A server (with a debug listener) on ``policy_text(token, host log)``, an agent, and
    shims for ``tools``; everything stopped on exit.

    The host MCP server logs into ``host_dir``, apart from the audit log's directory,
    which a confined tool never sees.
    """
    token = "mcp-" + secrets.token_hex(20)
    server_log = host_dir / "host-saw.log"
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(token, server_log))
    token_file = tmp / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    audit_log = tmp / "audit.jsonl"
    port, debug_port = free_port(), free_port()
    socket_path = tmp / "run" / "agent.sock"
    server = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                            "--policy", str(policy), "--token-file", str(token_file),
                            "--audit-log", str(audit_log),
                            "--debug-listen", f"127.0.0.1:{debug_port}", *server_args])
    agent = start_agent(socket_path, port, token_file)
    try:
        for proc, what in ((server, "listening on"), (agent, "connected to the Carapace server")):
            wait_until(lambda p=proc, w=what: w in p.stderr_text() or p.poll() is not None,
                       15, what)
            assert proc.poll() is None, proc.output()
        shims = install_shims(tmp / "bin", tools)
        assert shims.returncode == 0, shims.stderr
        yield McpDeployment(tmp, tmp / "bin", socket_path, server, agent, token, audit_log,
                            server_log, debug_port)
    finally:
        for proc in (agent, server):
            stop_process(proc)
            print(proc.output())


@pytest.fixture(scope="module")
def mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDeployment]:
    with running_mcp(tmp_path_factory.mktemp("mcp"), tmp_path_factory.mktemp("mcp-host"),
                     policy_yaml, ("test-mcp", "slow-mcp", "announce-mcp"),
                     ["--mcp-max-message-bytes", str(MAX_MESSAGE),
                      "--mcp-max-pending", str(MAX_PENDING)]) as deployment:
        yield deployment


@pytest.fixture
def client(mcp: McpDeployment) -> Iterator[McpClient]:
    c = mcp.start()
    c.initialize()
    yield c
    if c.proc.poll() is None:
        c.close()


def _mcp_calls(mcp: McpDeployment) -> list[dict[str, Any]]:
    return [r for r in read_records(mcp.audit_log) if r.get("event") == "mcp_call"]


def test_lists_show_only_what_the_policy_allows(client: McpClient) -> None:
    tools = {t["name"] for t in client.request("tools/list")["result"]["tools"]}
    assert tools == ALLOWED_TOOLS
    resources = [r["uri"] for r in client.request("resources/list")["result"]["resources"]]
    assert resources == ["file:///public/readme.txt"]
    prompts = [p["name"] for p in client.request("prompts/list")["result"]["prompts"]]
    assert prompts == ["greet"]
    assert client.close() == 0


def test_allowed_call_runs_denied_call_never_reaches_the_host(
        mcp: McpDeployment, client: McpClient) -> None:
    answer = client.call("get_time")
    assert answer["result"]["content"][0]["text"] == "2026-01-01T00:00:00Z"
    denied = client.call("delete_everything")
    assert denied["error"]["code"] == -32001
    assert "denied by the host policy" in denied["error"]["message"]
    assert "delete_everything" in denied["error"]["message"]
    assert client.call("echo", text="hello world")["result"]["content"][0]["text"] == \
        "hello world"
    filtered = client.call("echo", text="rm -rf /")
    assert "arguments.text matches no allow pattern" in filtered["error"]["message"]
    assert "error" in client.request("resources/read", {"uri": "file:///private/keys.txt"})
    read = client.request("resources/read", {"uri": "file:///public/readme.txt"})
    assert read["result"]["contents"][0]["text"].startswith("content of")
    assert "error" in client.request("prompts/get", {"name": "exfiltrate"})
    assert "error" in client.request("sampling/whatever")
    assert client.close() == 0
    saw = mcp.host_saw()
    assert "tools/call get_time" in saw and "tools/call echo" in saw
    assert not [line for line in saw if "delete_everything" in line or "private" in line
                or "exfiltrate" in line or "sampling" in line]
    assert saw.count("tools/call echo") == 1


def test_secret_printed_by_the_host_server_is_masked(mcp: McpDeployment,
                                                     client: McpClient) -> None:
    text = client.call("print_secret")["result"]["content"][0]["text"]
    assert text == "the token is [REDACTED]"
    assert client.close() == 0


def test_call_without_id_is_judged_too(mcp: McpDeployment, client: McpClient) -> None:
    """A lenient server might act on a tools/call notification: it is dropped if denied."""
    client.send({"jsonrpc": "2.0", "method": "tools/call",
                 "params": {"name": "delete_everything", "arguments": {"id": "nobatch"}}})
    assert client.request("ping")["result"] == {}
    assert client.close() == 0
    assert not [line for line in mcp.host_saw() if "delete_everything" in line]


def test_batch_is_judged_per_element(mcp: McpDeployment, client: McpClient) -> None:
    client.send([{"jsonrpc": "2.0", "id": 101, "method": "tools/call",
                  "params": {"name": "get_time", "arguments": {}}},
                 {"jsonrpc": "2.0", "id": 102, "method": "tools/call",
                  "params": {"name": "delete_everything", "arguments": {}}}])
    answers: dict[int, Any] = {}
    while len(answers) < 2:
        doc = client.read()
        for item in doc if isinstance(doc, list) else [doc]:
            answers[item["id"]] = item
    assert "result" in answers[101]
    assert answers[102]["error"]["code"] == -32001
    assert client.close() == 0
    assert not [line for line in mcp.host_saw() if "delete_everything" in line]


def test_list_changed_notification_flows(mcp: McpDeployment) -> None:
    c = mcp.start("announce-mcp")
    assert c.read() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    c.initialize()
    assert c.close() == 0


def test_unanswered_call_times_out_with_an_error(mcp: McpDeployment) -> None:
    c = mcp.start("slow-mcp")
    c.initialize()
    answer = c.call("sleep", seconds=3)
    assert answer["error"]["code"] == -32002
    assert "timeout_secs" in answer["error"]["message"]
    assert c.request("ping")["result"] == {}  # the late answer is dropped, the session goes on
    assert c.close() == 0


@pytest.mark.parametrize("attack,expected", [
    (b"this is not json\n", "not JSON"),
    (b'{"jsonrpc": "1.0", "id": 5, "method": "ping"}\n', "not a JSON-RPC 2.0 object"),
    (b"[]\n", "empty batch"),
    (b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "sleep", '
     b'"arguments": {"seconds": 2}}}\n{"jsonrpc": "2.0", "id": 9, "method": "tools/list"}\n',
     "reused request id"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "'
     + b"x" * (MAX_MESSAGE + 10), "over 65536 bytes"),
])
def test_bad_client_message_ends_the_session(mcp: McpDeployment, attack: bytes,
                                             expected: str) -> None:
    c = mcp.start()
    c.initialize()
    c.send_raw(attack)
    assert c.proc.wait(timeout=20) == 65
    err = c.stderr()
    assert expected in err and "the session is closed" in err, err
    rid = poll(lambda: [r for r in read_records(mcp.audit_log)
                        if r.get("event") == "completion" and expected in
                        str(r.get("mcp_refused"))], 10, "the completion record")
    assert rid[-1]["kind"] == "mcp" and rid[-1]["exit_code"] == 65


def test_vm_cannot_add_arguments(mcp: McpDeployment) -> None:
    c = mcp.start("test-mcp", "--evil")
    assert c.proc.wait(timeout=20) != 0
    assert "takes no arguments" in c.stderr()


def test_audit_records_each_call_and_debug_audit_finds_it(mcp: McpDeployment,
                                                          client: McpClient) -> None:
    client.call("get_time")
    client.call("delete_everything")
    assert client.close() == 0
    calls = poll(lambda: [r for r in _mcp_calls(mcp) if r["mcp_tool"] == "delete_everything"],
                 10, "the mcp_call deny record")
    assert calls[-1]["decision"] == "deny" and calls[-1]["rule"].startswith("tools.test-mcp")
    allowed = [r for r in _mcp_calls(mcp) if r["mcp_tool"] == "get_time"]
    assert allowed[-1]["outcome"] == "answered" and allowed[-1]["result_bytes"] > 0
    assert allowed[-1]["duration_ms"] >= 0 and allowed[-1]["kind"] == "mcp"
    shown = run_debug("audit", "--file", str(mcp.audit_log), "--tool", "delete_everything",
                      "--json")
    assert shown.returncode == 0, shown.stderr
    records = json.loads(shown.stdout)["records"]
    assert records and all(r["mcp_tool"] == "delete_everything" for r in records)
    assert mcp.token not in mcp.audit_log.read_text()
    table = run_debug("audit", "--file", str(mcp.audit_log), "--tool", "get_time")
    assert table.returncode == 0 and "tools/call get_time" in table.stdout, table.stdout


def test_sniff_and_metrics_show_mcp_calls_by_tool_name(mcp: McpDeployment) -> None:
    base = f"http://127.0.0.1:{mcp.debug_port}"
    got: list[dict[str, Any]] = []
    with httpx.Client(timeout=20) as http, http.stream(
            "GET", f"{base}/debug/sniff", params={"tool": "get_time"}) as response:
        assert response.status_code == 200
        poll(lambda: httpx.get(f"{base}/debug/health").json()["sniff"]["subscribers"] >= 1 or None,
             10, "the sniff subscriber")
        c = mcp.start()
        c.initialize()
        c.call("get_time")
        c.call("delete_everything")
        c.close()
        for line in response.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                break
    assert got[0]["type"] == "mcp_call" and got[0]["mcp_tool"] == "get_time"
    assert got[0]["decision"] == "allow" and "tools/call get_time" in got[0]["summary"]
    metrics = httpx.get(f"{base}/metrics").text
    assert 'carapace_mcp_calls_total{method="tools/call",outcome="denied",tool="test-mcp"}' \
        in metrics
    assert 'carapace_mcp_sessions_refused_total' in metrics


def test_large_messages_both_ways(mcp: McpDeployment, client: McpClient) -> None:
    """Over 16 KiB a message is judged in a worker thread; the answer is the same."""
    text = "hello " + "x" * 30000
    assert client.call("echo", text=text)["result"]["content"][0]["text"] == text
    assert len(client.call("big", bytes=40000)["result"]["content"][0]["text"]) == 40000
    assert "error" in client.call("echo", text="bye " + "x" * 30000)
    assert client.close() == 0


def test_too_many_waiting_requests_end_the_session(mcp: McpDeployment) -> None:
    c = mcp.start()
    c.initialize()
    c.send_raw(b"".join(
        json.dumps({"jsonrpc": "2.0", "id": 1000 + i, "method": "tools/call",
                    "params": {"name": "sleep", "arguments": {"seconds": 10}}}).encode() + b"\n"
        for i in range(MAX_PENDING + 1)))
    assert c.proc.wait(timeout=20) == 65
    err = c.stderr()
    assert f"more than {MAX_PENDING} requests" in err and "--mcp-max-pending" in err, err
