"""The host-side policy: load the YAML file, decide every request.

The VM is assumed hostile, so everything here denies by default and treats
every byte the VM sends as an attack. This module is pure: no trio, no clock,
no environment variables. Its only I/O is reading the policy file in
:func:`load_policy_file` and resolving a requested working directory in
:func:`decide_cli` (through an injectable ``realpath``), so the server, the
``carapace-debug policy`` commands and the tests all run the same engine.

File format
===========
The anchor project's YAML format, read with PyYAML's safe loader (plus a
check that refuses duplicate mapping keys, which YAML would otherwise
silently collapse to the last one)::

    settings:                       # optional
      min_secret_length: 8          # secrets shorter than this are refused
    agents:                         # optional; absent = every agent, every tool
      NAME: {tools: [TOOL, ...], rate_limit: {max_requests: N, window_secs: S}}
    tools:
      NAME:                         # [A-Za-z0-9][A-Za-z0-9._-]*
        type: cli | http
        ...

CLI tool keys: ``binary`` (absolute path, required), ``argv_allow_patterns``,
``argv_deny_patterns``, ``env_inject`` (name -> value), ``env_passthrough``
(new: names the VM may pass through), ``cwd_allowed`` (absolute dirs),
``timeout_secs``, ``audit``, ``rate_limit``, ``agents``.

HTTP tool keys: ``upstream`` (``http(s)://host[:port][/base]``, required),
``allow_paths`` (new), ``jsonrpc_allow_methods``, ``jsonrpc_deny_methods``,
``jsonrpc_param_filters`` (``METHOD: {field, allow_patterns,
deny_patterns}``), ``headers_inject`` (new: header -> value), ``rate_limit``,
``timeout_secs``, ``audit``, ``agents``.

``audit`` is ``{enabled, log_argv, log_body, redact_patterns}`` and
``rate_limit`` is ``{max_requests, window_secs}``. Any other key anywhere is
an error naming the key and its path (``tools.op.argv_allow``), and so is a
wrong type (``tools.signal-cli.rate_limit.window_secs must be a positive
number``).

Grants
======
If the top-level ``agents`` section exists, an agent may use a tool only if
the agent is listed and the tool is in its ``tools`` list. A tool may also
carry its own ``agents: [NAME, ...]`` list; when both forms are present an
agent needs both. Without either, every agent may use every tool.

Secrets
=======
``headers_inject`` values are always secrets. An ``env_inject`` value is a
secret when its variable NAME looks secret-bearing: the name is split into
words at ``_``, ``-``, ``.`` and lower-to-upper camelCase boundaries, and it is
a secret if any word contains TOKEN, SECRET, PASSWORD, PASSWD, PASSPHRASE,
CREDENTIAL, SESSION, COOKIE or AUTHORIZATION, starts with AUTH (but not
AUTHOR) or ends with AUTH, ends with KEY or KEYS, or is PASS. Whole words, not
substrings, so ``GOG_KEYRING_BACKEND`` (the anchor's value ``file``) is not a
secret while ``GOG_KEYRING_PASSWORD`` and ``API_KEY`` are. A secret shorter
than ``settings.min_secret_length`` (default 8) is refused at load, because a
short value cannot be masked in output without mangling ordinary text.
:meth:`Policy.secrets` lists every secret for the output scrubber. No error
message and no ``repr`` ever contains an injected value.

argv semantics (CLI tools)
==========================
Each argument must be valid UTF-8 without control characters (Unicode
category Cc, TAB excepted). The arguments are joined with
:func:`shlex.join` (POSIX shell quoting: an argument made only of
``[A-Za-z0-9_@%+=:,./-]`` stays bare, anything else is single-quoted), and a
pattern is an :func:`fnmatch.fnmatchcase` glob over that one line. So a
pattern reads like the command typed in a shell: ``"item get *"`` allows
``item get foo --vault Private`` (``*`` may span several arguments), while a
single argument ``"item get x"`` is rendered ``'item get x'`` and cannot pose
as three words; a quote inside an argument is escaped, so it cannot forge
word boundaries either. A pattern ending in ``" *"`` also matches with
nothing after it (``"item delete *"`` denies a bare ``item delete``). A
pattern like ``"item list*"`` is a prefix match: it allows ``item list``,
``item list --vault x`` and also ``item listx`` (the anchor's intent; the
tool rejects unknown subcommands). An empty argv matches only the pattern
``""``. Deny patterns are checked first and win; if no allow pattern matches,
the request is denied. To allow an argument with spaces, quote it the way
``shlex.join`` does: ``"item get 'My Login'"``.

Environment semantics (CLI tools)
=================================
The process never inherits the VM's environment. It gets :data:`BASE_ENV`
(``PATH=/usr/local/bin:/usr/bin:/bin``, ``LANG=LC_ALL=C.UTF-8``), then the
variables named in ``env_passthrough`` taken from the VM's request (if
present), then ``env_inject`` (which wins). Everything else the VM sent
(LD_PRELOAD, PATH, GIT_SSH_COMMAND, BASH_ENV, ...) is dropped. Names that
steer loaders, shells, interpreters, proxies or TLS trust (LD_*, BASH_ENV,
ENV, PYTHON*, GIT_*, *_PROXY, ...; see :func:`passthrough_refusal`) are
refused in ``env_passthrough`` at load time.

Working directory (CLI tools)
=============================
With ``cwd_allowed`` the requested directory is resolved on the host
(symlinks followed, must exist) and must equal or lie under one of the
allowed directories (also resolved), compared by path components, so
``/home/ab`` is not under ``/home/a``; the process runs in the resolved path.
Without ``cwd_allowed`` the VM's directory means nothing on the host and the
process runs in ``/``.

HTTP requests
=============
The method must be an HTTP token; the request-target must start with ``/``
and be printable ASCII without spaces or a fragment; header names must be
tokens and no header may contain control characters (TAB excepted). The path
(the target before ``?``) must not contain ``..`` or ``.`` segments (also as
``..;x``), empty segments (``//``), backslashes, or percent-encoded ``.``,
``/``, ``\\``, ``%`` (so no double encoding such as ``%252e``) or control
characters. ``allow_paths`` entries are ``"METHOD PATH"``: METHOD exactly (or
``*`` for any), PATH an fnmatch glob (case-sensitive; ``*`` also crosses
``/``) over the raw path without the query string. Without ``allow_paths``
every path is open (``policy lint`` warns). On a tool with any JSON-RPC rule,
every request with a body must be a UTF-8 JSON-RPC object or a non-empty
array of them (no duplicate keys, no NaN); every call of a batch is checked
and one denied call denies the request. A GET or HEAD without a body (an SSE
stream, a health check) is not a JSON-RPC call and needs only the path
rules. Deny methods win over allow methods; with ``jsonrpc_allow_methods``
present, any other method is denied. A param filter requires ``params`` to be
an object holding the field; the field is a string or a non-empty array of
strings, and EVERY element must match no deny pattern and some allow pattern
(fnmatch globs, case-sensitive).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeAlias
from urllib.parse import urlsplit

import yaml

__all__ = [
    "BASE_ENV",
    "DEFAULT_CWD",
    "DEFAULT_MIN_SECRET_LENGTH",
    "UNAVAILABLE_CODES",
    "AgentGrant",
    "AuditConfig",
    "CliDecision",
    "CliTool",
    "Decision",
    "HttpTool",
    "LintWarning",
    "ParamFilter",
    "PathRule",
    "Policy",
    "PolicyError",
    "RateLimit",
    "Settings",
    "Tool",
    "argv_matches",
    "decide_cli",
    "decide_http",
    "env_name_is_secret",
    "lint_policy",
    "load_policy",
    "load_policy_file",
    "passthrough_refusal",
    "prepare_http_headers",
    "upstream_url",
    "vm_denial",
]

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

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TOKEN_BYTES_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEADER_VALUE_BAD: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

# Passthrough refusals: names that let whoever sets them run code, load
# libraries, redirect traffic or change trust in the host process. The
# passthrough list is already an allowlist; this stops an operator from
# opening one of these doors by accident.
_REFUSED_PASSTHROUGH: Final = frozenset(
    {
        "PATH", "HOME", "ENV", "BASH_ENV", "IFS", "CDPATH", "SHELL", "SHELLOPTS",
        "BASHOPTS", "PS4", "PROMPT_COMMAND", "GLOBIGNORE", "EDITOR", "VISUAL",
        "PAGER", "BROWSER", "LESSOPEN", "LESSCLOSE", "GCONV_PATH", "LOCPATH",
        "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "LOCALDOMAIN", "RES_OPTIONS",
        "GLIBC_TUNABLES", "TZDIR", "NODE_OPTIONS", "NODE_PATH", "NODE_EXTRA_CA_CERTS",
        "PERLLIB", "RUBYLIB", "RUBYOPT", "CLASSPATH", "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "SSL_CERT_FILE", "SSL_CERT_DIR",
        "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "OPENSSL_CONF", "OPENSSL_ENGINES",
        "SSLKEYLOGFILE", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "SSH_AUTH_SOCK",
        "SSH_ASKPASS", "SUDO_ASKPASS", "GNUPGHOME",
    }
)
_REFUSED_PASSTHROUGH_PREFIXES: Final = (
    "LD_", "DYLD_", "BASH_FUNC_", "PYTHON", "PERL5", "RUBY", "GIT_", "MALLOC_", "LC_",
)
_REFUSED_PASSTHROUGH_SUFFIXES: Final = ("_PROXY",)

_HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"trailers", b"transfer-encoding",
        b"upgrade", b"host", b"content-length",
    }
)
# Headers an operator may not inject: framing and routing belong to the HTTP client.
_NOT_INJECTABLE: Final = frozenset(h.decode() for h in _HOP_BY_HOP)

_CLI_KEYS: Final = frozenset(
    {
        "type", "binary", "argv_allow_patterns", "argv_deny_patterns", "env_inject",
        "env_passthrough", "cwd_allowed", "timeout_secs", "audit", "rate_limit", "agents",
    }
)
_HTTP_KEYS: Final = frozenset(
    {
        "type", "upstream", "allow_paths", "jsonrpc_allow_methods", "jsonrpc_deny_methods",
        "jsonrpc_param_filters", "headers_inject", "rate_limit", "timeout_secs", "audit",
        "agents",
    }
)


# --------------------------------------------------------------------------
# Errors and the typed policy


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


@dataclass(frozen=True)
class ParamFilter:
    """Which values one JSON-RPC method's ``params[field]`` may carry."""

    field: str
    allow_patterns: tuple[str, ...] = ()
    deny_patterns: tuple[str, ...] = ()


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

    @property
    def type(self) -> str:
        return "cli"

    def secret_values(self) -> list[str]:
        """The ``env_inject`` values whose names mark them as secrets."""
        return [v for k, v in self.env_inject.items() if env_name_is_secret(k)]


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


