"""Lint: rules that load fine but are risky or do nothing."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from .cli import argv_matches
from .flags import denied_flag, unlisted_flag
from .mcp import tool_verdict
from .model import CliTool, HttpTool, McpTool, Policy
from .quoting import _show


@dataclass(frozen=True)
class LintWarning:
    """One risky or useless rule found by :func:`lint_policy`."""

    tool: str | None
    level: str
    message: str

    def as_dict(self) -> dict[str, str | None]:
        return {"tool": self.tool, "level": self.level, "message": self.message}


@dataclass(frozen=True)
class RiskyArgs:
    """Arguments of a known tool that reach past what the VM should: its spellings and why."""

    args: tuple[str, ...]
    why: str


RISKY_ARGS: Final[Mapping[str, tuple[RiskyArgs, ...]]] = {
    # Keyed by the binary's file name. A flag entry lists its spellings (all must be
    # denied); an entry that is not a flag is a command line probed against the rules.
    "gh": (
        RiskyArgs(("--jq", "-q"), "a jq filter reads the host environment ($ENV), the "
                  "injected GH_TOKEN included, and can print it in a form masking misses"),
        RiskyArgs(("--body-file", "-F"), "reads a file on the host and posts it"),
        RiskyArgs(("--recover",), "reads a file on the host"),
        RiskyArgs(("--web", "-w"), "opens a browser on the host"),
        RiskyArgs(("--editor", "-e"), "starts an editor on the host"),
        RiskyArgs(("api", "user"), "gh api calls any endpoint the token reaches and reads "
                  "host files with -F field=@FILE"),
    ),
    "op": (
        RiskyArgs(("--out-file", "-o"), "writes a file on the host (with --force over any "
                  "file the server's user may write)"),
        RiskyArgs(("--reveal",), "prints concealed fields in list output"),
        RiskyArgs(("--config",), "points op at another configuration directory on the host"),
    ),
    "gog": (
        RiskyArgs(("--account",), "selects another account of the host's keyring than "
                  "GOG_ACCOUNT"),
        RiskyArgs(("--force",), "skips the confirmation of destructive commands"),
    ),
}
"""Risky flags and commands of the tools the examples cover; ``policy lint`` warns on them."""

_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_PLACEHOLDER_RE: Final = re.compile(r"<[^<>]+>")
_PHONE_GLOB: Final = re.compile(r"[0-9+*?\[\]!-]*\Z")
"""A glob that can match a number normalized to digits and '+'."""


def lint_policy(
    policy: Policy, *, binary_problem: Callable[[str], str | None] | None = None
) -> list[LintWarning]:
    """Warnings about rules that are risky or do nothing.

    ``binary_problem`` (the caller's I/O, e.g. os.access) returns why a CLI
    binary cannot run, or None; without it binaries are not checked.
    """
    out: list[LintWarning] = []

    def warn(tool: str | None, message: str, level: str = "warning") -> None:
        out.append(LintWarning(tool, level, message))

    for name, tool in policy.tools.items():
        if tool.timeout_secs is None:
            warn(name, "no timeout_secs: a hung request is never cut off")
        if not tool.audit.enabled:
            warn(name, "audit.enabled is false: requests to this tool are not audited")
        if isinstance(tool, CliTool):
            if not tool.argv_allow_patterns:
                warn(name, "argv_allow_patterns is empty: every command is denied")
            for k, pattern in enumerate(tool.argv_allow_patterns):
                if pattern and set(pattern) <= {"*"}:
                    warn(name, f"argv_allow_patterns[{k}] {_show(pattern)} allows every "
                         "argument list")
            for key, value in tool.env_inject.items():
                if _PLACEHOLDER_RE.search(value):
                    warn(name, f"env_inject.{key} looks like an unfilled placeholder")
            for message in _risky_args(tool):
                warn(name, message)
            if binary_problem is not None:
                problem = binary_problem(tool.binary)
                if problem:
                    warn(name, f"binary {tool.binary}: {problem}", "error")
        elif isinstance(tool, McpTool):
            _lint_mcp(tool, warn, binary_problem)
        else:
            if tool.allow_paths is None:
                warn(name, "no allow_paths: every path of the upstream is reachable")
            elif not tool.allow_paths:
                warn(name, "allow_paths is empty: every request is denied")
            else:
                for k, entry in enumerate(tool.allow_paths):
                    if entry.path in ("/*", "*") or set(entry.path) <= {"/", "*"}:
                        warn(name, f"allow_paths[{k}] {_show(entry.text)} opens every path")
            if tool.jsonrpc_rules and tool.jsonrpc_allow_methods is None:
                warn(name, "JSON-RPC rules without jsonrpc_allow_methods: every method not "
                     "in the deny list is allowed")
            if tool.jsonrpc_allow_methods is not None and not tool.jsonrpc_allow_methods:
                warn(name, "jsonrpc_allow_methods is empty: every JSON-RPC call is denied")
            _lint_param_filters(tool, warn)
            for method, filt in (tool.jsonrpc_param_filters or {}).items():
                if not filt.allow_patterns:
                    warn(name, f"jsonrpc_param_filters.{method}.allow_patterns is empty: "
                         f"every {method} call is denied")
                if (tool.jsonrpc_allow_methods is not None
                        and method not in tool.jsonrpc_allow_methods):
                    warn(name, f"jsonrpc_param_filters.{method} filters a method that is not "
                         "allowed (no effect)")
            for method in tool.jsonrpc_approve_methods:
                if method in (tool.jsonrpc_deny_methods or ()) or (
                        tool.jsonrpc_allow_methods is not None
                        and method not in tool.jsonrpc_allow_methods):
                    warn(name, f"jsonrpc_approve_methods lists {_show(method)}, which is "
                         "denied: a denied call never asks (no effect)")
            host = urlsplit(tool.upstream).hostname or ""
            if (tool.headers_inject and tool.upstream.startswith("http://")
                    and host not in _LOOPBACK_HOSTS):
                warn(name, "headers_inject over plain http to a non-loopback host: the "
                     "credential crosses the network unencrypted")
    if policy.agents is not None:
        for agent, grant in policy.agents.items():
            if not grant.tools:
                warn(None, f"agents.{agent}.tools is empty: this agent can use nothing")
    return out


def _lint_mcp(tool: McpTool, warn: Callable[..., None],
              binary_problem: Callable[[str], str | None] | None) -> None:
    """An MCP tool that allows every MCP tool also allows those a later server adds."""
    if not tool.tools_allow:
        warn(tool.name, "tools_allow is empty: every MCP tool call is denied")
    for k, pattern in enumerate(tool.tools_allow):
        if pattern and set(pattern) <= {"*"}:
            warn(tool.name, f"tools_allow[{k}] {_show(pattern)} allows every MCP tool, also "
                 "those a later version of the server adds")
    for k, pattern in enumerate(tool.tools_approve):
        why = _never_allowed(tool, pattern)
        if why:
            warn(tool.name, f"tools_approve[{k}] {_show(pattern)} never asks anyone: {why}; "
                 "allow the MCP tool in tools_allow or drop the entry")
    if binary_problem is not None and tool.command:
        problem = binary_problem(tool.binary)
        if problem:
            warn(tool.name, f"command {tool.binary}: {problem}", "error")
    host = urlsplit(tool.url).hostname or "" if tool.url else ""
    if tool.headers_inject and tool.url and tool.url.startswith("http://") \
            and host not in _LOOPBACK_HOSTS:
        warn(tool.name, "headers_inject over plain http to a non-loopback host: the "
             "credential crosses the network unencrypted")


_GLOB_CHARS: Final = re.compile(r"[*?\[]")


def _literal_prefix(pattern: str) -> str:
    match = _GLOB_CHARS.search(pattern)
    return pattern if match is None else pattern[:match.start()]


def _never_allowed(tool: McpTool, pattern: str) -> str:
    """Why no name ``pattern`` matches can pass tools_allow/tools_deny, or "" if one may.

    Sound, not complete: two globs whose literal prefixes diverge match disjoint
    names; anything subtler is left alone rather than warned about wrongly.
    """
    if not _GLOB_CHARS.search(pattern):
        verdict = tool_verdict(tool, pattern)
        return "" if verdict.allow else verdict.reason
    prefix = _literal_prefix(pattern)
    for allowed in tool.tools_allow:
        other = _literal_prefix(allowed)
        if other.startswith(prefix) or prefix.startswith(other):
            return ""
    return "no tools_allow pattern matches a name it matches"


def _risky_args(tool: CliTool) -> list[str]:
    """Warnings for the :data:`RISKY_ARGS` of this tool's binary that its rules let through."""
    out: list[str] = []
    for risky in RISKY_ARGS.get(posixpath.basename(tool.binary), ()):
        if risky.args[0].startswith("-"):
            open_ = [f for f in risky.args if _flag_passes(tool, f)]
            if open_:
                out.append(f"{' / '.join(open_)} is not in argv_deny_flags: {risky.why}")
        elif _argv_passes(tool, list(risky.args)):
            out.append(f"the rules allow {_show(' '.join(risky.args))}: {risky.why}")
    return out


def _flag_passes(tool: CliTool, flag: str) -> bool:
    """Whether the flag gets past ``argv_deny_flags`` and ``argv_allow_flags``."""
    if denied_flag([flag], tool.argv_deny_flags) is not None:
        return False
    return tool.argv_allow_flags is None or unlisted_flag([flag], tool.argv_allow_flags) is None


def _argv_passes(tool: CliTool, args: list[str]) -> bool:
    """Whether an argument list passes the tool's argv rules (deny, flags, allow)."""
    if any(argv_matches(args, p) for p in tool.argv_deny_patterns):
        return False
    if denied_flag(args, tool.argv_deny_flags) is not None:
        return False
    if tool.argv_allow_flags is not None and unlisted_flag(args, tool.argv_allow_flags):
        return False
    return any(argv_matches(args, p) for p in tool.argv_allow_patterns)


def _lint_param_filters(tool: HttpTool, warn: Callable[[str, str], None]) -> None:
    """Filters that let params through unchecked, or match numbers as signal-cli does not."""
    for method, filt in (tool.jsonrpc_param_filters or {}).items():
        where = f"jsonrpc_param_filters.{method}"
        patterns = (*filt.allow_patterns, *filt.deny_patterns)
        if filt.normalize is None and any(p.startswith("+") for p in patterns):
            warn(tool.name, f"{where} matches phone numbers without normalize: phone: "
                 "signal-cli ignores spaces and punctuation, so \"+1 900 555 0000\" passes "
                 "a deny pattern \"+1900*\"")
        if filt.normalize == "phone":
            for p in patterns:
                if not _PHONE_GLOB.match(p):
                    warn(tool.name, f"{where}: pattern {_show(p)} can never match a "
                         "normalized number (digits and '+' only)")
        if filt.allow_fields is None:
            warn(tool.name, f"{where} has no allow_fields: every other param passes unchecked "
                 "(signal-cli reads host files from attachment, sends to groupId, and also "
                 "reads spellings a deny_fields list misses: attachments, group-id)")
