"""Fair shares: how much one agent, and all agents together, may hold open at once.

Rate limits (``policy/ratelimit.py``) bound how often; these bound how much at
the same time. Three things are scarce on the host and each has two caps:

- ``cli_processes``: CLI tool processes running (each a real process with
  three pipes; ``--max-cli-processes-per-agent`` / ``--max-cli-processes``);
- ``upstream_connections``: connections in use to one HTTP tool's upstream
  (one per request in flight to it, an event stream's for as long as it is
  open; ``--max-upstream-connections-per-agent`` /
  ``--max-upstream-connections``, both per tool). Idle pooled connections
  are bounded by the pool itself (``UpstreamClient.max_idle_per_origin``);
- ``sse_streams``: event streams open, across tools (``--max-sse-streams-per-agent``
  / ``--max-sse-streams``). A stream is known to be one only when its
  upstream answers ``text/event-stream``, so it is counted (and refused)
  from then on; a request that asks for one (``Accept: text/event-stream``)
  is also refused before it is sent when no stream could be admitted, so a
  well-behaved client's request does not reach the upstream in vain.

An agent at its own cap is refused with 429 ``too_many_requests``; any
agent, when all of them together are at the host-wide cap, with 503
``server_busy``. Both carry ``retry_after``: a refusal never waits for a
slot, so a VM that hoards cannot make another's request hang. 0 turns a cap
off. Counts are kept only for what is open (an entry goes when it drops to
zero), so memory follows what runs, not how many agents or tools exist.
Pure bookkeeping: no trio, no clock; the pipeline takes a :class:`Slot`
before it starts the thing and releases it when the thing is gone.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal

Limit = Literal["cli_processes", "upstream_connections", "sse_streams"]
Scope = Literal["agent", "host"]

LIMITS: Final[tuple[Limit, ...]] = ("cli_processes", "upstream_connections", "sse_streams")
SCOPES: Final[tuple[Scope, ...]] = ("agent", "host")

DEFAULT_MAX_CLI_PROCESSES_PER_AGENT: Final = 32
"""A shell or an agent's tool loop runs a few commands at a time; ``xargs -P 16``
still fits. Each is a real process (a Go CLI such as gh or op is 20-50 MB
resident), so one VM cannot fork the host out of memory or PIDs."""
DEFAULT_MAX_CLI_PROCESSES: Final = 128
"""Four agents at their cap together; ~128 × 50 MB stays within a small host's
memory, and 384 pipe descriptors are nothing against ``LimitNOFILE=65536``."""
DEFAULT_MAX_UPSTREAM_CONNECTIONS_PER_AGENT: Final = 256
"""Per tool. JSON-RPC clients run tens of calls at once (the benchmark runs 32)
and each open event stream holds one too; a service such as signal-cli's
daemon (one JVM) gains nothing from more from one VM."""
DEFAULT_MAX_UPSTREAM_CONNECTIONS: Final = 1024
"""Per tool, all agents: four agents at their cap, and far below what the
server's descriptors (``LimitNOFILE=65536``) or a typical upstream accept."""
DEFAULT_MAX_SSE_STREAMS_PER_AGENT: Final = 128
"""A VM subscribes to a few feeds (signal-cli's receive stream, an MCP server's
events); 128 leaves room for many clients in one VM. Each open stream costs
the server ~14 KiB and an upstream socket for as long as it lives."""
DEFAULT_MAX_SSE_STREAMS: Final = 2048
"""Sixteen agents at their cap: ~28 MiB of server memory and 2048 sockets.
Raise both for deliberate fan-out (the idle-streams benchmark holds 10,000)."""

RETRY_AFTER: Final = 1
"""Seconds a refused VM is told to wait: a slot frees when any request of the
kind ends, which is usually within a second; there is nothing better to
predict, and a short wait keeps a well-behaved client responsive."""

_FLAGS: Final[dict[tuple[Limit, Scope], str]] = {
    ("cli_processes", "agent"): "--max-cli-processes-per-agent",
    ("cli_processes", "host"): "--max-cli-processes",
    ("upstream_connections", "agent"): "--max-upstream-connections-per-agent",
    ("upstream_connections", "host"): "--max-upstream-connections",
    ("sse_streams", "agent"): "--max-sse-streams-per-agent",
    ("sse_streams", "host"): "--max-sse-streams",
}

_WHAT: Final[dict[Limit, str]] = {
    "cli_processes": "CLI processes running",
    "upstream_connections": "connections open to the upstream of tool",
    "sse_streams": "event streams open",
}


@dataclass(frozen=True)
class ShareCaps:
    """The six caps (0: no cap); ``ServerConfig`` holds one built from the flags."""

    cli_processes_per_agent: int = DEFAULT_MAX_CLI_PROCESSES_PER_AGENT
    cli_processes: int = DEFAULT_MAX_CLI_PROCESSES
    upstream_connections_per_agent: int = DEFAULT_MAX_UPSTREAM_CONNECTIONS_PER_AGENT
    upstream_connections: int = DEFAULT_MAX_UPSTREAM_CONNECTIONS
    sse_streams_per_agent: int = DEFAULT_MAX_SSE_STREAMS_PER_AGENT
    sse_streams: int = DEFAULT_MAX_SSE_STREAMS

    def cap(self, limit: Limit, scope: Scope) -> int:
        name = f"{limit}_per_agent" if scope == "agent" else limit
        value: int = getattr(self, name)
        return value