Tool: TypeAlias = CliTool | HttpTool


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


# --------------------------------------------------------------------------
# Secret names and passthrough refusals


_CAMEL_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SECRET_INFIXES: Final = (
    "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "SESSION",
    "COOKIE", "AUTHORIZATION",
)


def env_name_is_secret(name: str) -> bool:
    """Whether an ``env_inject`` variable name marks its value as a secret.

    Word-based (see the module docstring) so that ``GOG_KEYRING_BACKEND``
    is not a secret but ``GOG_KEYRING_PASSWORD`` is.
    """
    for word in _CAMEL_SPLIT.split(name):
        w = word.upper()
        if not w:
            continue
        if any(marker in w for marker in _SECRET_INFIXES):
            return True
        if w.endswith("AUTH") or (w.startswith("AUTH") and not w.startswith("AUTHOR")):
            return True
        if w.endswith(("KEY", "KEYS")) or w == "PASS":
            return True
    return False


def passthrough_refusal(name: str) -> str | None:
    """Why ``name`` may not be in ``env_passthrough``, or None if it may.

    LC_* is refused too: the base environment fixes the locale, and locale
    variables can point glibc at attacker-chosen locale data.
    """
    upper = name.upper()
    if upper in _REFUSED_PASSTHROUGH or upper == "LANG":
        return "it controls how the host process finds programs, libraries or its locale"
    if upper.startswith(_REFUSED_PASSTHROUGH_PREFIXES):
        return "variables with this prefix steer loaders, interpreters or git"
    if upper.endswith(_REFUSED_PASSTHROUGH_SUFFIXES) or upper == "PROXY":
        return "proxy variables could route the tool's traffic (and credentials) to the VM"
    return None


