"""An MCP server over Streamable HTTP, used from the VM through ``--expose``, per MCP tool.

Real processes: ``tests/helpers/mcp_http_server.py`` twice on the host (JSON
answers, and event-stream answers), carapace-server with two ``type: mcp``
tools with a ``url`` and an injected ``Authorization``, carapace-agent with
``--expose``; the test is the VM's MCP client, speaking HTTP to the agent.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.jsonlines import read_records
from helpers.procs import (
    CapturedProcess,
    free_port,
    poll,
    script,
    start_process,
    stop_process,
    wait_for_port,
    wait_until,
)

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "mcp_http_server.py"
MAX_MESSAGE = 64 * 1024
HEADERS = {"Accept": "application/json, text/event-stream",
           "MCP-Protocol-Version": "2025-06-18"}


@dataclass
class HttpMcp:
    json_url: str
    sse_url: str
    token: str
    host_log: Path
    audit_log: Path

    def host_saw(self) -> str:
        return self.host_log.read_text() if self.host_log.exists() else ""


@pytest.fixture(scope="module")
def mcp_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpMcp]:
    tmp = tmp_path_factory.mktemp("mcp-http")
    token = "mcp-http-" + secrets.token_hex(20)
    host_log = tmp / "host-saw.log"
    upstreams = {"json": free_port(), "sse": free_port()}
    exposed = {"json": free_port(), "sse": free_port()}
    rules = ('    tools_allow: ["get_*", "print_secret", "big"]\n'
             '    tools_deny: ["delete_*"]\n'
             '    resources_allow: ["file:///public/*"]\n'
             f'    headers_inject: {{Authorization: "Bearer {token}"}}\n')
    policy = tmp / "policy.yaml"
    policy.write_text("tools:\n" + "".join(
        f"  {kind}-mcp:\n    type: mcp\n    url: http://127.0.0.1:{port}/mcp\n{rules}"
        for kind, port in upstreams.items()))
    token_file = tmp / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    audit_log = tmp / "audit.jsonl"
    port = free_port()
    procs: list[CapturedProcess] = []
    try:
        for kind, upstream in upstreams.items():
            procs.append(start_process([sys.executable, "-I", str(HELPER), str(upstream),
                                        str(host_log), *(["--sse"] if kind == "sse" else [])]))
            wait_for_port("127.0.0.1", upstream, proc=procs[-1])
        procs.append(start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                                    "--policy", str(policy), "--token-file", str(token_file),
                                    "--audit-log", str(audit_log),
                                    "--mcp-max-message-bytes", str(MAX_MESSAGE)]))
        procs.append(start_process([script("carapace-agent"), "--server", f"127.0.0.1:{port}",
                                    "--token-file", str(token_file),
                                    *(a for kind, p in exposed.items()
                                      for a in ("--expose", f"{kind}-mcp=127.0.0.1:{p}"))]))
        wait_until(lambda: "connected to the Carapace server" in procs[-1].stderr_text()
                   or procs[-1].poll() is not None, 15, "the agent")
        for p in exposed.values():
            wait_for_port("127.0.0.1", p, proc=procs[-1])
        yield HttpMcp(f"http://127.0.0.1:{exposed['json']}/mcp",
                      f"http://127.0.0.1:{exposed['sse']}/mcp", token, host_log, audit_log)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
            print(proc.output())


def rpc(rid: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def post(url: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(url, json=body, headers={**HEADERS, **headers}, timeout=20)


def sse_messages(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_json_answers_are_filtered_and_denials_answered_here(mcp_http: HttpMcp) -> None:
    init = post(mcp_http.json_url, rpc(1, "initialize", protocolVersion="2025-06-18",
                                       capabilities={}, clientInfo={"name": "t", "version": "1"}))
    assert init.status_code == 200 and init.headers["mcp-session-id"]
    session = {"Mcp-Session-Id": init.headers["mcp-session-id"]}
    assert post(mcp_http.json_url, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                **session).status_code == 202
    tools = post(mcp_http.json_url, rpc(2, "tools/list"), **session).json()
    assert {t["name"] for t in tools["result"]["tools"]} == {"get_time", "print_secret", "big"}
    ok = post(mcp_http.json_url, rpc(3, "tools/call", name="get_time", arguments={})).json()
    assert ok["result"]["content"][0]["text"] == "2026-01-01T00:00:00Z"
    denied = post(mcp_http.json_url, rpc(4, "tools/call", name="delete_everything",
                                         arguments={}))
    assert denied.status_code == 200
    assert denied.json()["id"] == 4 and denied.json()["error"]["code"] == -32001
    assert "denied by the host policy" in denied.json()["error"]["message"]
    assert "delete_everything" not in mcp_http.host_saw()


def test_injected_credential_reaches_the_server_and_is_masked(mcp_http: HttpMcp) -> None:
    answer = post(mcp_http.json_url, rpc(5, "tools/call", name="print_secret", arguments={}),
                  Authorization="Bearer from-the-vm").json()
    assert answer["result"]["content"][0]["text"] == "auth was [REDACTED]"
    assert mcp_http.token not in json.dumps(answer)
    assert "from-the-vm" not in mcp_http.host_saw()


def test_event_stream_answers_are_filtered_per_event(mcp_http: HttpMcp) -> None:
    listed = sse_messages(post(mcp_http.sse_url, rpc(6, "tools/list")))
    assert listed[0]["method"] == "notifications/message"  # progress on the way passes
    assert {t["name"] for t in listed[-1]["result"]["tools"]} == {"get_time", "print_secret", "big"}
    secret = sse_messages(post(mcp_http.sse_url, rpc(7, "tools/call", name="print_secret",
                                                     arguments={})))
    assert secret[-1]["result"]["content"][0]["text"] == "auth was [REDACTED]"


def test_batch_is_judged_per_element(mcp_http: HttpMcp) -> None:
    answer = post(mcp_http.json_url, [rpc(8, "tools/call", name="get_time", arguments={}),
                                      rpc(9, "resources/read", uri="file:///private/k")]).json()
    by_id = {a["id"]: a for a in answer}
    assert "result" in by_id[8] and by_id[9]["error"]["code"] == -32001
    assert "private" not in mcp_http.host_saw()


@pytest.mark.parametrize("body,expected", [
    (b"{not json", "not JSON"), (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}',
                                 "not a JSON-RPC 2.0 object"),
])
def test_bad_body_is_refused_with_a_json_rpc_error(mcp_http: HttpMcp, body: bytes,
                                                   expected: str) -> None:
    r = httpx.post(mcp_http.json_url, content=body,
                   headers={**HEADERS, "Content-Type": "application/json"}, timeout=20)
    assert r.status_code == 400 and expected in r.json()["error"]["message"]


def test_other_methods_pass_or_are_refused(mcp_http: HttpMcp) -> None:
    assert httpx.get(mcp_http.json_url, headers=HEADERS, timeout=20).status_code == 405
    assert httpx.delete(mcp_http.json_url, headers=HEADERS, timeout=20).status_code == 200
    assert httpx.put(mcp_http.json_url, headers=HEADERS, timeout=20).status_code == 400
    assert "GET-stream" in mcp_http.host_saw() and "DELETE-session" in mcp_http.host_saw()


def test_calls_are_audited(mcp_http: HttpMcp) -> None:
    post(mcp_http.json_url, rpc(10, "tools/call", name="delete_everything", arguments={}))
    records = poll(lambda: [r for r in read_records(mcp_http.audit_log)
                            if r.get("event") == "mcp_call"
                            and r.get("mcp_tool") == "delete_everything"] or None,
                   10, "the mcp_call record")
    assert records[-1]["kind"] == "mcp" and records[-1]["decision"] == "deny"
    assert mcp_http.token not in mcp_http.audit_log.read_text()


def test_messages_over_the_cap_are_refused_both_ways(mcp_http: HttpMcp) -> None:
    big = rpc(11, "tools/call", name="get_time", arguments={"pad": "x" * MAX_MESSAGE})
    r = post(mcp_http.json_url, big)
    assert r.status_code == 400 and f"over {MAX_MESSAGE} bytes" in r.json()["error"]["message"]
    answer = post(mcp_http.json_url, rpc(12, "tools/call", name="big",
                                         arguments={"bytes": MAX_MESSAGE + 10})).json()
    assert "x" * 1000 not in json.dumps(answer)
    assert answer["id"] == 12 and f"over {MAX_MESSAGE} bytes" in answer["error"]["message"]
