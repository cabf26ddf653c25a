"""An MCP server over Streamable HTTP: a ``tools/call`` under ``tools_approve`` waits for a person.

Real processes: ``tests/helpers/mcp_http_server.py`` on the host (it logs what
it receives), carapace-server with a ``url`` MCP tool and a debug listener,
carapace-agent with ``--expose``; the operator answers with ``carapace-debug``.
Over HTTP the request that carries the call waits (other requests are other
streams and go on).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.procs import (
    CapturedProcess,
    free_port,
    poll,
    run_debug,
    script,
    start_process,
    stop_process,
    wait_for_port,
    wait_until,
)

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "mcp_http_server.py"
HEADERS = {"Accept": "application/json, text/event-stream",
           "MCP-Protocol-Version": "2025-06-18"}


@dataclass
class Gated:
    url: str
    host_log: Path
    debug_port: int

    def host_saw(self) -> str:
        return self.host_log.read_text() if self.host_log.exists() else ""

    def pending(self) -> list[dict[str, Any]]:
        doc = httpx.get(f"http://127.0.0.1:{self.debug_port}/debug/approvals", timeout=5).json()
        return list(doc["pending"])


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    tmp = tmp_path_factory.mktemp("mcp-http-approve")
    host_log = tmp / "host-saw.log"
    upstream, exposed, port, debug_port = free_port(), free_port(), free_port(), free_port()
    policy = tmp / "policy.yaml"
    policy.write_text(f"tools:\n  http-mcp:\n    type: mcp\n"
                      f"    url: http://127.0.0.1:{upstream}/mcp\n"
                      '    tools_allow: ["get_*", "print_secret"]\n'
                      '    tools_approve: ["print_secret"]\n'
                      "    approval: {timeout_secs: 30}\n")
    token_file = tmp / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    procs: list[CapturedProcess] = []
    try:
        procs.append(start_process([sys.executable, "-I", str(HELPER), str(upstream),
                                    str(host_log)]))
        wait_for_port("127.0.0.1", upstream, proc=procs[-1])
        procs.append(start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                                    "--policy", str(policy), "--token-file", str(token_file),
                                    "--audit-log", str(tmp / "audit.jsonl"),
                                    "--debug-listen", f"127.0.0.1:{debug_port}"]))
        procs.append(start_process([script("carapace-agent"), "--server", f"127.0.0.1:{port}",
                                    "--token-file", str(token_file),
                                    "--expose", f"http-mcp=127.0.0.1:{exposed}"]))
        wait_until(lambda: "connected to the Carapace server" in procs[-1].stderr_text()
                   or procs[-1].poll() is not None, 15, "the agent")
        wait_for_port("127.0.0.1", exposed, proc=procs[-1])
        yield Gated(f"http://127.0.0.1:{exposed}/mcp", host_log, debug_port)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
            print(proc.output())


def call(url: str, rid: int, name: str) -> httpx.Response:
    return httpx.post(url, headers=HEADERS, timeout=30, json={
        "jsonrpc": "2.0", "id": rid, "method": "tools/call",
        "params": {"name": name, "arguments": {}}})


def test_a_gated_http_call_waits_for_approve_and_deny(gated: Gated) -> None:
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, gated.url, 1, "print_secret")
        item = poll(lambda: (gated.pending() or [None])[0], 15, "a pending approval")
        assert item["tool"] == "http-mcp" and item["summary"] == "tools/call print_secret {}"
        # Another request is answered meanwhile; the gated one has not reached the server.
        other = call(gated.url, 2, "get_time").json()
        assert other["result"]["content"][0]["text"] == "2026-01-01T00:00:00Z"
        assert "print_secret" not in gated.host_saw()
        done = run_debug("approve", item["id"], "--debug", f"127.0.0.1:{gated.debug_port}")
        assert done.returncode == 0, done.stderr
        answer = first.result(timeout=20).json()
        assert answer["id"] == 1 and "result" in answer
        assert gated.host_saw().count("tools/call print_secret") == 1

        second = pool.submit(call, gated.url, 3, "print_secret")
        item = poll(lambda: (gated.pending() or [None])[0], 15, "a pending approval")
        done = run_debug("deny", item["id"], "--as", "bob", "--reason", "no",
                         "--debug", f"127.0.0.1:{gated.debug_port}")
        assert done.returncode == 0, done.stderr
        denied = second.result(timeout=20)
        assert denied.status_code == 200
        assert denied.json() == {"jsonrpc": "2.0", "id": 3,
                                 "error": {"code": -32001, "message": "denied by bob: no"}}
        assert gated.host_saw().count("tools/call print_secret") == 1
