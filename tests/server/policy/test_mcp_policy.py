"""``type: mcp`` tools: loading, the session decision, per-call verdicts, lint."""

from __future__ import annotations

from typing import Any

import pytest

from carapace.server.policy import (
    McpTool,
    PolicyError,
    decide_cli,
    decide_http,
    decide_mcp_request,
    decide_mcp_session,
    filter_list,
    lint_policy,
    load_policy,
)

BASE = """
tools:
  gh:
    type: mcp
    command: [/usr/bin/github-mcp-server, stdio]
    env_inject: {GITHUB_PERSONAL_ACCESS_TOKEN: ghp_0123456789abcdef}
    tools_allow: ["get_*", "list_*", "create_issue"]
    tools_deny: ["get_secret*"]
    tool_param_filters:
      create_issue: {fields: [owner], allow_patterns: ["my-org"]}
    resources_allow: ["repo://my-org/*"]
    prompts_allow: ["summarize"]
    timeout_secs: 60
    rate_limit: {max_requests: 10, window_secs: 60}
    agents: [default]
"""


def gh() -> McpTool:
    tool = load_policy(BASE).tools["gh"]
    assert isinstance(tool, McpTool)
    return tool


def test_loads_every_key() -> None:
    tool = gh()
    assert tool.command == ("/usr/bin/github-mcp-server", "stdio")
    assert tool.type == "mcp" and tool.timeout_secs == 60
    assert "ghp_" not in repr(tool)
    assert load_policy(BASE).secrets() == [b"ghp_0123456789abcdef"]


@pytest.mark.parametrize("change,message", [
    ("    binary: /bin/true\n", "belongs to cli or http tools"),
    ("    url: http://127.0.0.1:1/mcp\n", "not both"),
    ("    tools_alow: [x]\n", "unknown key"),
    ("    limits: {max_argv: 1}\n", "unknown key"),
])
def test_unknown_keys_are_errors(change: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(BASE + change)


@pytest.mark.parametrize("command,message", [
    ("[]", "is empty"), ("[github-mcp]", "absolute path"), ("/bin/x", "list of strings"),
])
def test_command_must_be_an_absolute_argv(command: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(f"tools:\n  m:\n    type: mcp\n    command: {command}\n")


def test_short_secret_is_refused() -> None:
    with pytest.raises(PolicyError, match="min_secret_length"):
        load_policy("tools:\n  m:\n    type: mcp\n    command: [/bin/x]\n"
                    "    env_inject: {API_TOKEN: short}\n")


def test_session_runs_the_command_with_only_base_env_and_inject() -> None:
    policy = load_policy(BASE)
    decision = decide_mcp_session(policy, "default", "gh", [])
    assert decision.allow and decision.argv == [b"/usr/bin/github-mcp-server", b"stdio"]
    assert decision.env[b"GITHUB_PERSONAL_ACCESS_TOKEN"] == b"ghp_0123456789abcdef"
    assert decision.cwd == b"/" and b"LD_PRELOAD" not in decision.env
    assert decide_mcp_session(policy, "default", "gh", [b"--evil"]).code == "bad_request"
    assert decide_mcp_session(policy, "other", "gh", []).code == "not_granted"


def test_mcp_tool_is_not_a_cli_or_http_tool() -> None:
    policy = load_policy(BASE)
    assert decide_cli(policy, "default", "gh", [], b"/", []).code == "wrong_type"
    assert decide_http(policy, "default", "gh", "GET", "/", [], b"").code == "wrong_type"


@pytest.mark.parametrize("method,params,allowed", [
    ("initialize", {}, True), ("ping", None, True), ("tools/list", {}, True),
    ("tools/call", {"name": "get_me"}, True),
    ("tools/call", {"name": "get_secret_token"}, False),   # deny wins
    ("tools/call", {"name": "delete_repo"}, False),        # default deny
    ("tools/call", {"name": "create_issue", "arguments": {"owner": "my-org"}}, True),
    ("tools/call", {"name": "create_issue", "arguments": {"owner": "evil"}}, False),
    ("tools/call", {"name": "create_issue"}, False),       # the filtered field is missing
    ("tools/call", {"name": 5}, False),
    ("resources/read", {"uri": "repo://my-org/x"}, True),
    ("resources/read", {"uri": "repo://other/x"}, False),
    ("resources/subscribe", {"uri": "repo://other/x"}, False),
    ("prompts/get", {"name": "summarize"}, True),
    ("prompts/get", {"name": "other"}, False),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "other"}}, False),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "summarize"}}, True),
    ("something/new", {}, False),
])
def test_request_verdicts(method: str, params: Any, allowed: bool) -> None:
    assert decide_mcp_request(gh(), method, params).decision.allow is allowed


def test_filter_list_keeps_only_allowed_items() -> None:
    result = {"tools": [{"name": "get_me"}, {"name": "delete_repo"}], "nextCursor": "c"}
    kept, removed = filter_list(gh(), "tools/list", result) or (None, 0)
    assert kept == {"tools": [{"name": "get_me"}], "nextCursor": "c"} and removed == 1
    assert filter_list(gh(), "prompts/list", {"prompts": "nope"}) is None


def test_lint_warns_about_allow_everything() -> None:
    policy = load_policy("tools:\n  m:\n    type: mcp\n    command: [/bin/x]\n"
                         "    tools_allow: ['*']\n    timeout_secs: 5\n")
    assert any("allows every MCP tool" in w.message for w in lint_policy(policy))


HTTP = """
tools:
  remote:
    type: mcp
    url: https://mcp.example.com/mcp/
    headers_inject: {Authorization: "Bearer 0123456789abcdef"}
    tools_allow: ["get_*"]
"""


def test_url_tool_loads_with_headers_inject() -> None:
    policy = load_policy(HTTP)
    tool = policy.tools["remote"]
    assert isinstance(tool, McpTool)
    assert tool.url == "https://mcp.example.com/mcp" and tool.command == ()
    assert policy.secrets() == [b"Bearer 0123456789abcdef"]
    assert "0123456789abcdef" not in repr(tool)


@pytest.mark.parametrize("text,message", [
    (HTTP + "    env_inject: {X: y}\n", "env_inject: applies to a command"),
    ("tools:\n  m:\n    type: mcp\n    command: [/bin/x]\n"
     "    headers_inject: {Authorization: 0123456789abcdef}\n", "applies to a url"),
    ("tools:\n  m:\n    type: mcp\n    url: ftp://x/\n", "http:// or https://"),
    ("tools:\n  m:\n    type: mcp\n    tools_allow: []\n", "command: is required"),
])
def test_url_tool_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(text)


def test_http_and_stdio_tools_are_reached_their_own_way() -> None:
    from carapace.server.policy import decide_mcp_http
    http, stdio = load_policy(HTTP), load_policy(BASE)
    assert decide_mcp_http(http, "default", "remote", "POST").allow
    assert decide_mcp_http(http, "default", "remote", "PUT").code == "bad_request"
    assert decide_mcp_http(stdio, "default", "gh", "POST").code == "wrong_type"
    assert decide_mcp_session(http, "default", "remote", []).code == "wrong_type"


def test_lint_warns_about_a_credential_over_plain_http() -> None:
    policy = load_policy(HTTP.replace("https://mcp.example.com", "http://mcp.example.com"))
    assert any("plain http" in w.message for w in lint_policy(policy))
