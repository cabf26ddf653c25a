"""Loading: the strict YAML reader and the walk that turns a document into a Policy."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import yaml

from carapace.runtime.http import TOKEN

from .flags import FLAG_RE
from .http import NOT_INJECTABLE
from .limits import CLI_LIMITS, HTTP_LIMITS
from .model import (
    _NAME_RE,
    DEFAULT_MIN_SECRET_LENGTH,
    PARAM_NORMALIZERS,
    SECRET_REF_KINDS,
    AgentGrant,
    ApprovalConfig,
    AuditConfig,
    CliTool,
    HttpTool,
    McpTool,
    ParamFilter,
    PathRule,
    Policy,
    PolicyError,
    RateLimit,
    SecretRef,
    Settings,
    Tool,
)
from .quoting import _kind, _show
from .sandbox import ToolSandbox, load_sandbox_setting, load_tool_sandbox
from .secrets import env_name_is_secret, passthrough_refusal

_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_CLI_KEYS: Final = frozenset(
    {
        "type", "binary", "argv_allow_patterns", "argv_deny_patterns", "env_inject",
        "env_passthrough", "cwd_allowed", "timeout_secs", "audit", "rate_limit", "agents",
        "limits",
        "argv_deny_flags", "argv_allow_flags",
        "sandbox",
        "global_rate_limit",
        "approve_patterns", "approval",
    }
)
_HTTP_KEYS: Final = frozenset(
    {
        "type", "upstream", "allow_paths", "jsonrpc_allow_methods", "jsonrpc_deny_methods",
        "jsonrpc_param_filters", "headers_inject", "rate_limit", "timeout_secs", "audit",
        "agents", "limits", "global_rate_limit",
        "jsonrpc_approve_methods", "approve_paths", "approval",
    }
)


_MCP_KEYS: Final = frozenset(
    {
        "type", "command", "env_inject", "tools_allow", "tools_deny", "tool_param_filters",
        "resources_allow", "prompts_allow", "timeout_secs", "rate_limit", "audit", "agents",
        "url", "headers_inject", "global_rate_limit", "sandbox",
        "tools_approve", "approval",
    }
)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML keeps the last silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only keys written in this mapping count: a key that overrides one
    # brought in by a YAML merge (<<: *base) is not a duplicate.
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable: construct_mapping below reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_show(str(key))}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


class _Loader:
    """Walks the parsed YAML, turning it into typed objects or a PolicyError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.min_secret_length = DEFAULT_MIN_SECRET_LENGTH

    def fail(self, path: str, problem: str, fix: str = "") -> NoReturn:
        where = f"{path}: " if path else ""
        tail = f" {fix}" if fix else ""
        raise PolicyError(f"{self.source}: {where}{problem}.{tail}", path, self.source)

    # -- primitives ---------------------------------------------------------

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be {what}, not {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(
                    path,
                    f"keys must be strings, found {_kind(key)} key",
                    "Quote the key (YAML reads yes/no/on/off as booleans and digits as numbers).",
                )
        return value

    def known_keys(
        self, value: dict[str, Any], path: str, allowed: Iterable[str], hint: str = ""
    ) -> None:
        allowed_set = frozenset(allowed)
        for key in value:
            if key not in allowed_set:
                self.fail(
                    f"{path}.{key}" if path else key,
                    f"unknown key {_show(key)}",
                    hint or f"Allowed keys here: {', '.join(sorted(allowed_set))}.",
                )

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_kind(value)}", "Quote the value.")
        if "\x00" in value:
            self.fail(path, "must not contain NUL characters")
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list of strings, not {_kind(value)}",
                      "Write it as a YAML list, e.g. [\"a\", \"b\"] or one '- item' per line.")
        return tuple(self.string(item, f"{path}[{i}]") for i, item in enumerate(value))

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {_kind(value)}")
        return value

    def positive_number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a positive number, not {_kind(value)}",
                      "Write a number of seconds such as 30.")
        if not (0 < value < float("inf")):
            self.fail(path, f"must be a positive number, not {value}",
                      "Write a number of seconds such as 30.")
        return float(value)

    def positive_int(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be a positive whole number, not {_kind(value)}")
        if value < 1:
            self.fail(path, f"must be a positive whole number, not {value}")
        return value

    def name(self, value: Any, path: str, what: str) -> str:
        if not isinstance(value, str) or not _NAME_RE.match(value):
            self.fail(path, f"{what} {_show(str(value))} is not a valid name",
                      "Use letters, digits, '.', '_' and '-', starting with a letter or digit.")
        return value

    # -- sections -----------------------------------------------------------

    def policy(self, doc: Any) -> Policy:
        if doc is None:
            self.fail("", "the file is empty", "Add a 'tools:' section.")
        top = self.mapping(doc, "", "a mapping with a 'tools' key")
        self.known_keys(top, "", ("tools", "agents", "settings"))
        settings = self.settings(top.get("settings", {}), "settings")
        self.min_secret_length = settings.min_secret_length
        if "tools" not in top:
            self.fail("tools", "the policy has no 'tools' section",
                      "Add 'tools:' with at least one tool, or 'tools: {}' to deny everything.")
        raw_tools = self.mapping(top["tools"], "tools")
        tools: dict[str, Tool] = {}
        for tool_name, spec in raw_tools.items():
            self.name(tool_name, f"tools.{tool_name}", "tool name")
            tools[tool_name] = self.tool(tool_name, spec, f"tools.{tool_name}")
        agents = None
        if "agents" in top:
            agents = self.agents(top["agents"], "agents", tools)
        for tool in tools.values():
            if tool.agents is not None and agents is not None:
                for i, agent in enumerate(tool.agents):
                    if agent not in agents:
                        self.fail(
                            f"tools.{tool.name}.agents[{i}]",
                            f"agent {_show(agent)} is not defined in the top-level agents section",
                            "Add it to 'agents:' or remove it from this list.",
                        )
        return Policy(
            tools=MappingProxyType(tools),
            agents=None if agents is None else MappingProxyType(agents),
            settings=settings,
            source=self.source,
        )

    def settings(self, value: Any, path: str) -> Settings:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("min_secret_length", "sandbox"))
        min_len = DEFAULT_MIN_SECRET_LENGTH
        if "min_secret_length" in raw:
            min_len = self.positive_int(raw["min_secret_length"], f"{path}.min_secret_length")
        sandbox = Settings().sandbox
        if "sandbox" in raw:
            sandbox = load_sandbox_setting(self, raw["sandbox"], f"{path}.sandbox")
        return Settings(min_secret_length=min_len, sandbox=sandbox)

    def agents(self, value: Any, path: str, tools: Mapping[str, Tool]) -> dict[str, AgentGrant]:
        raw = self.mapping(value, path)
        out: dict[str, AgentGrant] = {}
        for agent_name, spec in raw.items():
            apath = f"{path}.{agent_name}"
            self.name(agent_name, apath, "agent name")
            body = self.mapping(spec, apath)
            self.known_keys(body, apath, ("tools", "rate_limit"))
            if "tools" not in body:
                self.fail(f"{apath}.tools", "is required",
                          "List the tools this agent may use, e.g. tools: [signal-cli].")
            granted = self.strings(body["tools"], f"{apath}.tools")
            for i, tool_name in enumerate(granted):
                if tool_name not in tools:
                    self.fail(f"{apath}.tools[{i}]", f"unknown tool {_show(tool_name)}",
                              f"Known tools: {', '.join(sorted(tools)) or '(none)'}.")
            rate = None
            if "rate_limit" in body:
                rate = self.rate_limit(body["rate_limit"], f"{apath}.rate_limit")
            out[agent_name] = AgentGrant(name=agent_name, tools=granted, rate_limit=rate)
        return out

    def tool(self, tool_name: str, spec: Any, path: str) -> Tool:
        raw = self.mapping(spec, path)
        if "type" not in raw:
            self.fail(f"{path}.type", "is required", "Set 'type: cli' or 'type: http'.")
        kind = raw["type"]
        if kind == "cli":
            own, other, other_kind = _CLI_KEYS, _HTTP_KEYS, "http"
        elif kind == "http":
            own, other, other_kind = _HTTP_KEYS, _CLI_KEYS, "cli"
        elif kind == "mcp":
            return self.mcp_tool(tool_name, raw, path)
        else:
            self.fail(f"{path}.type",
                      f"must be 'cli', 'http' or 'mcp', not {_show(str(kind))}")
        for key in raw:
            if key not in own:
                hint = (
                    f"'{key}' belongs to {other_kind} tools; this tool has type: {kind}."
                    if key in other
                    else f"Allowed keys for a {kind} tool: {', '.join(sorted(own))}."
                )
                self.fail(f"{path}.{key}", f"unknown key {_show(key)}", hint)
        return self.cli_tool(tool_name, raw, path) if kind == "cli" else self.http_tool(
            tool_name, raw, path
        )

    def common(self, raw: dict[str, Any], path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "timeout_secs" in raw:
            out["timeout_secs"] = self.positive_number(raw["timeout_secs"], f"{path}.timeout_secs")
        if "rate_limit" in raw:
            out["rate_limit"] = self.rate_limit(raw["rate_limit"], f"{path}.rate_limit")
        if "audit" in raw:
            out["audit"] = self.audit(raw["audit"], f"{path}.audit")
        if "agents" in raw:
            names = self.strings(raw["agents"], f"{path}.agents")
            for i, agent in enumerate(names):
                self.name(agent, f"{path}.agents[{i}]", "agent name")
            out["agents"] = names
        if "limits" in raw:
            out["limits"] = self.limits(raw["limits"], f"{path}.limits", raw["type"])
        if "global_rate_limit" in raw:
            out["global_rate_limit"] = self.rate_limit(raw["global_rate_limit"],
                                                       f"{path}.global_rate_limit")
        return out

    def limits(self, value: Any, path: str, kind: str) -> Mapping[str, int]:
        """A tool's overrides of the server-wide parse limits (``limits.py``)."""
        raw = self.mapping(value, path)
        own, other = (HTTP_LIMITS, CLI_LIMITS) if kind == "http" else (CLI_LIMITS, HTTP_LIMITS)
        for key in raw:
            if key in other:
                self.fail(f"{path}.{key}", f"unknown key {_show(key)}",
                          f"'{key}' limits {'cli' if kind == 'http' else 'http'} tools; "
                          f"allowed keys for a {kind} tool: {', '.join(sorted(own))}.")
        self.known_keys(raw, path, own)
        return MappingProxyType({key: self.positive_int(raw[key], f"{path}.{key}")
                                 for key in sorted(raw)})

    def rate_limit(self, value: Any, path: str) -> RateLimit:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("max_requests", "window_secs"))
        for key in ("max_requests", "window_secs"):
            if key not in raw:
                self.fail(f"{path}.{key}", "is required",
                          "Write e.g. rate_limit: {max_requests: 100, window_secs: 60}.")
        return RateLimit(
            max_requests=self.positive_int(raw["max_requests"], f"{path}.max_requests"),
            window_secs=self.positive_number(raw["window_secs"], f"{path}.window_secs"),
        )

    def audit(self, value: Any, path: str) -> AuditConfig:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("enabled", "log_argv", "log_body", "redact_patterns"))
        base = AuditConfig()
        return AuditConfig(
            enabled=self.boolean(raw["enabled"], f"{path}.enabled")
            if "enabled" in raw else base.enabled,
            log_argv=self.boolean(raw["log_argv"], f"{path}.log_argv")
            if "log_argv" in raw else base.log_argv,
            log_body=self.boolean(raw["log_body"], f"{path}.log_body")
            if "log_body" in raw else base.log_body,
            redact_patterns=self.strings(raw["redact_patterns"], f"{path}.redact_patterns")
            if "redact_patterns" in raw else (),
        )

    def absolute_path(self, value: Any, path: str, what: str) -> str:
        text = self.string(value, path)
        if not text.startswith("/"):
            self.fail(path, f"{what} must be an absolute path", "Start it with '/'.")
        if any(part in (".", "..") for part in text.split("/")):
            self.fail(path, f"{what} must not contain '.' or '..' components",
                      "Write the canonical path.")
        return os.path.normpath(text)

    def secret_check(self, value: str, path: str, what: str) -> None:
        if len(value) < self.min_secret_length:
            self.fail(
                path,
                f"{what} is shorter than settings.min_secret_length "
                f"({self.min_secret_length} characters)",
                "A secret this short cannot be masked reliably in tool output: use a longer "
                "secret, or lower settings.min_secret_length if you accept weaker masking.",
            )

    def cli_tool(self, tool_name: str, raw: dict[str, Any], path: str) -> CliTool:
        if "binary" not in raw:
            self.fail(f"{path}.binary", "is required", "Give the absolute path of the program.")
        binary = self.absolute_path(raw["binary"], f"{path}.binary", "binary")
        allow: tuple[str, ...] = ()
        deny: tuple[str, ...] = ()
        passthrough: tuple[str, ...] = ()
        if "argv_allow_patterns" in raw:
            allow = self.strings(raw["argv_allow_patterns"], f"{path}.argv_allow_patterns")
        if "argv_deny_patterns" in raw:
            deny = self.strings(raw["argv_deny_patterns"], f"{path}.argv_deny_patterns")
        inject: dict[str, str] = {}
        inject_refs: dict[str, SecretRef] = {}
        if "env_inject" in raw:
            inject, inject_refs = self.env_inject(raw["env_inject"], f"{path}.env_inject")
        if "env_passthrough" in raw:
            passthrough = self.env_passthrough(raw["env_passthrough"], f"{path}.env_passthrough")
        cwd_allowed = None
        if "cwd_allowed" in raw:
            cpath = f"{path}.cwd_allowed"
            items = self.strings(raw["cwd_allowed"], cpath)
            cwd_allowed = tuple(
                self.absolute_path(item, f"{cpath}[{i}]", "directory")
                for i, item in enumerate(items)
            )
        return CliTool(
            name=tool_name,
            binary=binary,
            argv_allow_patterns=allow,
            argv_deny_patterns=deny,
            env_inject=MappingProxyType(inject),
            env_passthrough=passthrough,
            cwd_allowed=cwd_allowed,
            sandbox=load_tool_sandbox(self, raw["sandbox"], f"{path}.sandbox")
            if "sandbox" in raw else ToolSandbox(),
            **self.common(raw, path),
            **self.argv_flags(raw, path),
            env_inject_refs=MappingProxyType(inject_refs),
            **self.approvals(raw, path),
        )

    def argv_flags(self, raw: dict[str, Any], path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("argv_deny_flags", "argv_allow_flags"):
            if key in raw:
                flags = self.strings(raw[key], f"{path}.{key}")
                for i, flag in enumerate(flags):
                    if not FLAG_RE.match(flag):
                        self.fail(f"{path}.{key}[{i}]", f"{_show(flag)} is not a flag",
                                  "Write a short flag as -x (one character) and a long one as "
                                  "--name, without a value.")
                out[key] = flags
        return out

    def approvals(self, raw: dict[str, Any], path: str) -> dict[str, Any]:
        """The keys that make an allowed call wait for a person (package doc, "Approvals")."""
        out: dict[str, Any] = {}
        for key in ("approve_patterns", "jsonrpc_approve_methods"):
            if key in raw:
                out[key] = self.strings(raw[key], f"{path}.{key}")
        if "approve_paths" in raw:
            apath = f"{path}.approve_paths"
            out["approve_paths"] = tuple(
                self.path_rule(item if " " in item else f"* {item}", f"{apath}[{i}]")
                for i, item in enumerate(self.strings(raw["approve_paths"], apath)))
        if "approval" in raw:
            out["approval"] = self.approval(raw["approval"], f"{path}.approval")
        return out

    def approval(self, value: Any, path: str) -> ApprovalConfig:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("timeout_secs", "remember_secs"))
        base = ApprovalConfig()
        timeout = base.timeout_secs
        if "timeout_secs" in raw:
            timeout = self.positive_number(raw["timeout_secs"], f"{path}.timeout_secs")
        remember = base.remember_secs
        given = raw.get("remember_secs", 0)
        if given != 0 or isinstance(given, bool):  # 0, the default, means every call asks
            remember = self.positive_number(given, f"{path}.remember_secs")
        return ApprovalConfig(timeout_secs=timeout, remember_secs=remember)

    def env_inject(self, value: Any, path: str) -> tuple[dict[str, str], dict[str, SecretRef]]:
        inject: dict[str, str] = {}
        refs: dict[str, SecretRef] = {}
        for env_name, raw_value in self.mapping(value, path).items():
            vpath = f"{path}.{env_name}"
            if not _ENV_NAME_RE.match(env_name):
                self.fail(vpath, f"{_show(env_name)} is not a valid environment variable name",
                          "Use letters, digits and '_', not starting with a digit.")
            if isinstance(raw_value, dict):
                refs[env_name] = self.secret_ref(raw_value, vpath)
            else:
                inject[env_name] = self.env_value(env_name, self.string(raw_value, vpath), vpath)
        return inject, refs

    def env_value(self, env_name: str, text: str, path: str, by_ref: bool = False) -> str:
        """Check one ``env_inject`` value; a value given by reference is always a secret."""
        if "\x00" in text:
            self.fail(path, "must not contain NUL characters")
        if by_ref or env_name_is_secret(env_name):
            self.secret_check(text, path, "this secret")
        return text

    def secret_ref(self, value: dict[str, Any], path: str) -> SecretRef:
        """``{file: P}``, ``{credential: NAME}``, ``{env: NAME}`` or ``{command: [ARGV]}``."""
        fix = ("Write the value itself, or one of {file: /abs/path}, {credential: NAME}, "
               "{env: NAME}, {command: [PROGRAM, ARG, ...]} (with an optional timeout_secs).")
        raw = self.mapping(value, path, "a string or a secret reference")
        kinds = [key for key in SECRET_REF_KINDS if key in raw]
        if len(kinds) != 1:
            self.fail(path, "a secret reference needs exactly one of "
                      f"{', '.join(SECRET_REF_KINDS)}", fix)
        kind = kinds[0]
        self.known_keys(raw, path, (kind, "timeout_secs") if kind == "command" else (kind,), fix)
        kpath = f"{path}.{kind}"
        if kind == "file":
            return SecretRef(kind, self.absolute_path(raw[kind], kpath, "the secret file"))
        if kind == "credential":
            return SecretRef(kind, self.name(raw[kind], kpath, "credential name"))
        if kind == "env":
            name = self.string(raw[kind], kpath)
            if not _ENV_NAME_RE.match(name):
                self.fail(kpath, f"{_show(name)} is not a valid environment variable name")
            return SecretRef(kind, name)
        argv = self.strings(raw[kind], kpath)
        if not argv or not argv[0]:
            self.fail(kpath, "must name a program to run", fix)
        ref = SecretRef(kind, argv=argv)
        if "timeout_secs" in raw:
            timeout = self.positive_number(raw["timeout_secs"], f"{path}.timeout_secs")
            ref = SecretRef(kind, argv=argv, timeout_secs=timeout)
        return ref

    def env_passthrough(self, value: Any, path: str) -> tuple[str, ...]:
        passthrough = self.strings(value, path)
        for i, env_name in enumerate(passthrough):
            if not _ENV_NAME_RE.match(env_name):
                self.fail(f"{path}[{i}]",
                          f"{_show(env_name)} is not a valid environment variable name")
            why = passthrough_refusal(env_name)
            if why:
                self.fail(f"{path}[{i}]", f"{env_name} may not be passed through: {why}",
                          "Remove it; use env_inject to set a fixed host-side value instead.")
        return passthrough

    def upstream(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        fix = "Write it as http://HOST:PORT or https://HOST[:PORT][/base-path]."
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
            self.fail(path, "must be printable ASCII without spaces", fix)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            self.fail(path, "is not a valid URL", fix)
        if parts.scheme not in ("http", "https"):
            self.fail(path, "must use http:// or https://", fix)
        if "@" in parts.netloc:
            self.fail(path, "must not contain user:password@",
                      "Put credentials in headers_inject (e.g. Authorization), never in the URL.")
        if not parts.hostname:
            self.fail(path, "has no host", fix)
        if parts.query or parts.fragment or "?" in text or "#" in text:
            self.fail(path, "must not have a query or fragment", fix)
        if port == 0:
            self.fail(path, "has port 0", fix)
        if any(seg in (".", "..") for seg in parts.path.split("/")) or "%" in parts.path:
            self.fail(path, "base path must be plain (no '.', '..' or %-escapes)", fix)
        return text.rstrip("/") if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}"

    def http_tool(self, tool_name: str, raw: dict[str, Any], path: str) -> HttpTool:
        if "upstream" not in raw:
            self.fail(f"{path}.upstream", "is required", "Give the URL, e.g. http://127.0.0.1:8080.")
        upstream = self.upstream(raw["upstream"], f"{path}.upstream")
        allow_paths = None
        if "allow_paths" in raw:
            apath = f"{path}.allow_paths"
            allow_paths = tuple(
                self.path_rule(item, f"{apath}[{i}]")
                for i, item in enumerate(self.strings(raw["allow_paths"], apath))
            )
        allow_methods = deny_methods = None
        if "jsonrpc_allow_methods" in raw:
            allow_methods = self.strings(
                raw["jsonrpc_allow_methods"], f"{path}.jsonrpc_allow_methods"
            )
        if "jsonrpc_deny_methods" in raw:
            deny_methods = self.strings(raw["jsonrpc_deny_methods"], f"{path}.jsonrpc_deny_methods")
        filters = None
        if "jsonrpc_param_filters" in raw:
            fpath = f"{path}.jsonrpc_param_filters"
            filters = {}
            for method, spec in self.mapping(raw["jsonrpc_param_filters"], fpath).items():
                filters[method] = self.param_filter(spec, f"{fpath}.{method}")
        inject: dict[str, str] = {}
        inject_refs: dict[str, SecretRef] = {}
        if "headers_inject" in raw:
            inject, inject_refs = self.headers_inject(
                raw["headers_inject"], f"{path}.headers_inject")
        return HttpTool(
            name=tool_name,
            upstream=upstream,
            allow_paths=allow_paths,
            jsonrpc_allow_methods=allow_methods,
            jsonrpc_deny_methods=deny_methods,
            jsonrpc_param_filters=None if filters is None else MappingProxyType(filters),
            headers_inject=MappingProxyType(inject),
            **self.common(raw, path),
            headers_inject_refs=MappingProxyType(inject_refs),
            **self.approvals(raw, path),
        )

    def mcp_tool(self, tool_name: str, raw: dict[str, Any], path: str) -> McpTool:
        """A ``type: mcp`` tool (keys in the package docstring, "MCP tools")."""
        for key in raw:
            if key not in _MCP_KEYS:
                hint = (f"'{key}' belongs to cli or http tools; this tool has type: mcp."
                        if key in _CLI_KEYS | _HTTP_KEYS else "")
                self.fail(f"{path}.{key}", f"unknown key {_show(key)}",
                          hint or f"Allowed keys for an mcp tool: {', '.join(sorted(_MCP_KEYS))}.")
        opt: dict[str, Any] = self.mcp_server(raw, path)
        for key in ("tools_allow", "tools_deny", "resources_allow", "prompts_allow",
                    "tools_approve"):
            if key in raw:
                opt[key] = self.strings(raw[key], f"{path}.{key}")
        if "env_inject" in raw:
            inject, refs = self.env_inject(raw["env_inject"], f"{path}.env_inject")
            opt["env_inject"] = MappingProxyType(inject)
            opt["env_inject_refs"] = MappingProxyType(refs)
        if "tool_param_filters" in raw:
            fpath = f"{path}.tool_param_filters"
            opt["tool_param_filters"] = MappingProxyType({
                name: self.param_filter(spec, f"{fpath}.{name}")
                for name, spec in self.mapping(raw["tool_param_filters"], fpath).items()})
        if "sandbox" in raw:
            opt["sandbox"] = load_tool_sandbox(self, raw["sandbox"], f"{path}.sandbox")
        if "approval" in raw:
            opt["approval"] = self.approval(raw["approval"], f"{path}.approval")
        return McpTool(name=tool_name, **opt, **self.common(raw, path))

    def mcp_server(self, raw: dict[str, Any], path: str) -> dict[str, Any]:
        """Where an mcp tool's server is: ``command`` (stdio) or ``url`` (HTTP), not both."""
        if ("command" in raw) == ("url" in raw):
            self.fail(f"{path}.command", "give 'command' or 'url', not both"
                      if "url" in raw else "is required",
                      "A stdio server: command: [/usr/bin/mcp-server-time]; one over HTTP: "
                      "url: http://127.0.0.1:8000/mcp.")
        if "url" in raw:
            if "env_inject" in raw:
                self.fail(f"{path}.env_inject", "applies to a command, not to a url",
                          "Put a credential for an HTTP MCP server in headers_inject.")
            url = self.upstream(raw["url"], f"{path}.url")
            inject, refs = self.headers_inject(raw.get("headers_inject", {}),
                                               f"{path}.headers_inject")
            return {"url": url, "headers_inject": MappingProxyType(inject),
                    "headers_inject_refs": MappingProxyType(refs)}
        if "headers_inject" in raw:
            self.fail(f"{path}.headers_inject", "applies to a url, not to a command",
                      "Give a stdio server its credential with env_inject.")
        command = self.strings(raw["command"], f"{path}.command")
        if not command:
            self.fail(f"{path}.command", "is empty", "Name at least the program to run.")
        program = self.absolute_path(command[0], f"{path}.command[0]", "the program")
        return {"command": (program, *command[1:])}

    def headers_inject(
        self, value: Any, path: str
    ) -> tuple[dict[str, str], dict[str, SecretRef]]:
        inject: dict[str, str] = {}
        refs: dict[str, SecretRef] = {}
        for header, raw_value in self.mapping(value, path).items():
            vpath = f"{path}.{header}"
            if not TOKEN.match(header):
                self.fail(vpath, f"{_show(header)} is not a valid HTTP header name")
            if header.lower() in NOT_INJECTABLE:
                self.fail(vpath, f"{header} cannot be injected",
                          "Framing and routing headers belong to the HTTP client.")
            if any(h.lower() == header.lower() for h in [*inject, *refs]):
                self.fail(vpath, f"{header} is listed twice (header names ignore case)")
            if isinstance(raw_value, dict):
                refs[header] = self.secret_ref(raw_value, vpath)
            else:
                inject[header] = self.header_value(self.string(raw_value, vpath), vpath)
        return inject, refs

    def header_value(self, text: str, path: str) -> str:
        """Check one ``headers_inject`` value (always a secret)."""
        if any((ord(c) < 0x20 and c != "\t") or ord(c) > 0x7E for c in text):
            self.fail(path, "the value must be printable ASCII (no control characters)")
        self.secret_check(text, path, "this header value (always a secret)")
        return text

    def path_rule(self, text: str, path: str) -> PathRule:
        fix = 'Write "METHOD /path" with one space, e.g. "POST /api/v1/rpc" or "GET /api/*".'
        method, sep, glob = text.partition(" ")
        if not sep or " " in glob:
            self.fail(path, f"{_show(text)} is not \"METHOD PATH\"", fix)
        if method != "*" and not TOKEN.match(method):
            self.fail(path, f"{_show(method)} is not an HTTP method or '*'", fix)
        if not glob.startswith("/") or any(ord(c) < 0x21 or ord(c) > 0x7E for c in glob):
            self.fail(path, "the path must start with '/' and be printable ASCII", fix)
        return PathRule(method=method, path=glob)

    def param_filter(self, value: Any, path: str) -> ParamFilter:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("field", "fields", "allow_patterns", "deny_patterns",
                                    "deny_fields", "allow_fields", "field_patterns",
                                    "normalize"))
        if ("field" in raw) == ("fields" in raw):
            self.fail(f"{path}.field", "is required" if "field" not in raw
                      else "give 'field' or 'fields', not both",
                      "Name the params field to check (field: recipient), or several "
                      "(fields: [recipient, groupId]).")
        if "field" in raw:
            fields: tuple[str, ...] = (self.string(raw["field"], f"{path}.field"),)
        else:
            fields = self.strings(raw["fields"], f"{path}.fields")
            if not fields:
                self.fail(f"{path}.fields", "is empty", "Name at least one params field.")
        normalize = None
        if "normalize" in raw:
            normalize = self.string(raw["normalize"], f"{path}.normalize")
            if normalize not in PARAM_NORMALIZERS:
                self.fail(f"{path}.normalize", f"unknown normalization {_show(normalize)}",
                          f"Known: {', '.join(sorted(PARAM_NORMALIZERS))}.")
        patterns: dict[str, tuple[str, ...]] = {}
        if "field_patterns" in raw:
            ppath = f"{path}.field_patterns"
            for name, globs in self.mapping(raw["field_patterns"], ppath).items():
                patterns[name] = self.strings(globs, f"{ppath}.{name}")
        opt = {k: self.strings(raw[k], f"{path}.{k}") for k in
               ("allow_patterns", "deny_patterns", "deny_fields", "allow_fields") if k in raw}
        return ParamFilter(fields=fields, normalize=normalize,
                           field_patterns=MappingProxyType(patterns), **opt)


def load_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy document; raise PolicyError if it is unusable."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no objects
    except yaml.MarkedYAMLError as exc:
        # Built from problem and position only: PyYAML's own text quotes the
        # offending line, which may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError(
            f"{source}: {where}invalid YAML: {problem}. Fix the YAML syntax at that position.",
            "",
            source,
        ) from None
    except yaml.YAMLError:
        raise PolicyError(f"{source}: invalid YAML.", "", source) from None
    return _Loader(source).policy(doc)


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Read and load a policy file; unreadable or invalid files raise PolicyError."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"{source}: cannot read the policy file: {exc.strerror or exc}. "
            "Check the path and its permissions.",
            "",
            source,
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{source}: the policy file is not UTF-8 text.", "", source) from None
    return load_policy(text, source)
