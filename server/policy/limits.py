"""Parse limits: what the policy engine agrees to look at, checked before it looks.

A hostile VM can make one request as large as a frame (16 MiB): a JSON-RPC
batch of millions of calls, millions of arguments or headers. Judging that
costs seconds of CPU on the server's one event-loop thread, during which no
other agent is served. So every size that drives the cost of a decision is
capped, and each cap is checked with arithmetic on lengths (``len()`` of the
containers, sums over at most the capped number of items) before anything is
decoded, parsed or matched. A request over a cap is denied (code
``bad_request``) with a reason that names the limit, the size seen and how to
raise it, and :attr:`Decision.limit` names the cap for the audit trail and
the metrics.

Server-wide values come from the server's flags (:data:`LIMITS` lists them);
a tool may override any of its kind's limits in the policy, higher or lower::

    tools:
      signal-cli:
        type: http
        limits: {max_jsonrpc_body_bytes: 8388608, max_jsonrpc_batch: 500}

The JSON-RPC batch length cannot be known without parsing; the body cap
bounds that parse, and the batch cap is checked right after it, before any
call of the batch is judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final, TypeVar

from .decision import CliDecision, Decision
from .model import CliTool, HttpTool

D = TypeVar("D", bound=Decision)

DEFAULT_MAX_JSONRPC_BODY_BYTES: Final = 1024 * 1024
"""A JSON-RPC call is a method and a few parameters: 1 MiB is far above any
ordinary call, and judging a body that size worst case (many objects) takes
about 50 ms, which runs in a worker thread (see :data:`INLINE_DECIDE_BYTES`)."""
DEFAULT_MAX_JSONRPC_BATCH: Final = 100
"""Clients batch a handful of calls; 100 judged calls cost about 0.3 ms."""
DEFAULT_MAX_ARGV: Final = 4096
"""Far above any command line a person types; bulk input belongs on stdin."""
DEFAULT_MAX_ARGV_BYTES: Final = 1024 * 1024
"""The agent's own cap on a whole ``cli_request`` (argv, cwd and environment),
so an honest agent never meets it; it bounds the UTF-8 check and pattern match."""
DEFAULT_MAX_ENV: Final = 1024
"""The shim sends the VM's whole environment; real ones hold tens to a few hundred
variables. Each entry costs a lookup, so a million of them would cost a second."""
DEFAULT_MAX_HEADERS: Final = 256
"""Real clients send tens of headers; each is checked against a regex."""
DEFAULT_MAX_HEADER_BYTES: Final = 64 * 1024
"""The same size as the agent's ``--max-header-bytes`` default for a local request head;
counts the method, the request target and every header name and value."""

INLINE_DECIDE_BYTES: Final = 16 * 1024
"""Above this many bytes to parse (a JSON-RPC body, the argv), a decision runs in a
worker thread instead of on the event loop.

