"""``tools_approve`` and ``approval`` on ``type: mcp`` tools: what waits for a person."""

from __future__ import annotations

import pytest

from carapace.server.policy import (
    DEFAULT_APPROVAL_TIMEOUT_SECS,
    McpTool,
    PolicyError,
    decide_mcp_request,
    load_policy,
)

BASE = """
tools:
  gh:
    type: mcp
    command: [/usr/bin/github-mcp-server, stdio]
    tools_allow: ["get_*", "create_*", "delete_issue"]
    tools_deny: ["create_secret*"]
    tool_param_filters:
      create_issue: {fields: [owner], allow_patterns: ["my-org"]}
    tools_approve: ["create_*", "delete_*", "merge_*"]
    approval: {timeout_secs: 30, remember_secs: 600}
"""


def gh(text: str = BASE) -> McpTool:
    tool = load_policy(text).tools["gh"]
    assert isinstance(tool, McpTool)
    return tool


def call(tool: McpTool, name: str, **arguments: object):  # type: ignore[no-untyped-def]
    return decide_mcp_request(tool, "tools/call", {"name": name, "arguments": arguments})


def test_loads_the_keys() -> None:
    tool = gh()
    assert tool.tools_approve == ("create_*", "delete_*", "merge_*")
    assert tool.approval.timeout_secs == 30 and tool.approval.remember_secs == 600


def test_defaults_ask_nothing() -> None:
    tool = gh(BASE.replace('    tools_approve: ["create_*", "delete_*", "merge_*"]\n', "")
              .replace("    approval: {timeout_secs: 30, remember_secs: 600}\n", ""))
    assert tool.tools_approve == ()
    assert tool.approval.timeout_secs == DEFAULT_APPROVAL_TIMEOUT_SECS
    assert tool.approval.remember_secs == 0
    assert not call(tool, "delete_issue").decision.needs_approval


def test_an_allowed_matching_call_needs_approval() -> None:
    verdict = call(gh(), "delete_issue", number=3)
    assert verdict.decision.allow and verdict.decision.needs_approval
    assert verdict.decision.approval == 'tools.gh.tools_approve[1] "delete_*"'
    assert verdict.subject == "delete_issue"


def test_an_allowed_call_that_matches_nothing_runs_at_once() -> None:
    verdict = call(gh(), "get_me")
    assert verdict.decision.allow and not verdict.decision.needs_approval


def test_a_param_filtered_call_needs_approval_only_when_it_passes() -> None:
    passing = call(gh(), "create_issue", owner="my-org").decision
    assert passing.allow and passing.needs_approval
    assert "tool_param_filters" in passing.rule
    failing = call(gh(), "create_issue", owner="someone-else").decision
    assert not failing.allow and not failing.needs_approval


def test_a_denied_call_never_asks() -> None:
    denied = call(gh(), "create_secret_key").decision  # tools_deny wins
    assert not denied.allow and not denied.needs_approval
    unlisted = call(gh(), "merge_pr").decision  # approve does not allow
    assert not unlisted.allow and not unlisted.needs_approval


def test_only_tool_calls_are_gated() -> None:
    listed = decide_mcp_request(gh(), "tools/list", {}).decision
    assert listed.allow and not listed.needs_approval


@pytest.mark.parametrize(("key", "value", "message"), [
    ("tools_approve", "create_*", "list"),
    ("tools_approve", "[1]", "string"),
    ("approval", "{timeout_secs: 0}", "timeout_secs"),
    ("approval", "{remember_secs: -1}", "remember_secs"),
    ("approval", "{forever: true}", "forever"),
])
def test_bad_values_are_errors(key: str, value: str, message: str) -> None:
    text = BASE.replace('    tools_approve: ["create_*", "delete_*", "merge_*"]\n', "") \
        .replace("    approval: {timeout_secs: 30, remember_secs: 600}\n", "")
    with pytest.raises(PolicyError) as err:
        load_policy(text + f"    {key}: {value}\n")
    assert message in str(err.value)


def test_cli_approval_keys_stay_errors_on_mcp_tools() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(BASE + '    approve_patterns: ["*"]\n')
    assert "approve_patterns" in str(err.value)


def _lint(text: str) -> list[str]:
    from carapace.server.policy import lint_policy
    return [w.message for w in lint_policy(load_policy(text)) if "tools_approve" in w.message]


def test_lint_names_an_approval_that_can_never_be_asked() -> None:
    warnings = _lint(BASE)
    # merge_* shares no prefix with any tools_allow glob: every such call is denied first.
    assert len(warnings) == 1 and 'tools_approve[2] "merge_*" never asks anyone' in warnings[0]


def test_lint_names_an_approved_literal_that_is_denied() -> None:
    text = BASE.replace('tools_approve: ["create_*", "delete_*", "merge_*"]',
                        'tools_approve: ["create_secret_key", "get_me"]')
    warnings = _lint(text)
    assert len(warnings) == 1
    assert 'tools_approve[0] "create_secret_key"' in warnings[0]
    assert "matches a deny pattern" in warnings[0]


def test_lint_keeps_quiet_when_the_globs_may_overlap() -> None:
    text = BASE.replace('"merge_*"', '"get_*"').replace('"delete_*"', '"d*"')
    assert _lint(text) == []
