"""The official MCP Python SDK as the VM's client, real MCP servers on the host.

A shim installed by ``carapace-agent shims install`` is the client's stdio
server command, exactly as a VM's MCP client is configured
(``"command": "/usr/local/bin/test-mcp"``). On the host: the published
``mcp-server-time`` (PyPI) and ``tests/helpers/mcp_server.py``, which prints
its injected secret on request. ``make test-interop`` installs both Python
packages (the pip extra ``interop``).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from helpers.procs import (
    CapturedProcess,
    free_port,
    script,
    start_process,
    stop_process,
    wait_for_port,
    wait_until,
)

pytest.importorskip("mcp", reason="the MCP SDK is not installed: pip install -e '.[interop]'")

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

try:  # named MCPError since SDK 2, McpError before
    from mcp.shared.exceptions import MCPError as McpError
except ImportError:  # pragma: no cover - SDK 1.x
    from mcp.shared.exceptions import McpError  # type: ignore[attr-defined,no-redef]

pytestmark = pytest.mark.interop

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "mcp_server.py"
TIME_SERVER = Path(sys.executable).parent / "mcp-server-time"
HTTP_APP = Path(__file__).resolve().parent / "mcp_http_app.py"


@dataclass
class SdkDeployment:
    bin: Path
    socket: Path
    token: str
    http_url: str
    """The agent's --expose of the SDK's own Streamable HTTP server."""

    def params(self, tool: str) -> StdioServerParameters:
        """What the VM's MCP client is configured with: the shim as its stdio server."""
        return StdioServerParameters(command=str(self.bin / tool),
                                     env={"CARAPACE_AGENT_SOCKET": str(self.socket)})


def _policy(token: str, http_port: int) -> str:
    helper = json.dumps([sys.executable, "-I", str(HELPER)])
    time_server = json.dumps([str(TIME_SERVER), "--local-timezone", "UTC"])
    return f"""\
tools:
  test-mcp:
    type: mcp
    command: {helper}
    env_inject: {{CARAPACE_TEST_TOKEN: "{token}"}}
    tools_allow: ["get_time", "print_secret"]
    tools_deny: ["delete_*"]
    timeout_secs: 30
  time:
    type: mcp
    command: {time_server}
    tools_allow: ["get_current_time"]
    timeout_secs: 30
  http-mcp:
    type: mcp
    url: http://127.0.0.1:{http_port}/mcp
    headers_inject: {{Authorization: "Bearer {token}"}}
    tools_allow: ["get_time", "print_secret"]
    timeout_secs: 30
"""


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkDeployment]:
    tmp = tmp_path_factory.mktemp("mcp-sdk")
    token = "mcp-" + secrets.token_hex(20)
    policy = tmp / "policy.yaml"
    http_port, exposed = free_port(), free_port()
    policy.write_text(_policy(token, http_port))
    token_file = tmp / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    port = free_port()
    socket_path = tmp / "run" / "agent.sock"
    procs: list[CapturedProcess] = []
    try:
        procs.append(start_process([sys.executable, str(HTTP_APP), str(http_port)],
                                   env={"CARAPACE_TEST_TOKEN": token}))
        wait_for_port("127.0.0.1", http_port, 20, proc=procs[-1])
        procs.append(start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                                    "--policy", str(policy), "--token-file", str(token_file)]))
        procs.append(start_process([script("carapace-agent"), "--server", f"127.0.0.1:{port}",
                                    "--token-file", str(token_file),
                                    "--cli-socket", str(socket_path),
                                    "--expose", f"http-mcp=127.0.0.1:{exposed}"]))
        for proc, what in zip(procs[1:], ("listening on", "connected to the Carapace server"),
                              strict=True):
            wait_until(lambda p=proc, w=what: w in p.stderr_text() or p.poll() is not None,
                       15, what)
            assert proc.poll() is None, proc.output()
        bin_dir = tmp / "bin"
        done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                               str(bin_dir), "test-mcp", "time"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        wait_for_port("127.0.0.1", exposed, proc=procs[-1])
        yield SdkDeployment(bin_dir, socket_path, token, f"http://127.0.0.1:{exposed}/mcp")
    finally:
        for proc in reversed(procs):
            stop_process(proc)
            print(proc.output())


def _session(sdk: SdkDeployment, tool: str, body: Any) -> Any:
    async def main() -> Any:
        async with stdio_client(sdk.params(tool)) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            return await body(session)
    return anyio.run(main)


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def test_sdk_client_sees_only_allowed_tools_and_gets_clean_denials(sdk: SdkDeployment) -> None:
    async def body(session: ClientSession) -> dict[str, Any]:
        listed = [t.name for t in (await session.list_tools()).tools]
        allowed = _text(await session.call_tool("get_time", {}))
        secret = _text(await session.call_tool("print_secret", {}))
        try:
            await session.call_tool("delete_everything", {})
            denied = "no error"
        except McpError as exc:
            denied = str(exc)
        return {"listed": listed, "allowed": allowed, "secret": secret, "denied": denied}

    out = _session(sdk, "test-mcp", body)
    assert sorted(out["listed"]) == ["get_time", "print_secret"]
    assert out["allowed"] == "2026-01-01T00:00:00Z"
    assert "denied by the host policy" in out["denied"]
    assert out["secret"] == "the token is [REDACTED]" and sdk.token not in out["secret"]


@pytest.mark.skipif(not TIME_SERVER.exists() and not shutil.which("mcp-server-time"),
                    reason="mcp-server-time is not installed: pip install -e '.[interop]'")
def test_sdk_client_with_published_time_server(sdk: SdkDeployment) -> None:
    async def body(session: ClientSession) -> dict[str, Any]:
        listed = [t.name for t in (await session.list_tools()).tools]
        now = _text(await session.call_tool("get_current_time", {"timezone": "UTC"}))
        try:
            await session.call_tool("convert_time", {"source_timezone": "UTC", "time": "12:00",
                                                     "target_timezone": "Europe/Paris"})
            denied = "no error"
        except McpError as exc:
            denied = str(exc)
        return {"listed": listed, "now": now, "denied": denied}

    out = _session(sdk, "time", body)
    assert out["listed"] == ["get_current_time"]
    assert json.loads(out["now"])["timezone"] == "UTC"
    assert "convert_time" in out["denied"] and "denied by the host policy" in out["denied"]


def test_sdk_client_over_streamable_http_to_the_sdk_server(sdk: SdkDeployment) -> None:
    """The SDK on both sides: its Streamable HTTP client, through --expose, to its server."""
    async def main() -> dict[str, Any]:
        async with streamable_http_client(sdk.http_url) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                listed = sorted(t.name for t in (await session.list_tools()).tools)
                allowed = _text(await session.call_tool("get_time", {}))
                secret = _text(await session.call_tool("print_secret", {}))
                try:
                    await session.call_tool("delete_everything", {})
                    denied = "no error"
                except McpError as exc:
                    denied = str(exc)
        return {"listed": listed, "allowed": allowed, "secret": secret, "denied": denied}

    out = anyio.run(main)
    assert out["listed"] == ["get_time", "print_secret"]
    assert out["allowed"] == "2026-01-01T00:00:00Z"
    assert "denied by the host policy" in out["denied"]
    assert out["secret"] == "the token is [REDACTED]" and sdk.token not in out["secret"]
