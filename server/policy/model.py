"""The typed policy: the dataclasses a loaded file becomes, and the fixed defaults."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from .quoting import _show
from .sandbox import DEFAULT_SANDBOX_SETTING, ToolSandbox
from .secrets import env_name_is_secret

BASE_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
"""The fixed PATH of every host process: system directories only."""

BASE_LOCALE: Final = "C.UTF-8"
"""LANG and LC_ALL of every host process: always present, UTF-8, no locale files needed."""

BASE_ENV: Final[Mapping[str, str]] = MappingProxyType(
    {"PATH": BASE_PATH, "LANG": BASE_LOCALE, "LC_ALL": BASE_LOCALE}
)
"""The whole environment a CLI tool starts from, before passthrough and inject."""

DEFAULT_CWD: Final = b"/"
"""Where a CLI tool runs when its policy has no ``cwd_allowed``."""

DEFAULT_MIN_SECRET_LENGTH: Final = 8
"""Default ``settings.min_secret_length``: shorter secrets cannot be masked safely."""

DEFAULT_TIMEOUT_SECS: Final = 30.0
"""A tool's ``timeout_secs`` when its policy gives none, HTTP and CLI alike."""
DEFAULT_SECRET_COMMAND_TIMEOUT: Final = 10.0
"""Seconds a ``{command: [...]}`` secret reference may run unless its own
``timeout_secs`` says otherwise (``--secret-command-timeout``): enough for a
password manager's CLI to ask its agent or service, short enough that a hung one
does not hold a reload (or the server's start) for long."""

SECRET_REF_KINDS: Final = ("file", "credential", "env", "command")
"""The forms a secret value may take instead of the value itself."""

DEFAULT_APPROVAL_TIMEOUT_SECS: Final = 120.0
"""How long a call waits for a person when ``approval.timeout_secs`` is not given: long
enough to notice a notification and read the call, short enough that a VM's client
does not hang for good when nobody is at the host."""

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
"""A tool or agent name: short, and safe to print unquoted in a message."""


class PolicyError(Exception):
    """The policy file cannot be used; the message says what, where and what to do.

    ``path`` is the key path of the offending entry (``tools.op.timeout_secs``)
    or ``""`` for the file as a whole. Messages never contain injected values.
    """

    def __init__(self, message: str, path: str = "", source: str = "<policy>") -> None:
        super().__init__(message)
        self.path = path
        self.source = source


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_requests`` in any ``window_secs``-long sliding window."""

    max_requests: int
    window_secs: float


@dataclass(frozen=True)
class AuditConfig:
    """What the audit trail records for one tool (the audit writer applies it)."""

    enabled: bool = True
    log_argv: bool = True
    log_body: bool = False
    redact_patterns: tuple[str, ...] = ()


PARAM_NORMALIZERS: Final = frozenset({"phone"})
"""The values of a param filter's ``normalize``."""


@dataclass(frozen=True)
class ParamFilter:
    """Which params one JSON-RPC method may carry, and which values its checked fields may hold.

    ``fields`` are checked against the patterns (``field: X`` is ``fields:
    [X]``); ``deny_fields`` may not be present; with ``allow_fields`` no param
    outside ``fields``, ``allow_fields`` and ``field_patterns`` may be;
    ``field_patterns`` constrain other params when present (an ``account``).
    """

    fields: tuple[str, ...]
    allow_patterns: tuple[str, ...] = ()
    deny_patterns: tuple[str, ...] = ()
    deny_fields: tuple[str, ...] = ()
    allow_fields: tuple[str, ...] | None = None
    field_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    normalize: str | None = None

    @property
    def field(self) -> str:
        """The first checked field (the only one in a ``field: X`` filter)."""
        return self.fields[0]