# --------------------------------------------------------------------------
# Loading


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
        self.known_keys(raw, path, ("min_secret_length",))
        min_len = DEFAULT_MIN_SECRET_LENGTH
        if "min_secret_length" in raw:
            min_len = self.positive_int(raw["min_secret_length"], f"{path}.min_secret_length")
        return Settings(min_secret_length=min_len)

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
        else:
            self.fail(f"{path}.type", f"must be 'cli' or 'http', not {_show(str(kind))}")
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
        return out

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
        if "env_inject" in raw:
            ipath = f"{path}.env_inject"
            for env_name, value in self.mapping(raw["env_inject"], ipath).items():
                vpath = f"{ipath}.{env_name}"
                if not _ENV_NAME_RE.match(env_name):
                    self.fail(vpath, f"{_show(env_name)} is not a valid environment variable name",
                              "Use letters, digits and '_', not starting with a digit.")
                text = self.string(value, vpath)
                if env_name_is_secret(env_name):
                    self.secret_check(text, vpath, "this secret")
                inject[env_name] = text
        if "env_passthrough" in raw:
            ppath = f"{path}.env_passthrough"
            passthrough = self.strings(raw["env_passthrough"], ppath)
            for i, env_name in enumerate(passthrough):
                if not _ENV_NAME_RE.match(env_name):
                    self.fail(f"{ppath}[{i}]",
                              f"{_show(env_name)} is not a valid environment variable name")
                why = passthrough_refusal(env_name)
                if why:
                    self.fail(f"{ppath}[{i}]", f"{env_name} may not be passed through: {why}",
                              "Remove it; use env_inject to set a fixed host-side value instead.")
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
            **self.common(raw, path),
        )

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
        if "headers_inject" in raw:
            hpath = f"{path}.headers_inject"
            for header, value in self.mapping(raw["headers_inject"], hpath).items():
                vpath = f"{hpath}.{header}"
                if not _TOKEN_RE.match(header):
                    self.fail(vpath, f"{_show(header)} is not a valid HTTP header name")
                if header.lower() in _NOT_INJECTABLE:
                    self.fail(vpath, f"{header} cannot be injected",
                              "Framing and routing headers belong to the HTTP client.")
                if any(h.lower() == header.lower() for h in inject):
                    self.fail(vpath, f"{header} is listed twice (header names ignore case)")
                text = self.string(value, vpath)
                if any((ord(c) < 0x20 and c != "\t") or ord(c) > 0x7E for c in text):
                    self.fail(vpath, "the value must be printable ASCII (no control characters)")
                self.secret_check(text, vpath, "this header value (always a secret)")
                inject[header] = text
        return HttpTool(
            name=tool_name,
            upstream=upstream,
            allow_paths=allow_paths,
            jsonrpc_allow_methods=allow_methods,
            jsonrpc_deny_methods=deny_methods,
            jsonrpc_param_filters=None if filters is None else MappingProxyType(filters),
            headers_inject=MappingProxyType(inject),
            **self.common(raw, path),
        )

    def path_rule(self, text: str, path: str) -> PathRule:
        fix = 'Write "METHOD /path" with one space, e.g. "POST /api/v1/rpc" or "GET /api/*".'
        method, sep, glob = text.partition(" ")
        if not sep or " " in glob:
            self.fail(path, f"{_show(text)} is not \"METHOD PATH\"", fix)
        if method != "*" and not _TOKEN_RE.match(method):
            self.fail(path, f"{_show(method)} is not an HTTP method or '*'", fix)
        if not glob.startswith("/") or any(ord(c) < 0x21 or ord(c) > 0x7E for c in glob):
            self.fail(path, "the path must start with '/' and be printable ASCII", fix)
        return PathRule(method=method, path=glob)

    def param_filter(self, value: Any, path: str) -> ParamFilter:
        raw = self.mapping(value, path)
        self.known_keys(raw, path, ("field", "allow_patterns", "deny_patterns"))
        if "field" not in raw:
            self.fail(f"{path}.field", "is required", "Name the params field to check.")
        return ParamFilter(
            field=self.string(raw["field"], f"{path}.field"),
            allow_patterns=self.strings(raw["allow_patterns"], f"{path}.allow_patterns")
            if "allow_patterns" in raw else (),
            deny_patterns=self.strings(raw["deny_patterns"], f"{path}.deny_patterns")
            if "deny_patterns" in raw else (),
        )


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


