"""Lint: rules that load fine but are risky or do nothing."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from .model import CliTool, Policy
from .quoting import _show


@dataclass(frozen=True)
class LintWarning:
    """One risky or useless rule found by :func:`lint_policy`."""

    tool: str | None
    level: str
    message: str

    def as_dict(self) -> dict[str, str | None]:
        return {"tool": self.tool, "level": self.level, "message": self.message}


_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_PLACEHOLDER_RE: Final = re.compile(r"<[^<>]+>")


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
            if binary_problem is not None:
                problem = binary_problem(tool.binary)
                if problem:
                    warn(name, f"binary {tool.binary}: {problem}", "error")
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
            for method, filt in (tool.jsonrpc_param_filters or {}).items():
                if not filt.allow_patterns:
                    warn(name, f"jsonrpc_param_filters.{method}.allow_patterns is empty: "
                         f"every {method} call is denied")
                if (tool.jsonrpc_allow_methods is not None
                        and method not in tool.jsonrpc_allow_methods):
                    warn(name, f"jsonrpc_param_filters.{method} filters a method that is not "
                         "allowed (no effect)")
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