@dataclass(frozen=True)
class PathRule:
    """One ``allow_paths`` entry: ``method`` (or ``*``) and a glob over the path."""

    method: str
    path: str

    @property
    def text(self) -> str:
        """The entry as written in the policy file."""
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret value comes from, when the policy names it instead of holding it.

    ``kind`` is one of :data:`SECRET_REF_KINDS`; ``target`` is the file path,
    the credential name or the environment variable name; a ``command`` has
    its ``argv`` and ``timeout_secs`` (None: the resolver's default) instead.
    ``str()`` shows the reference as an operator wrote it, but of a command
    only ``argv[0]``: its arguments may be a secret of their own.
    """

    kind: str
    target: str = ""
    argv: tuple[str, ...] = field(default=(), repr=False)
    timeout_secs: float | None = None

    def __str__(self) -> str:
        if self.kind == "command":
            more = " ..." if len(self.argv) > 1 else ""
            return f"{{command: [{_show(self.argv[0])}{more}]}}" if self.argv else "{command}"
        return f"{{{self.kind}: {_show(self.target)}}}"


@dataclass(frozen=True)
class ApprovalConfig:
    """A tool's ``approval`` section: how long a gated call waits, how long a yes lasts.

    ``remember_secs`` 0 means every gated call asks; above 0 an approval also
    approves the same call again (same agent, tool and argv or method + params)
    for that long, unless the operator gave ``--for`` with the decision.
    """

    timeout_secs: float = DEFAULT_APPROVAL_TIMEOUT_SECS
    remember_secs: float = 0.0


@dataclass(frozen=True)
class CliTool:
    """A host binary the VM may run with some argument lists.

    ``env_inject`` is left out of the repr because it may hold secrets.
    """

    name: str
    binary: str
    argv_allow_patterns: tuple[str, ...] = ()
    argv_deny_patterns: tuple[str, ...] = ()
    env_inject: Mapping[str, str] = field(default_factory=dict, repr=False)
    env_passthrough: tuple[str, ...] = ()
    cwd_allowed: tuple[str, ...] | None = None
    timeout_secs: float | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)
    rate_limit: RateLimit | None = None
    agents: tuple[str, ...] | None = None
    limits: Mapping[str, int] = field(default_factory=dict)
    """Overrides of the server-wide parse limits (``policy/limits.py``) for this tool."""
    argv_deny_flags: tuple[str, ...] = ()
    argv_allow_flags: tuple[str, ...] | None = None
    env_inject_refs: Mapping[str, SecretRef] = field(default_factory=dict)
    """``env_inject`` names whose value is a reference; the resolved value joins
    ``env_inject`` (:func:`~.secret_refs.resolve_policy`) and is always a secret."""
    sandbox: ToolSandbox = field(default_factory=ToolSandbox)
    global_rate_limit: RateLimit | None = None
    """One budget shared by every agent (``rate_limit`` is each agent's own)."""
    approve_patterns: tuple[str, ...] = ()
    """Allowed argv that must also wait for a person (``argv_allow_patterns`` semantics)."""
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)

    @property
    def type(self) -> str:
        return "cli"

    def secret_values(self) -> list[str]:
        """The ``env_inject`` values that are secrets: by name, or given by reference."""
        return [v for k, v in self.env_inject.items()
                if env_name_is_secret(k) or k in self.env_inject_refs]


@dataclass(frozen=True)
class HttpTool:
    """An upstream HTTP service the VM may call through some paths and methods.

    ``headers_inject`` is left out of the repr because it holds secrets.
    """

    name: str
    upstream: str
    allow_paths: tuple[PathRule, ...] | None = None
    jsonrpc_allow_methods: tuple[str, ...] | None = None
    jsonrpc_deny_methods: tuple[str, ...] | None = None
    jsonrpc_param_filters: Mapping[str, ParamFilter] | None = None
    headers_inject: Mapping[str, str] = field(default_factory=dict, repr=False)
    rate_limit: RateLimit | None = None
    timeout_secs: float | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)
    agents: tuple[str, ...] | None = None
    limits: Mapping[str, int] = field(default_factory=dict)
    """Overrides of the server-wide parse limits (``policy/limits.py``) for this tool."""
    headers_inject_refs: Mapping[str, SecretRef] = field(default_factory=dict)
    """``headers_inject`` names whose value is a reference (see ``CliTool.env_inject_refs``)."""
    global_rate_limit: RateLimit | None = None
    """One budget shared by every agent (``rate_limit`` is each agent's own)."""
    jsonrpc_approve_methods: tuple[str, ...] = ()
    """Allowed JSON-RPC methods whose calls must also wait for a person."""
    approve_paths: tuple[PathRule, ...] = ()
    """Allowed requests (``METHOD /glob``) that must also wait for a person."""
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)

    @property
    def type(self) -> str:
        return "http"

    @property
    def jsonrpc_rules(self) -> bool:
        """True if any JSON-RPC key is present: then bodies must be JSON-RPC."""
        return (
            self.jsonrpc_allow_methods is not None
            or self.jsonrpc_deny_methods is not None
            or self.jsonrpc_param_filters is not None
        )

    def secret_values(self) -> list[str]:
        """Every ``headers_inject`` value (all of them are secrets)."""
        return list(self.headers_inject.values())