Measured on one core of a shared 2-core VM, CPython 3.11: judging a 16 KiB
JSON-RPC body takes at most ~2 ms whatever its shape (a batch of 100 calls:
0.3 ms); at the 1 MiB default cap it takes 35-55 ms inline (100 calls with
large params, one call holding 30,000 strings or 50,000 objects). In a worker
thread the event loop's longest pause during the same decisions measured
7-14 ms (a 1 ms timer tick and the interpreter's 5 ms GIL switch interval
included). 1 MiB of argv takes 2.5 ms in one argument and 20 ms in 4,096. A
thread hop costs ~0.1 ms, so small requests, nearly all of them, are decided
inline."""

DECIDE_WORKERS: Final = 2
"""Threads deciding large requests at once. Parsing holds the GIL, so more threads
would not decide faster; two let a second agent's large request start while one
is being judged. Each agent may use one of them at a time."""


@dataclass(frozen=True)
class ParseLimits:
    """The caps in force for one request (server-wide, or with a tool's overrides)."""

    max_jsonrpc_body_bytes: int = DEFAULT_MAX_JSONRPC_BODY_BYTES
    max_jsonrpc_batch: int = DEFAULT_MAX_JSONRPC_BATCH
    max_argv: int = DEFAULT_MAX_ARGV
    max_argv_bytes: int = DEFAULT_MAX_ARGV_BYTES
    max_env: int = DEFAULT_MAX_ENV
    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def for_tool(self, tool: HttpTool | CliTool) -> ParseLimits:
        """These limits with the tool's ``limits`` overrides applied."""
        return replace(self, **tool.limits) if tool.limits else self


DEFAULT_LIMITS: Final = ParseLimits()

LIMIT_NAMES: Final = tuple(f.name for f in fields(ParseLimits))
"""Every limit's name: its policy key under ``limits``, its flag with dashes."""
HTTP_LIMITS: Final = frozenset(
    {"max_jsonrpc_body_bytes", "max_jsonrpc_batch", "max_headers", "max_header_bytes"}
)
"""The limits an HTTP tool's ``limits`` may override."""
CLI_LIMITS: Final = frozenset({"max_argv", "max_argv_bytes", "max_env"})
"""The limits a CLI tool's ``limits`` may override."""

LIMIT_HELP: Final = {
    "max_jsonrpc_body_bytes": "Largest body of a request to a tool with JSON-RPC rules that "
    "the policy will parse, in bytes; larger ones are refused unparsed.",
    "max_jsonrpc_batch": "Most calls in one JSON-RPC batch the policy will judge.",
    "max_argv": "Most arguments in one CLI request the policy will judge.",
    "max_argv_bytes": "Largest total size of one CLI request's arguments, in bytes.",
    "max_env": "Most environment variables in one CLI request.",
    "max_headers": "Most headers in one HTTP request.",
    "max_header_bytes": "Largest HTTP request head (method, target, header names and "
    "values), in bytes.",
}
"""The ``--help`` text of each limit's flag (the policy key means the same for one tool)."""


def flag(name: str) -> str:
    """The server flag that sets limit ``name`` server-wide: ``--max-argv-bytes``."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable read by :func:`flag`: ``CARAPACE_MAX_ARGV_BYTES``."""
    return "CARAPACE_" + name.upper()


def _over(tool: HttpTool | CliTool, limits: ParseLimits, name: str, what: str,
          seen: int, kind: type[D]) -> D:
    """The deny for ``seen`` over limit ``name``: what, how much, and how to raise it."""
    cap = getattr(limits, name)
    key = f"tools.{tool.name}.limits.{name}"
    source = key if name in tool.limits else f"carapace-server {flag(name)}"
    reason = (f"{what} is {seen}, over the limit of {cap} ({name}); the operator can raise "
              f"it with carapace-server {flag(name)} or {key} in the policy")
    return kind(False, reason, f"limit {name} {cap} ({source})", "bad_request", limit=name)


def _pair_bytes(items: Sequence[Any]) -> int:
    """Bytes of the (name, value) pairs; malformed items count 0 (the syntax check refuses
    them). Call only on a sequence already known to be within its count cap."""
    total = 0
    for item in items:
        if isinstance(item, list | tuple) and len(item) == 2:
            for part in item:
                if isinstance(part, bytes):
                    total += len(part)
    return total


def http_limit_denial(tool: HttpTool, limits: ParseLimits, method: object, target: object,
                      headers: object, body: object) -> Decision | None:
    """The deny if an HTTP request is over a limit, else None. Costs O(max_headers)."""
    if isinstance(headers, list | tuple):
        if len(headers) > limits.max_headers:
            return _over(tool, limits, "max_headers", "the number of headers", len(headers),
                         Decision)
        head = _pair_bytes(headers)
        head += len(target) if isinstance(target, str) else 0
        head += len(method) if isinstance(method, str) else 0
        if head > limits.max_header_bytes:
            return _over(tool, limits, "max_header_bytes",
                         "the size of the request head (method, target and headers) in bytes",
                         head, Decision)
    if tool.jsonrpc_rules and isinstance(body, bytes) \
            and len(body) > limits.max_jsonrpc_body_bytes:
        return _over(tool, limits, "max_jsonrpc_body_bytes",
                     "the size of the JSON-RPC body in bytes", len(body), Decision)
    return None


def batch_limit_denial(tool: HttpTool, limits: ParseLimits, calls: int) -> Decision | None:
    """The deny if a parsed JSON-RPC batch holds more calls than the cap, else None."""
    if calls > limits.max_jsonrpc_batch:
        return _over(tool, limits, "max_jsonrpc_batch", "the number of calls in the batch",
                     calls, Decision)
    return None


def cli_limit_denial(tool: CliTool, limits: ParseLimits, argv: object,
                     env: object) -> CliDecision | None:
    """The deny if a CLI request is over a limit, else None. Costs O(max_argv + max_env)."""
    if isinstance(argv, list | tuple):
        if len(argv) > limits.max_argv:
            return _over(tool, limits, "max_argv", "the number of arguments", len(argv),
                         CliDecision)
        size = sum(len(a) for a in argv if isinstance(a, bytes))
        if size > limits.max_argv_bytes:
            return _over(tool, limits, "max_argv_bytes",
                         "the total size of the arguments in bytes", size, CliDecision)
    if isinstance(env, list | tuple) and len(env) > limits.max_env:
        return _over(tool, limits, "max_env", "the number of environment variables",
                     len(env), CliDecision)
    return None


def needs_worker(tool: object, limits: ParseLimits, body: object = None,
                 argv: object = None) -> bool:
    """Whether deciding this request parses more than :data:`INLINE_DECIDE_BYTES`.

    Such a decision belongs in a worker thread, not on the event loop. A
    request over a cap is refused before anything is parsed, so it stays
    inline. ``limits`` are the server-wide ones; the tool's overrides are
    applied here. Costs O(max_argv) at most.
    """
    if isinstance(tool, HttpTool):
        if not tool.jsonrpc_rules or not isinstance(body, bytes):
            return False
        cap = limits.for_tool(tool).max_jsonrpc_body_bytes
        return INLINE_DECIDE_BYTES < len(body) <= cap
    if isinstance(tool, CliTool) and isinstance(argv, list | tuple):
        own = limits.for_tool(tool)
        if len(argv) > own.max_argv:
            return False
        size = sum(len(a) for a in argv if isinstance(a, bytes))
        return INLINE_DECIDE_BYTES < size <= own.max_argv_bytes
    return False
