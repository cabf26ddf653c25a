"""Floods of denials: past an agent's deny limit, denies are counted, not written one
record each (see "Floods of denials" in the package doc)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ..policy import RateLimiter

DEFAULT_DENY_LIMIT: Final = (100, 10.0)
"""Deny records per agent in any window of so many seconds (see the package doc)."""
MAX_SUPPRESSED_KINDS: Final = 20
"""Distinct (tool, code) pairs one ``denials_suppressed`` record lists; the VM names tools."""


@dataclass
class _Suppressed:
    since: float
    first_ts: str
    last_ts: str
    by: dict[tuple[str, str], int] = field(default_factory=dict)
    other: int = 0


class DenyThrottle:
    """At most ``max_records`` deny records per agent in any ``window_secs``; the rest
    are counted, and :meth:`due` turns the count into a summary record.

    Pure, like the :class:`RateLimiter` it uses: the caller passes the time.
    ``max_records`` 0 turns the throttle off.
    """

    def __init__(self, max_records: int, window_secs: float) -> None:
        if max_records < 0 or window_secs <= 0:
            raise ValueError("a deny limit is N records per S seconds, N >= 0 and S > 0")
        self.max_records = max_records
        self.window_secs = window_secs
        self.suppressed_total = 0
        self._limiter = RateLimiter()
        self._pending: dict[str, _Suppressed] = {}

    @property
    def limit(self) -> str:
        return f"{self.max_records} per {self.window_secs:g} s"

    def admit(self, agent: str, tool: str, code: str, now: float, ts: str) -> bool:
        """Whether this deny gets a record of its own; if not, it is counted.

        ``tool`` as its record names it: already cut to 256 characters."""
        if not self.max_records or self._limiter.check(
                agent, self.max_records, self.window_secs, now) is None:
            return True
        pending = self._pending.get(agent)
        if pending is None:
            pending = self._pending[agent] = _Suppressed(since=now, first_ts=ts, last_ts=ts)
        pending.last_ts = ts
        key = (tool, code)
        if key in pending.by or len(pending.by) < MAX_SUPPRESSED_KINDS:
            pending.by[key] = pending.by.get(key, 0) + 1
        else:
            pending.other += 1
        self.suppressed_total += 1
        return False

    def due(self, now: float, agent: str | None = None,
            everything: bool = False) -> list[dict[str, Any]]:
        """Summary records owed: of agents suppressed for a whole window (or of
        ``agent``, or ``everything``), each taken once."""
        out = []
        for name, pending in list(self._pending.items()):
            if everything or name == agent or now - pending.since >= self.window_secs:
                del self._pending[name]
                out.append(self._summary(name, pending))
        return out

    def _summary(self, agent: str, pending: _Suppressed) -> dict[str, Any]:
        by = sorted(pending.by.items(), key=lambda item: -item[1])
        count = sum(pending.by.values()) + pending.other
        record: dict[str, Any] = {
            "event": "denials_suppressed", "agent": agent, "decision": "deny",
            "reason": f"{count} denial(s) not recorded one by one: over the limit "
                      f"of {self.limit} (--audit-deny-limit)",
            "count": count, "first_ts": pending.first_ts, "last_ts": pending.last_ts,
            "by": [{"tool": tool, "code": code, "count": n} for (tool, code), n in by],
            "limit": self.limit,
        }
        if pending.other:
            record["other"] = pending.other
        elif len(by) == 1:
            record["tool"] = record["by"][0]["tool"]  # so that audit --tool finds it
        return record
