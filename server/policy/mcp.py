"""MCP decisions: which MCP requests a VM may send a host MCP server, and what it may see.

Pure, like the rest of the package: one parsed JSON-RPC message in, a verdict
out. The streaming side (lines, ids, replies) is ``server/mcp/``. Meaning of
the keys in the package docstring ("MCP tools").
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

from .decision import CliDecision, Decision, _cli_deny, _deny, _lookup, _rule
from .http import _parse_json
from .model import BASE_ENV, DEFAULT_CWD, McpTool, Policy
from .params import check_params
from .quoting import _show

OPEN_METHODS: Final = frozenset({
    "initialize", "ping", "logging/setLevel",
    "tools/list", "resources/list", "resources/templates/list", "prompts/list",
})
"""Client requests that pass unchecked: the handshake, liveness, and the lists (whose
answers are filtered instead)."""

CALL_METHODS: Final = frozenset({
    "tools/call", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "prompts/get", "completion/complete",
})
"""Client requests judged by the tool's rules: each names one tool, resource or prompt."""

LIST_RESULTS: Final[dict[str, tuple[str, str, str]]] = {
    "tools/list": ("tools", "name", "tools"),
    "resources/list": ("resources", "uri", "resources"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", "resources"),
    "prompts/list": ("prompts", "name", "prompts"),
}
"""method → (key of the result's array, key naming each item, which rules judge it)."""


@dataclass(frozen=True)
class McpVerdict:
    """The verdict on one client request, and what it named (for the audit trail)."""

    decision: Decision
    subject: str | None = None
    """The MCP tool name, resource URI or prompt name the request named, if any."""


def parse_message(line: bytes) -> tuple[Any, str | None]:
    """One MCP message, strictly (UTF-8, no duplicate keys, no NaN), or why it is not JSON."""
    doc, problem = _parse_json(line)
    if problem is not None:
        return None, problem.replace("the JSON body", "it").replace("the body", "it")
    return doc, None


def decide_mcp_session(policy: Policy, agent: str, tool: str, argv: list[bytes]) -> CliDecision:
    """Whether ``agent`` may start a session with MCP tool ``tool``; if so, what to exec.

    The program is the policy's ``command`` (the VM adds no arguments), in
    ``/``, with :data:`BASE_ENV` and ``env_inject`` only: the VM's environment
    and directory mean nothing on the host.
    """
    found = _lookup(policy, agent, tool, McpTool)
    if isinstance(found, Decision):
        return _cli_deny(found.reason, found.rule, found.code)
    assert isinstance(found, McpTool)
    if not found.command:
        return _cli_deny(f"tool {_show(tool)} is an MCP server over HTTP, not a command",
                         f"default deny: tools.{tool} has a url", "wrong_type")
    if not isinstance(argv, list | tuple) or argv:
        return _cli_deny("an MCP server takes no arguments from the VM (the host policy's "
                         "command is run as is)",
                         f"default deny: tools.{tool}.command is fixed", "bad_request")
    env = {k.encode(): v.encode() for k, v in BASE_ENV.items()}
    env.update({k.encode("utf-8"): v.encode("utf-8") for k, v in found.env_inject.items()})
    return CliDecision(
        allow=True, reason="an MCP session with the policy's command",
        rule=f"tools.{tool}.command", binary=found.binary,
        argv=[a.encode("utf-8") for a in found.command], env=env, cwd=DEFAULT_CWD)


HTTP_METHODS: Final = frozenset({"POST", "GET", "DELETE"})
"""What Streamable HTTP uses: POST messages, GET the server's stream, DELETE the session."""


def decide_mcp_http(policy: Policy, agent: str, tool: str, method: str) -> Decision:
    """Whether ``agent`` may send this HTTP request to MCP tool ``tool`` (a ``url`` tool);
    the messages in its body are judged one by one afterwards."""
    found = _lookup(policy, agent, tool, McpTool)
    if isinstance(found, Decision):
        return found
    assert isinstance(found, McpTool)
    if found.url is None:
        return _deny(f"tool {_show(tool)} is a stdio MCP server, not one over HTTP",
                     f"default deny: tools.{tool} has a command", "wrong_type")
    if method not in HTTP_METHODS:
        return _deny(f"MCP over HTTP has no {_show(str(method))} requests",
                     "default deny: MCP over HTTP is POST, GET or DELETE", "bad_request")
    return Decision(allow=True, reason=f"{method} to the MCP server over HTTP",
                    rule=f"tools.{tool}.url")


def _glob_verdict(tool: McpTool, key: str, deny_key: str | None, value: str,
                  what: str) -> Decision:
    """Deny globs first (they win), then allow globs; nothing matching is denied."""
    if deny_key is not None:
        for k, pattern in enumerate(getattr(tool, deny_key)):
            if fnmatch.fnmatchcase(value, pattern):
                return _deny(f"{what} {_show(value)} matches a deny pattern",
                             _rule(tool.name, deny_key, k, pattern))
    for k, pattern in enumerate(getattr(tool, key)):
        if fnmatch.fnmatchcase(value, pattern):
            return Decision(allow=True, reason=f"{what} {_show(value)} is allowed",
                            rule=_rule(tool.name, key, k, pattern))
    return _deny(f"{what} {_show(value)} is not allowed",
                 f"default deny: no tools.{tool.name}.{key} entry matches")


def tool_verdict(tool: McpTool, name: str) -> Decision:
    """May the VM use MCP tool ``name`` at all (its arguments aside)?"""
    return _glob_verdict(tool, "tools_allow", "tools_deny", name, "MCP tool")


def resource_verdict(tool: McpTool, uri: str) -> Decision:
    return _glob_verdict(tool, "resources_allow", None, uri, "resource")


def prompt_verdict(tool: McpTool, name: str) -> Decision:
    return _glob_verdict(tool, "prompts_allow", None, name, "prompt")


_JUDGES: Final[dict[str, Callable[[McpTool, str], Decision]]] = {
    "tools": tool_verdict, "resources": resource_verdict, "prompts": prompt_verdict,
}


def _named(params: Any, key: str, method: str) -> str | Decision:
    """``params[key]`` as a string, or the deny of a malformed request."""
    value = params.get(key) if isinstance(params, dict) else None
    if not isinstance(value, str):
        return _deny(f"{method} needs params.{key} as a string",
                     "default deny: malformed MCP request", "bad_request")
    return value


def _tool_call(tool: McpTool, params: Any) -> McpVerdict:
    name = _named(params, "name", "tools/call")
    if isinstance(name, Decision):
        return McpVerdict(name)
    verdict = tool_verdict(tool, name)
    if verdict.allow and name in tool.tool_param_filters:
        arguments = params.get("arguments", {})
        fpath = f"tools.{tool.name}.tool_param_filters.{name}"
        denial = check_params(tool.tool_param_filters[name], arguments,
                              f"MCP tool {_show(name)}", fpath)
        if denial is not None:
            reason, rule = (text.replace("params.", "arguments.") for text in denial)
            return McpVerdict(_deny(reason, rule), name)
        verdict = Decision(allow=True, reason=f"{verdict.reason}; its arguments pass the filter",
                           rule=f"{verdict.rule}; {fpath}")
    if verdict.allow:
        gate = next((_rule(tool.name, "tools_approve", k, pattern)
                     for k, pattern in enumerate(tool.tools_approve)
                     if fnmatch.fnmatchcase(name, pattern)), "")
        if gate:
            verdict = replace(verdict, approval=gate)
    return McpVerdict(verdict, name)


def _completion(tool: McpTool, params: Any) -> McpVerdict:
    """``completion/complete`` names a prompt or a resource template: judged as that."""
    ref = params.get("ref") if isinstance(params, dict) else None
    kind = ref.get("type") if isinstance(ref, dict) else None
    if kind == "ref/prompt":
        name = _named(ref, "name", "completion/complete")
        if isinstance(name, Decision):
            return McpVerdict(name)
        return McpVerdict(prompt_verdict(tool, name), name)
    if kind == "ref/resource":
        uri = _named(ref, "uri", "completion/complete")
        if isinstance(uri, Decision):
            return McpVerdict(uri)
        return McpVerdict(resource_verdict(tool, uri), uri)
    return McpVerdict(_deny("completion/complete needs params.ref of type ref/prompt or "
                            "ref/resource", "default deny: malformed MCP request",
                            "bad_request"))


def decide_mcp_request(tool: McpTool, method: str, params: Any) -> McpVerdict:
    """The verdict on one client request (a JSON-RPC call with an id) to the host server."""
    if method in OPEN_METHODS:
        return McpVerdict(Decision(allow=True, reason=f"{method} is always open",
                                   rule="mcp: open method"))
    if method == "tools/call":
        return _tool_call(tool, params)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = _named(params, "uri", method)
        if isinstance(uri, Decision):
            return McpVerdict(uri)
        return McpVerdict(resource_verdict(tool, uri), uri)
    if method == "prompts/get":
        name = _named(params, "name", method)
        if isinstance(name, Decision):
            return McpVerdict(name)
        return McpVerdict(prompt_verdict(tool, name), name)
    if method == "completion/complete":
        return _completion(tool, params)
    return McpVerdict(_deny(f"MCP method {_show(method)} is not one Carapace knows how to "
                            "judge", "default deny: unknown MCP method"))


def filter_list(tool: McpTool, method: str, result: Any) -> tuple[Any, int] | None:
    """A list answer with only what the VM may use, and how many items went; None if the
    answer is not the shape MCP gives it (then nothing of it may pass)."""
    key, item_key, kind = LIST_RESULTS[method]
    if not isinstance(result, dict) or not isinstance(result.get(key), list):
        return None
    judge = _JUDGES[kind]
    kept = []
    for item in result[key]:
        if not isinstance(item, dict) or not isinstance(item.get(item_key), str):
            return None
        if judge(tool, item[item_key]).allow:
            kept.append(item)
    return {**result, key: kept}, len(result[key]) - len(kept)


def notification_passes(tool: McpTool, method: str, params: Any) -> bool:
    """Whether a notification from the host server may reach the VM: a resource update
    only for a resource it may read; everything else (``list_changed``, progress,
    log messages) passes."""
    if method == "notifications/resources/updated":
        uri = params.get("uri") if isinstance(params, dict) else None
        return isinstance(uri, str) and resource_verdict(tool, uri).allow
    return True
