"""Floods of denials: past an agent's deny limit, denies are counted, not written one
record each (see "Floods of denials" in the package doc)."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from ..policy import RateLimiter

log = logging.getLogger("carapace.server")

DEFAULT_DENY_LIMIT: Final = (100, 10.0)
"""Deny records per agent in any window of so many seconds (see the package doc)."""
DEFAULT_DENY_BYTES: Final = 64 * 1024
"""Bytes of deny records per agent in the same window. 100 ordinary deny records
(300-700 bytes each) fit; records made large on purpose (up to
``--audit-max-record-bytes``) get 4 per window, not 100: one agent's flood then writes
at most ~10 KiB/s with its summaries, so the default rotation (6 x 50 MiB) keeps
about 9 hours of it (see DEPLOYMENT.md, "Audit retention under a flood")."""
MAX_SUPPRESSED_KINDS: Final = 20
"""Distinct (tool, code) pairs one ``denials_suppressed`` record lists; the VM names tools."""


@dataclass
class _Suppressed:
    since: float
    first_ts: str
    last_ts: str
    by: dict[tuple[str, str], int] = field(default_factory=dict)
    other: int = 0
    bytes: int = 0
    over: set[str] = field(default_factory=set)
    """Which budgets were exceeded: ``records``, ``bytes``."""


class DenyThrottle:
    """At most ``max_records`` deny records and ``max_bytes`` bytes of them per agent
    in any ``window_secs``; the rest are counted, and :meth:`due` turns the count into
    a summary record.

    Pure, like the :class:`RateLimiter` it uses: the caller passes the time.
    ``max_records`` 0 turns the record limit off, ``max_bytes`` 0 the byte budget.
    """

    def __init__(self, max_records: int, window_secs: float,
                 max_bytes: int = DEFAULT_DENY_BYTES) -> None:
        if max_records < 0 or window_secs <= 0:
            raise ValueError("a deny limit is N records per S seconds, N >= 0 and S > 0")
        if max_bytes < 0:
            raise ValueError("a deny byte budget is 0 (none) or a positive number of bytes")
        self.max_records = max_records
        self.window_secs = window_secs
        self.max_bytes = max_bytes
        self.suppressed_total = 0
        self.suppressed_bytes = 0
        """Bytes the suppressed deny records would have taken (as encoded, after caps)."""
        self._limiter = RateLimiter()
        self._written: dict[str, deque[tuple[float, int]]] = {}
        """agent → (time, bytes) of its deny records written in the window."""
        self._pending: dict[str, _Suppressed] = {}

    @property
    def active(self) -> bool:
        return bool(self.max_records or self.max_bytes)

    @property
    def limit(self) -> str:
        return f"{self.max_records} per {self.window_secs:g} s"

    def _bytes_left(self, agent: str, now: float) -> int:
        written = self._written.get(agent)
        if written is None:
            return self.max_bytes
        cutoff = now - self.window_secs
        while written and written[0][0] <= cutoff:
            written.popleft()
        if not written:
            del self._written[agent]
            return self.max_bytes
        return self.max_bytes - sum(n for _, n in written)

    def admit(self, agent: str, tool: str, code: str, now: float, ts: str,
              size: int = 0) -> bool:
        """Whether this deny (its record ``size`` bytes) gets a record of its own; if
        not, it is counted.

        ``tool`` as its record names it: already cut to a bounded length."""
        if self.max_bytes and size > self._bytes_left(agent, now):
            over = "bytes"
        elif self.max_records and self._limiter.check(
                agent, self.max_records, self.window_secs, now) is not None:
            over = "records"
        else:
            if self.max_bytes:
                self._written.setdefault(agent, deque()).append((now, size))
            return True
        pending = self._pending.get(agent)
        if pending is None:
            pending = self._pending[agent] = _Suppressed(since=now, first_ts=ts, last_ts=ts)
            what = (f"byte budget ({self.bytes_limit}, --audit-deny-bytes)" if over == "bytes"
                    else f"limit ({self.limit}, --audit-deny-limit)")
            log.warning("audit: agent %s is over its deny %s; its denials are counted in a "
                        "denials_suppressed record until the window ends", agent, what)
        pending.last_ts = ts
        pending.over.add(over)
        pending.bytes += size
        key = (tool, code)
        if key in pending.by or len(pending.by) < MAX_SUPPRESSED_KINDS:
            pending.by[key] = pending.by.get(key, 0) + 1
        else:
            pending.other += 1
        self.suppressed_total += 1
        self.suppressed_bytes += size
        return False

    def charge(self, agent: str, now: float, size: int) -> None:
        """Count a ``denials_suppressed`` record of ``size`` bytes against the agent's
        byte budget: written whatever the budget, it still uses it up, so that the
        summaries of a long flood cannot become a flood of their own."""
        if self.max_bytes:
            self._written.setdefault(agent, deque()).append((now, size))

    @property
    def bytes_limit(self) -> str:
        return f"{self.max_bytes} bytes per {self.window_secs:g} s"

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
            "reason": f"{count} denial(s) not recorded one by one: over "
                      + " and ".join(why for key, why in (
                          ("records", f"the limit of {self.limit} (--audit-deny-limit)"),
                          ("bytes", f"the byte budget of {self.bytes_limit} "
                                    "(--audit-deny-bytes)")) if key in pending.over),
            "count": count, "first_ts": pending.first_ts, "last_ts": pending.last_ts,
            "by": [{"tool": tool, "code": code, "count": n} for (tool, code), n in by],
            "limit": self.limit,
        }
        if "bytes" in pending.over:
            record.update(bytes_limit=self.bytes_limit, suppressed_bytes=pending.bytes)
        if pending.other:
            record["other"] = pending.other
        elif len(by) == 1:
            record["tool"] = record["by"][0]["tool"]  # so that audit --tool finds it
        return record