@dataclass(frozen=True)
class McpTool:
    """A host MCP server the VM may use, MCP tool by MCP tool.

    Exactly one of ``command`` (a stdio server, run as is: ``command[0]`` an
    absolute path, the VM adds no arguments) and ``url`` (a Streamable HTTP
    server's endpoint, with ``headers_inject``). ``tools_allow``/``tools_deny``
    are globs over MCP tool names (deny wins, nothing is allowed by default);
    ``tool_param_filters`` check a tool's ``params.arguments``;
    ``resources_allow`` globs over resource URIs, ``prompts_allow`` over prompt
    names. ``timeout_secs`` bounds each MCP call, not the session.
    ``env_inject`` and ``headers_inject`` are left out of the repr: secrets.
    """

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    headers_inject: Mapping[str, str] = field(default_factory=dict, repr=False)
    env_inject: Mapping[str, str] = field(default_factory=dict, repr=False)
    env_inject_refs: Mapping[str, SecretRef] = field(default_factory=dict)
    """As ``CliTool.env_inject_refs`` (a ``command`` tool's secrets by reference)."""
    headers_inject_refs: Mapping[str, SecretRef] = field(default_factory=dict)
    """As ``HttpTool.headers_inject_refs`` (a ``url`` tool's secrets by reference)."""
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()
    tool_param_filters: Mapping[str, ParamFilter] = field(default_factory=dict)
    resources_allow: tuple[str, ...] = ()
    prompts_allow: tuple[str, ...] = ()
    timeout_secs: float | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)
    rate_limit: RateLimit | None = None
    agents: tuple[str, ...] | None = None
    limits: Mapping[str, int] = field(default_factory=dict)
    """Always empty: an MCP tool has no parse limit overrides (the message cap is a flag)."""
    global_rate_limit: RateLimit | None = None
    """One budget of MCP calls shared by every agent (``rate_limit`` is each agent's own)."""
    sandbox: ToolSandbox = field(default_factory=ToolSandbox)
    """How a ``command`` server's process is confined, as a CLI tool's."""
    tools_approve: tuple[str, ...] = ()
    """Globs over MCP tool names: an allowed ``tools/call`` of one waits for a person."""
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)
    """How long such a call waits, how long a yes lasts (as a CLI tool's ``approval``)."""

    @property
    def type(self) -> str:
        return "mcp"

    @property
    def binary(self) -> str:
        """The program a stdio session runs (``command[0]``; ``""`` for a ``url`` tool)."""
        return self.command[0] if self.command else ""

    def secret_values(self) -> list[str]:
        """Secret ``env_inject`` values (by name, or given by reference) and every
        ``headers_inject`` value."""
        return [*(v for k, v in self.env_inject.items()
                  if env_name_is_secret(k) or k in self.env_inject_refs),
                *self.headers_inject.values()]


Tool: TypeAlias = CliTool | HttpTool | McpTool