# --------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Decision:
    """The verdict on one request.

    ``rule`` names what decided: a policy entry such as
    ``tools.op.argv_allow_patterns[0] "item get *"`` or a default such as
    ``default deny: no tools.op.argv_allow_patterns entry matches``. ``code``
    says why a deny happened (``denied``, ``unknown_tool``, ``not_granted``,
    ``wrong_type``, ``bad_request``) and is ``""`` for an allow. Reasons never
    quote parameter values, argv or bodies, which the audit settings may want
    kept out.

    The server does not send ``unknown_tool``, ``not_granted`` and
    ``wrong_type`` apart to the VM (see :attr:`tool_unavailable`): telling
    them apart would let a VM enumerate the host's tools and other agents'
    grants. The precise reason goes to the audit trail and the log only.
    """

    allow: bool
    reason: str
    rule: str
    code: str = ""
    retry_after: int | None = None
    """For a ``rate_limited`` deny: whole seconds until a retry can succeed."""

    @property
    def tool_unavailable(self) -> bool:
        """Denied because the agent has no such tool (unknown, not granted, other type)."""
        return self.code in UNAVAILABLE_CODES

    @property
    def decision(self) -> str:
        """``"allow"`` or ``"deny"``, as written in the audit trail."""
        return "allow" if self.allow else "deny"

    def as_dict(self) -> dict[str, str]:
        """The JSON form used by ``carapace-debug policy check --json``."""
        return {"decision": self.decision, "reason": self.reason, "rule": self.rule}


