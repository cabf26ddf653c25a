"""Sliding-window rate limiting, pure: the caller passes the time.

A key (a tool name, an agent name, ``("agent", name)``...) may make at most
``max_requests`` requests in any window of ``window_secs`` seconds: an exact
sliding log, not a fixed bucket that allows a double burst at a boundary and
not a token bucket that refills mid-window, so "100 per 60 s" in a policy
means exactly that. Only allowed requests are counted, so a VM hammering a
limited tool does not extend its own lockout.

Memory is bounded: each key keeps at most ``max_requests`` timestamps (only
the newest ``max_requests`` can ever decide), keys whose window has passed
are swept out as time advances, and at most ``max_keys`` keys are kept (the
least recently used one is forgotten first). Nothing here reads a clock or
sleeps; the server passes ``trio.current_time()`` and tests pass numbers.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["RateLimiter", "retry_after_header"]


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

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one key's history, or every key's."""
        if key is None:
            self._logs.clear()
        else:
            self._logs.pop(key, None)

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


def retry_after_header(wait: float) -> bytes:
    """The ``Retry-After`` header value for a wait returned by :meth:`RateLimiter.check`."""
    return str(max(1, math.ceil(wait))).encode("ascii")