def inject_parts(tool: Tool) -> tuple[str, Mapping[str, str], Mapping[str, SecretRef]]:
    """A tool's injection key (``env_inject``/``headers_inject``), its values and its refs."""
    if isinstance(tool, CliTool) or (isinstance(tool, McpTool) and tool.url is None):
        return "env_inject", tool.env_inject, tool.env_inject_refs
    return "headers_inject", tool.headers_inject, tool.headers_inject_refs


@dataclass(frozen=True)
class AgentGrant:
    """One entry of the top-level ``agents`` section."""

    name: str
    tools: tuple[str, ...]
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Settings:
    """The optional top-level ``settings`` section."""

    min_secret_length: int = DEFAULT_MIN_SECRET_LENGTH
    sandbox: str = DEFAULT_SANDBOX_SETTING
    """How CLI tools are confined on the host (``auto``, ``bwrap`` or ``none``)."""


@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy. Immutable: reload builds a new one."""

    tools: Mapping[str, Tool]
    agents: Mapping[str, AgentGrant] | None = None
    settings: Settings = field(default_factory=Settings)
    source: str = "<policy>"

    def secrets(self) -> list[bytes]:
        """Every injected secret (UTF-8), unique, longest first, for output masking."""
        cached: list[bytes] | None = self.__dict__.get("_secrets")
        if cached is None:  # asked for on every request; the policy never changes
            seen: set[bytes] = set()
            for tool in self.tools.values():
                for value in tool.secret_values():
                    seen.add(value.encode("utf-8"))
            cached = sorted(seen, key=lambda s: (-len(s), s))
            self.__dict__["_secrets"] = cached
        return list(cached)

    def secret_refs(self) -> dict[str, SecretRef]:
        """Every secret reference, by the key path of its value
        (``tools.gh.env_inject.GH_TOKEN``), resolved or not."""
        out: dict[str, SecretRef] = {}
        for tool in self.tools.values():
            key, _values, refs = inject_parts(tool)
            out.update({f"tools.{tool.name}.{key}.{name}": r for name, r in refs.items()})
        return out

    def unresolved_refs(self) -> dict[str, SecretRef]:
        """The references whose value is not there yet: a policy to serve has none."""
        out: dict[str, SecretRef] = {}
        for tool in self.tools.values():
            key, values, refs = inject_parts(tool)
            out.update({f"tools.{tool.name}.{key}.{name}": r
                        for name, r in refs.items() if name not in values})
        return out

    def is_granted(self, agent: str, tool: str) -> bool:
        """Whether ``agent`` may use ``tool`` at all (the tool must exist)."""
        return tool in self.tools and _grant_denial(self, agent, tool) is None

    def tools_for(self, agent: str) -> list[str]:
        """The tools ``agent`` may use, sorted."""
        return sorted(name for name in self.tools if self.is_granted(agent, name))

    def agent_rate_limit(self, agent: str) -> RateLimit | None:
        """The per-agent rate limit from ``agents.NAME.rate_limit``, if any."""
        if self.agents is None or agent not in self.agents:
            return None
        return self.agents[agent].rate_limit


def _grant_denial(policy: Policy, agent: str, tool: str) -> tuple[str, str] | None:
    """Why ``agent`` may not use ``tool``, as (reason, rule), or None if it may."""
    if policy.agents is not None:
        grant = policy.agents.get(agent)
        if grant is None:
            return (f"agent {_show(agent)} is not listed in the policy's agents section",
                    f"default deny: agents.{_show(agent)} does not exist")
        if tool not in grant.tools:
            return (f"agent {_show(agent)} is not granted tool {_show(tool)}",
                    f"default deny: {_show(tool)} is not in agents.{agent}.tools")
    tool_obj = policy.tools.get(tool)
    if tool_obj is not None and tool_obj.agents is not None and agent not in tool_obj.agents:
        return (f"agent {_show(agent)} is not granted tool {_show(tool)}",
                f"default deny: {_show(agent)} is not in tools.{tool}.agents")
    return None