@dataclass(frozen=True)
class CliDecision(Decision):
    """A CLI verdict; when allowed, exactly what to execute.

    ``argv`` starts with ``binary``; ``env`` is the complete environment (it
    holds injected secrets, so it is not in the repr); ``cwd`` is resolved.
    """

    binary: str = ""
    argv: list[bytes] = field(default_factory=list)
    env: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    cwd: bytes = DEFAULT_CWD


UNAVAILABLE_CODES: Final = frozenset({"unknown_tool", "not_granted", "wrong_type"})
"""Deny codes meaning "no such tool for you"; the VM sees them all as one."""


def _deny(reason: str, rule: str, code: str = "denied") -> Decision:
    return Decision(allow=False, reason=reason, rule=rule, code=code)


def _cli_deny(reason: str, rule: str, code: str = "denied") -> CliDecision:
    return CliDecision(allow=False, reason=reason, rule=rule, code=code)


def _quoted_name(name: str) -> str:
    """A VM-supplied name for a message: as is if it is a valid name, else escaped."""
    if isinstance(name, str) and _NAME_RE.match(name):
        return f"'{name}'"
    return _show(str(name), 60)


def vm_denial(decision: Decision, agent: str, tool: str) -> tuple[int, str, str]:
    """What the VM is told about a deny: (HTTP status, wire code, message).

    An unknown tool, a tool the agent is not granted and a tool of the other
    type all read the same — 403, ``denied``, "denied by policy: tool 'X' is
    not available to agent 'Y'" — so a VM cannot probe which tools exist or
    what other agents may use; the precise reason stays in the audit trail.
    A malformed request is 400 ``bad_request``, a rate-limited one 429
    ``rate_limited`` (with ``decision.retry_after``), any other deny 403
    ``denied`` with the reason (which never quotes request content).
    """
    if decision.tool_unavailable:
        return (403, "denied", f"denied by policy: tool {_quoted_name(tool)} is not available "
                f"to agent {_quoted_name(agent)}")
    if decision.code == "bad_request":
        return 400, "bad_request", f"bad request, denied by policy: {decision.reason}"
    if decision.code == "rate_limited":
        return 429, "rate_limited", f"rate limited: {decision.reason}"
    return 403, "denied", f"denied by policy: {decision.reason}"


def _show(text: str, limit: int = 60) -> str:
    """A string for a message: JSON-escaped (no control characters), truncated."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _rule(tool: str, key: str, index: int, text: str) -> str:
    return f"tools.{tool}.{key}[{index}] {_show(text, 200)}"


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


def _lookup(
    policy: Policy, agent: str, tool: str, want: type[CliTool] | type[HttpTool]
) -> Tool | Decision:
    if not isinstance(agent, str) or not isinstance(tool, str):
        return _deny("agent and tool names must be strings", "default deny: malformed request",
                     "bad_request")
    found = policy.tools.get(tool)
    if found is None:
        return _deny(f"unknown tool {_show(tool)}",
                     f"default deny: {_show(tool)} is not in the policy's tools", "unknown_tool")
    if not isinstance(found, want):
        asked = "http" if want is HttpTool else "cli"
        return _deny(
            f"tool {_show(tool)} is a {found.type} tool, not a {asked} tool",
            f"default deny: tools.{tool}.type is {found.type}",
            "wrong_type",
        )
    denial = _grant_denial(policy, agent, tool)
    if denial is not None:
        return _deny(*denial, "not_granted")
    return found


# -- HTTP -------------------------------------------------------------------


_PLAIN_TARGET: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*\Z")
"""Printable ASCII without space, ``#``, backslash or quotes: what most targets are."""


def _target_problem(target: str) -> str | None:
    """Why a request-target is refused, or None if it is acceptable."""
    if _PLAIN_TARGET.match(target):
        # The common case in one regex call: what is left to check lies in the path.
        path = target.split("?", 1)[0]
        if "%" not in path and "//" not in path and "/." not in path:
            return None
    return _target_problem_in_detail(target)


def _target_problem_in_detail(target: str) -> str | None:
    """:func:`_target_problem` for any target, naming the problem."""
    if not target.startswith("/"):
        return "the request target must start with '/'"
    for ch in target:
        code = ord(ch)
        if code < 0x20 or code == 0x7F:
            return "the request target contains a control character"
        if code == 0x20:
            return "the request target contains a space"
        if code > 0x7E:
            return "the request target contains a non-ASCII character"
    if "#" in target:
        return "the request target contains a fragment ('#')"
    path = target.split("?", 1)[0]
    if "\\" in path:
        return "the path contains a backslash"
    i = path.find("%")
    while i != -1:
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            return "the path contains a malformed %-escape"
        byte = int(pair, 16)
        if byte in (0x2E, 0x2F, 0x5C, 0x25):
            return f"the path contains an encoded '{chr(byte)}' (%{pair}), refused as traversal"
        if byte < 0x20 or byte == 0x7F:
            return "the path contains an encoded control character"
        i = path.find("%", i + 3)
    if "//" in path:
        return "the path contains an empty segment ('//')"
    for segment in path.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            return "the path contains a '.' or '..' segment"
    return None


