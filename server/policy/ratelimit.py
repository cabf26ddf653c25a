"""Sliding-window rate limiting, pure: the caller passes the time.

A key (``("tool", agent, tool)``, ``("global", tool)``, ``("agent", name)``)
may make at most ``max_requests`` requests in any window of ``window_secs`` seconds: an exact
sliding log, not a fixed bucket that allows a double burst at a boundary and
not a token bucket that refills mid-window, so "100 per 60 s" in a policy
means exactly that. Only allowed requests are counted, so a VM hammering a
limited tool does not extend its own lockout.

Memory is bounded: each key keeps at most ``max_requests`` timestamps (only
the newest ``max_requests`` can ever decide), keys whose window has passed
are swept out as time advances, and at most ``max_keys`` keys are kept (the
least recently used one is forgotten first). Nothing here reads a clock or
sleeps; the server passes ``time.monotonic()`` and tests pass numbers.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field

from .decision import Decision
from .model import Policy

__all__ = ["RateLimiter", "apply_rate_limits", "prune_rate_limits"]


@dataclass
class _Log:
    window_secs: float
    stamps: deque[float] = field(default_factory=deque)


class RateLimiter:
    """Per-key sliding-window limiter with an injected clock."""

    def __init__(self, max_keys: int = 10_000, sweep_every_secs: float = 60.0) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._logs: OrderedDict[Hashable, _Log] = OrderedDict()
        self._max_keys = max_keys
        self._sweep_every = sweep_every_secs
        self._next_sweep: float | None = None

    def __len__(self) -> int:
        """How many keys are currently remembered (for tests and metrics)."""
        return len(self._logs)

    def check(
        self, key: Hashable, max_requests: int, window_secs: float, now: float
    ) -> float | None:
        """Count a request for ``key`` at time ``now`` if the limit allows it.

        Returns None when the request is allowed (and counted). Otherwise it
        returns the seconds until a request would be allowed, rounded up to a
        whole number of at least 1 — ready for ``Retry-After`` — and the
        request is not counted. The limit is passed on every call, so a
        policy reload takes effect at once.
        """
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise ValueError("max_requests must be a positive integer")
        if not (0 < window_secs < math.inf):
            raise ValueError("window_secs must be a positive number")
        self._maybe_sweep(now)
        log = self._logs.get(key)
        if log is None:
            log = _Log(window_secs)
            self._logs[key] = log
            while len(self._logs) > self._max_keys:
                self._logs.popitem(last=False)
        else:
            self._logs.move_to_end(key)
        log.window_secs = window_secs
        stamps = log.stamps
        cutoff = now - window_secs
        while stamps and stamps[0] <= cutoff:
            stamps.popleft()
        while len(stamps) > max_requests:  # the limit was lowered
            stamps.popleft()
        if len(stamps) < max_requests:
            stamps.append(now)
            return None
        # Full: the oldest of the last max_requests leaves the window first.
        wait = min(stamps[0] + window_secs - now, window_secs)
        return float(max(1, math.ceil(wait)))

    def wait(
        self, key: Hashable, max_requests: int, window_secs: float, now: float
    ) -> float | None:
        """What :meth:`check` would answer, without counting anything."""
        log = self._logs.get(key)
        if log is None:
            return None
        cutoff = now - window_secs
        live = [t for t in log.stamps if t > cutoff][-max_requests:]
        if len(live) < max_requests:
            return None
        return float(max(1, math.ceil(min(live[0] + window_secs - now, window_secs))))

    def check_all(
        self, limits: Sequence[tuple[Hashable, int, float]], now: float
    ) -> tuple[int, float] | None:
        """Count one request against several keys at once, or against none.

        ``limits`` is ``(key, max_requests, window_secs)`` for each limit that
        applies. If any is full, nothing is counted and the answer is
        ``(index of the first full limit, longest wait)``; otherwise every key
        is counted and the answer is None. So a request refused by one limit
        does not use up another.
        """
        blocked: tuple[int, float] | None = None
        for i, (key, max_requests, window_secs) in enumerate(limits):
            wait = self.wait(key, max_requests, window_secs, now)
            if wait is not None:
                blocked = (i, wait) if blocked is None else (blocked[0], max(blocked[1], wait))
        if blocked is not None:
            return blocked
        for key, max_requests, window_secs in limits:
            self.check(key, max_requests, window_secs, now)
        return None

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one key's history, or every key's."""
        if key is None:
            self._logs.clear()
        else:
            self._logs.pop(key, None)

    def retain(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget every key for which ``keep`` is false (a reload dropped its limit)."""
        for key in [k for k in self._logs if not keep(k)]:
            del self._logs[key]

    def _maybe_sweep(self, now: float) -> None:
        """Drop keys whose every timestamp has left its window, now and then."""
        if self._next_sweep is not None and now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        stale = [
            key
            for key, log in self._logs.items()
            if not log.stamps or log.stamps[-1] <= now - log.window_secs
        ]
        for key in stale:
            del self._logs[key]


def apply_rate_limits(
    limiter: RateLimiter, decision: Decision, policy: Policy, agent: str, tool: str, now: float
) -> Decision:
    """Turn an allowed ``decision`` into a ``rate_limited`` deny if a limit is full.

    Three limits apply to an allowed request: the tool's ``rate_limit``,
    which each agent has for itself (the policy format's "N requests per
    window" extended to many agents: every agent gets its own budget, so one
    VM spending it cannot lock the others out); the tool's
    ``global_rate_limit``, one budget shared by every agent (it protects the
    service and the account behind the tool); and the agent's
    ``agents.NAME.rate_limit`` (across all its tools). A request is counted
    against all of them or none. Denied requests are returned unchanged and
    never counted. The limits are read from ``policy`` on every call, so a
    reload changes them at once while the history of recent requests is kept.
    """
    if not decision.allow:
        return decision
    limits: list[tuple[Hashable, int, float]] = []
    rules: list[tuple[str, str]] = []
    tool_obj = policy.tools.get(tool)
    if tool_obj is not None and tool_obj.rate_limit is not None:
        rl = tool_obj.rate_limit
        limits.append((("tool", agent, tool), rl.max_requests, rl.window_secs))
        rules.append((f"tool {tool} allows each agent {rl.max_requests} requests per "
                      f"{rl.window_secs:g} s", f"tools.{tool}.rate_limit"))
    if tool_obj is not None and tool_obj.global_rate_limit is not None:
        rl = tool_obj.global_rate_limit
        limits.append((("global", tool), rl.max_requests, rl.window_secs))
        rules.append((f"tool {tool} allows all agents together {rl.max_requests} requests per "
                      f"{rl.window_secs:g} s", f"tools.{tool}.global_rate_limit"))
    agent_rl = policy.agent_rate_limit(agent)
    if agent_rl is not None:
        limits.append((("agent", agent), agent_rl.max_requests, agent_rl.window_secs))
        rules.append((f"agent {agent} may make {agent_rl.max_requests} requests per "
                      f"{agent_rl.window_secs:g} s", f"agents.{agent}.rate_limit"))
    if not limits:
        return decision
    blocked = limiter.check_all(limits, now)
    if blocked is None:
        return decision
    index, wait = blocked
    reason, rule = rules[index]
    retry = max(1, math.ceil(wait))
    return Decision(
        allow=False, reason=f"{reason}; retry in {retry} s", rule=rule, code="rate_limited",
        retry_after=retry,
    )


def prune_rate_limits(limiter: RateLimiter, policy: Policy, agents: Collection[str]) -> None:
    """After a reload, forget the budgets of agents, tools and limits that are gone.

    Budgets are kept per (agent, tool), so their number is the configured
    agents times the limited tools; this keeps it so across reloads (the
    sweep would only drop a stale budget once its window has passed).
    """
    def live(key: Hashable) -> bool:
        if not isinstance(key, tuple) or not key:
            return True
        tool_obj = policy.tools.get(key[-1]) if key[0] in ("tool", "global") else None
        if key[0] == "tool":
            return key[1] in agents and tool_obj is not None and tool_obj.rate_limit is not None
        if key[0] == "global":
            return tool_obj is not None and tool_obj.global_rate_limit is not None
        if key[0] == "agent":
            return key[1] in agents and policy.agent_rate_limit(key[1]) is not None
        return True

    limiter.retain(live)