@dataclass(frozen=True)
class Refusal:
    """Why a slot was not given: which cap, whose, and what to tell the VM."""

    limit: Limit
    scope: Scope
    cap: int
    agent: str
    tool: str | None = None
    retry_after: int = RETRY_AFTER

    @property
    def flag(self) -> str:
        return _FLAGS[(self.limit, self.scope)]

    @property
    def status(self) -> int:
        return 429 if self.scope == "agent" else 503

    @property
    def code(self) -> str:
        return "too_many_requests" if self.scope == "agent" else "server_busy"

    @property
    def reason(self) -> str:
        """One line for the VM, the log and the audit trail (names only, no content)."""
        what = _WHAT[self.limit] + (f" {self.tool}" if self.limit == "upstream_connections"
                                    else "")
        if self.scope == "agent":
            return (f"agent {self.agent} already has {self.cap} {what} ({self.flag} on the "
                    f"host); retry in {self.retry_after} s or when some finish")
        return (f"the host already has {self.cap} {what} for all agents together "
                f"({self.flag}); retry in {self.retry_after} s")


class Slot:
    """One thing counted against its agent's and the host's caps until released."""

    __slots__ = ("_agent_key", "_host_key", "_shares")

    def __init__(self, shares: FairShares, agent_key: Hashable, host_key: Hashable) -> None:
        self._shares: FairShares | None = shares
        self._agent_key = agent_key
        self._host_key = host_key

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        shares, self._shares = self._shares, None
        if shares is not None:
            _drop(shares._agents, self._agent_key)
            _drop(shares._host, self._host_key)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _drop(counts: dict[Hashable, int], key: Hashable) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class FairShares:
    """The server's counts of what each agent, and the host, holds open."""

    def __init__(self, caps: ShareCaps | None = None) -> None:
        self.caps = caps if caps is not None else ShareCaps()
        self._agents: dict[Hashable, int] = {}
        """(limit, agent[, tool]) → held now; absent when zero."""
        self._host: dict[Hashable, int] = {}
        """(limit[, tool]) → held now by all agents; absent when zero."""
        self.refusals: dict[tuple[Limit, Scope], int] = {
            (limit, scope): 0 for limit in LIMITS for scope in SCOPES}
        """How often each cap refused, for /metrics."""

    def acquire(self, limit: Limit, agent: str, tool: str | None = None) -> Slot | Refusal:
        """A slot of ``limit`` for ``agent`` (``tool``: for upstream connections), or why not.

        The agent's own cap is checked first, so an agent at its cap is told
        that (429) even when the host is full too.
        """
        refusal = self.full(limit, agent, tool)
        if refusal is not None:
            return refusal
        agent_key, host_key = self._keys(limit, agent, tool)
        self._agents[agent_key] = self._agents.get(agent_key, 0) + 1
        self._host[host_key] = self._host.get(host_key, 0) + 1
        return Slot(self, agent_key, host_key)

    def full(self, limit: Limit, agent: str, tool: str | None = None) -> Refusal | None:
        """Why a slot of ``limit`` would be refused now (counted as a refusal), or None.

        Takes nothing: for a request that asks for an event stream, refused
        before it reaches the upstream when no stream could be admitted.
        """
        agent_key, host_key = self._keys(limit, agent, tool)
        shown_tool = tool if limit == "upstream_connections" else None
        cap = self.caps.cap(limit, "agent")
        if cap and self._agents.get(agent_key, 0) >= cap:
            self.refusals[(limit, "agent")] += 1
            return Refusal(limit, "agent", cap, agent, shown_tool)
        cap = self.caps.cap(limit, "host")
        if cap and self._host.get(host_key, 0) >= cap:
            self.refusals[(limit, "host")] += 1
            return Refusal(limit, "host", cap, agent, shown_tool)
        return None

    @staticmethod
    def _keys(limit: Limit, agent: str, tool: str | None) -> tuple[Hashable, Hashable]:
        """The agent's and the host's count of ``limit`` (upstream connections: per tool)."""
        if limit == "upstream_connections":
            return (limit, agent, tool), (limit, tool)
        return (limit, agent), limit

    def in_use(self, limit: Limit) -> int:
        """How many of ``limit`` all agents hold now (summed over tools)."""
        if limit != "upstream_connections":
            return self._host.get(limit, 0)
        return sum(n for key, n in self._host.items() if isinstance(key, tuple))

    def held(self, limit: Limit, agent: str, tool: str | None = None) -> int:
        """How many of ``limit`` ``agent`` holds now (for tests and the operator)."""
        key = (limit, agent, tool) if limit == "upstream_connections" else (limit, agent)
        return self._agents.get(key, 0)