def _syntax_problem(
    method: str, target: str, headers: Sequence[tuple[bytes, bytes]]
) -> str | None:
    if not isinstance(method, str) or not _TOKEN_RE.match(method):
        return "the method is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"
    if not isinstance(target, str):
        return "the request target is not a string"
    problem = _target_problem(target)
    if problem:
        return problem
    if not isinstance(headers, list | tuple):
        return "the headers are malformed"
    for i, item in enumerate(headers):
        if not isinstance(item, list | tuple) or len(item) != 2:
            return f"header {i} is malformed"
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            return f"header {i} is malformed"
        if not _TOKEN_BYTES_RE.match(name):
            return f"header {i} has an invalid name (control characters or separators)"
        if _HEADER_VALUE_BAD.search(value):
            shown = _show(name.decode("ascii"))
            return f"header {shown} contains a control character (CR, LF, NUL, ...)"
    return None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> tuple[Any, str | None]:
    """Strict JSON: UTF-8, no BOM, no duplicate keys, no NaN/Infinity."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, "the body is not UTF-8 text"
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        ), None
    except _DuplicateKey:
        return None, "the JSON body repeats a key (ambiguous: parsers disagree on which wins)"
    except (ValueError, RecursionError):
        return None, "the body is not valid JSON"


def _check_call(tool: HttpTool, call: Any, label: str) -> Decision:
    """One JSON-RPC call against the method lists and param filters."""
    name = tool.name
    if not isinstance(call, dict):
        return _deny(f"{label} is not a JSON object",
                     f"default deny: tools.{name} has JSON-RPC rules; calls must be objects")
    method = call.get("method")
    if not isinstance(method, str):
        return _deny(f"{label} has no string \"method\"",
                     f"default deny: tools.{name} has JSON-RPC rules; calls need a method")
    shown = _show(method)
    for k, denied in enumerate(tool.jsonrpc_deny_methods or ()):
        if method == denied:
            return _deny(f"{label}: method {shown} is denied",
                         _rule(name, "jsonrpc_deny_methods", k, denied))
    if tool.jsonrpc_allow_methods is None:
        rule = f"tools.{name}: no jsonrpc_allow_methods, {shown} is not in the deny list"
    else:
        for k, allowed in enumerate(tool.jsonrpc_allow_methods):
            if method == allowed:
                rule = _rule(name, "jsonrpc_allow_methods", k, allowed)
                break
        else:
            return _deny(f"{label}: method {shown} is not allowed",
                         f"default deny: {shown} is not in tools.{name}.jsonrpc_allow_methods")
    filt = (tool.jsonrpc_param_filters or {}).get(method)
    if filt is None:
        return Decision(True, f"{label}: method {shown} is allowed", rule)
    fpath = f"tools.{name}.jsonrpc_param_filters.{method}"
    params = call.get("params")
    if not isinstance(params, dict):
        return _deny(f"{label}: params must be an object holding {_show(filt.field)}",
                     f"default deny: {fpath} requires params.{filt.field}")
    if filt.field not in params:
        return _deny(f"{label}: params.{filt.field} is missing",
                     f"default deny: {fpath} requires params.{filt.field}")
    value = params[filt.field]
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        values = value
    elif isinstance(value, list) and not value:
        return _deny(f"{label}: params.{filt.field} is an empty array",
                     f"default deny: {fpath} needs at least one value to check")
    else:
        return _deny(f"{label}: params.{filt.field} must be a string or an array of strings",
                     f"default deny: {fpath} checks strings only")
    for j, item in enumerate(values):
        where = f"params.{filt.field}" + (f"[{j}]" if isinstance(value, list) else "")
        for k, pattern in enumerate(filt.deny_patterns):
            if fnmatch.fnmatchcase(item, pattern):
                return _deny(f"{label}: {where} matches a deny pattern",
                             f"{fpath}.deny_patterns[{k}] {_show(pattern)}")
        if not any(fnmatch.fnmatchcase(item, p) for p in filt.allow_patterns):
            return _deny(f"{label}: {where} matches no allow pattern",
                         f"default deny: no {fpath}.allow_patterns entry matches {where}")
    return Decision(True, f"{label}: method {shown} is allowed and its params pass {fpath}", rule)


def decide_http(
    policy: Policy,
    agent: str,
    tool: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> Decision:
    """Decide one HTTP request from the VM. Never raises; denies by default.

    ``target`` is the raw request-target (path and query) as the VM sent it;
    ``body`` is the whole request body (JSON-RPC checks need all of it).
    """
    found = _lookup(policy, agent, tool, HttpTool)
    if isinstance(found, Decision):
        return found
    assert isinstance(found, HttpTool)
    problem = _syntax_problem(method, target, headers)
    if problem:
        return _deny(problem, "default deny: malformed or unsafe request", "bad_request")
    if not isinstance(body, bytes):
        return _deny("the body is not bytes", "default deny: malformed request", "bad_request")
    path = target.split("?", 1)[0]
    path_rule = ""
    if found.allow_paths is not None:
        for i, entry in enumerate(found.allow_paths):
            if entry.method in ("*", method) and fnmatch.fnmatchcase(path, entry.path):
                path_rule = _rule(tool, "allow_paths", i, entry.text)
                break
        else:
            return _deny(f"{method} {_show(path)} is not an allowed path",
                         f"default deny: no tools.{tool}.allow_paths entry matches")
    if not found.jsonrpc_rules:
        return Decision(True, "the request passes the path rules",
                        path_rule or f"tools.{tool}: no allow_paths (every path is open)")
    if method in ("GET", "HEAD") and not body:
        return Decision(True, f"{method} without a body is not a JSON-RPC call",
                        path_rule or f"tools.{tool}: no allow_paths (every path is open)")
    doc, error = _parse_json(body)
    if error:
        return _deny(error, f"default deny: tools.{tool} has JSON-RPC rules; "
                     "the body must be a JSON-RPC request")
    if isinstance(doc, list):
        if not doc:
            return _deny("the JSON-RPC batch is empty",
                         f"default deny: tools.{tool} has JSON-RPC rules; "
                         "batches must not be empty")
        verdicts = [_check_call(found, call, f"batch call {i}") for i, call in enumerate(doc)]
        for verdict in verdicts:
            if not verdict.allow:
                return verdict
        return Decision(True, f"all {len(doc)} calls of the batch are allowed",
                        "; ".join(dict.fromkeys(v.rule for v in verdicts)))
    if not isinstance(doc, dict):
        return _deny(f"the JSON body is {_kind(doc)}, not a JSON-RPC object",
                     f"default deny: tools.{tool} has JSON-RPC rules; "
                     "the body must be a JSON-RPC request")
    return _check_call(found, doc, "the call")


def prepare_http_headers(
    tool: HttpTool, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the VM's, minus hop-by-hop ones, plus injected ones.

    Removes Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding,
    Upgrade, Host and Content-Length (the HTTP client frames the request
    itself), every header named in Connection, and every header whose name
    matches a ``headers_inject`` entry (case-insensitive), then appends the
    injected headers, so the VM can neither see nor override a credential.
    Call it only on headers that :func:`decide_http` accepted.
    """
    drop = set(_HOP_BY_HOP)
    drop.update(name.lower().encode("ascii") for name in tool.headers_inject)
    for name, value in headers:
        if name.lower() == b"connection":
            drop.update(tok.strip().lower() for tok in value.split(b",") if tok.strip())
    out = [
        (name, value)
        for name, value in headers
        if name.lower() not in drop and not name.lower().startswith(b"proxy-")
    ]
    out.extend(
        (name.encode("ascii"), value.encode("ascii"))
        for name, value in tool.headers_inject.items()
    )
    return out


def upstream_url(tool: HttpTool, target: str) -> str:
    """The upstream URL for an accepted request-target: base URL + target, unchanged."""
    return tool.upstream + target


# -- CLI --------------------------------------------------------------------


def argv_matches(args: Sequence[str], pattern: str) -> bool:
    """Whether decoded arguments match one argv pattern (semantics in the module doc)."""
    if not args:
        return pattern == ""
    line = shlex.join(args)
    if fnmatch.fnmatchcase(line, pattern):
        return True
    return pattern.endswith(" *") and fnmatch.fnmatchcase(line, pattern[:-2])


def _host_realpath(path: bytes) -> bytes:
    """Resolve symlinks on the host; raises OSError if the path does not exist."""
    return os.path.realpath(path, strict=True)


def _within(path: bytes, root: bytes) -> bool:
    """Component-wise containment: /home/a/x is within /home/a, /home/ab is not."""
    if root == b"/":
        return path.startswith(b"/")
    root = root.rstrip(b"/")
    return path == root or path.startswith(root + b"/")


def decide_cli(
    policy: Policy,
    agent: str,
    tool: str,
    argv: list[bytes],
    cwd: bytes,
    env: list[tuple[bytes, bytes]],
    *,
    realpath: Callable[[bytes], bytes] = _host_realpath,
) -> CliDecision:
    """Decide one CLI request from the VM and, if allowed, build what to exec.

    ``argv`` is the arguments after the tool name; ``env`` the VM's
    environment (only ``env_passthrough`` names are taken from it); ``cwd``
    the VM's directory (used only with ``cwd_allowed``). ``realpath``
    resolves a directory on the host and raises OSError if it does not
    exist; tests inject their own. Never raises; denies by default.
    """
    found = _lookup(policy, agent, tool, CliTool)
    if isinstance(found, Decision):
        return _cli_deny(found.reason, found.rule, found.code)
    assert isinstance(found, CliTool)
    if not isinstance(argv, list | tuple):
        return _cli_deny("argv is malformed", "default deny: malformed request", "bad_request")
    args: list[str] = []
    for i, raw in enumerate(argv, start=1):
        if not isinstance(raw, bytes):
            return _cli_deny(f"argument {i} is not bytes", "default deny: malformed request",
                             "bad_request")
        try:
            arg = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _cli_deny(f"argument {i} is not valid UTF-8",
                             "default deny: arguments must be UTF-8", "bad_request")
        for ch in arg:
            if ch != "\t" and unicodedata.category(ch) == "Cc":
                return _cli_deny(
                    f"argument {i} contains a control character (U+{ord(ch):04X})",
                    "default deny: arguments must not contain control characters",
                    "bad_request",
                )
        args.append(arg)

    for k, pattern in enumerate(found.argv_deny_patterns):
        if argv_matches(args, pattern):
            return _cli_deny("the arguments match a deny pattern",
                             _rule(tool, "argv_deny_patterns", k, pattern))
    for k, pattern in enumerate(found.argv_allow_patterns):
        if argv_matches(args, pattern):
            rule = _rule(tool, "argv_allow_patterns", k, pattern)
            break
    else:
        return _cli_deny("the arguments match no allow pattern",
                         f"default deny: no tools.{tool}.argv_allow_patterns entry matches")

    run_cwd = DEFAULT_CWD
    cwd_note = "runs in /"
    if found.cwd_allowed is not None:
        cpath = f"tools.{tool}.cwd_allowed"
        if not isinstance(cwd, bytes) or not cwd.startswith(b"/") or b"\0" in cwd:
            return _cli_deny("the working directory must be an absolute path",
                             f"default deny: {cpath} needs an absolute cwd", "bad_request")
        try:
            resolved = realpath(cwd)
        except (OSError, ValueError):
            return _cli_deny("the working directory does not exist on the host",
                             f"default deny: {cpath} requires an existing directory")
        for k, allowed in enumerate(found.cwd_allowed):
            try:
                root = realpath(allowed.encode("utf-8"))
            except (OSError, ValueError):
                continue
            if _within(resolved, root):
                run_cwd = resolved
                cwd_note = f"cwd is within {cpath}[{k}]"
                break
        else:
            shown = _show(resolved.decode("utf-8", "replace"))
            return _cli_deny(f"the working directory {shown} is outside cwd_allowed",
                             f"default deny: the resolved cwd is under no {cpath} entry")

    run_env: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in BASE_ENV.items()}
    if not isinstance(env, list | tuple):
        return _cli_deny("the environment is malformed", "default deny: malformed request",
                         "bad_request")
    wanted = {name.encode("ascii") for name in found.env_passthrough}
    for i, item in enumerate(env):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or not isinstance(item[1], bytes)
        ):
            return _cli_deny(f"environment entry {i} is malformed",
                             "default deny: malformed request", "bad_request")
        name, value = item
        if name in wanted:
            if b"\0" in value:
                return _cli_deny(
                    f"environment variable {name.decode('ascii')} contains a NUL byte",
                    f"default deny: tools.{tool}.env_passthrough values must not contain NUL",
                    "bad_request",
                )
            run_env[name] = value
    for name_s, value_s in found.env_inject.items():
        run_env[name_s.encode("utf-8")] = value_s.encode("utf-8")

    binary = found.binary
    return CliDecision(
        allow=True,
        reason=f"the arguments match an allow pattern; {cwd_note}",
        rule=rule,
        binary=binary,
        argv=[binary.encode("utf-8"), *argv],
        env=run_env,
        cwd=run_cwd,
    )


# --------------------------------------------------------------------------
# Lint


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
