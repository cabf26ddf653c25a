"""Connections that have not authenticated yet: how many the server holds, and a quiet log.

Before its handshake a peer is anyone who can reach the port, so it gets
almost nothing: a slot among ``--max-unauthenticated`` (and among
``--max-unauthenticated-per-address`` for its source address), a small frame
cap and the handshake timeout. A connection over a cap is closed at once;
the refusals are counted, and logged at most once per interval, so a flood
costs one line, not one per connection.
"""

from __future__ import annotations

DEFAULT_MAX_UNAUTHENTICATED = 128
"""Connections in their handshake at once: twice the default --max-agents, so that
every agent can reconnect together after a restart, with room to spare; a handshake
takes one round trip, so a slot is normally held for milliseconds."""

DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS = 32
"""Of those, from one source address: half of --max-agents' default (several VMs
may share a host address), and a quarter of all slots, so one address flooding the
port cannot take every slot from the others."""

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between log lines about refused unauthenticated connections."""


class Slot:
    """One connection's place until it authenticates or ends (release is idempotent)."""

    __slots__ = ("_address", "_owner")

    def __init__(self, owner: HandshakeSlots, address: str) -> None:
        self._owner: HandshakeSlots | None = owner
        self._address = address

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self._address)


class HandshakeSlots:
    """The caps on unauthenticated connections, overall and per source address."""

    def __init__(self, total: int = DEFAULT_MAX_UNAUTHENTICATED,
                 per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        """Connections holding a slot now."""
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Slot | str:
        """A slot for a new connection from ``address``, or why there is none
        (``"total"`` or ``"per_address"``: the metric's label)."""
        if self.open >= self.total:
            return "total"
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            return "per_address"
        self.open += 1
        self._by_address[address] = held + 1
        return Slot(self, address)

    def held_by(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def _release(self, address: str) -> None:
        self.open -= 1
        held = self._by_address[address] - 1
        if held:
            self._by_address[address] = held
        else:
            del self._by_address[address]


class LogThrottle:
    """At most one log line per ``interval``; the lines between are counted, not lost."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._quiet = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet (counted). Else log now; the number is how many were skipped."""
        if now < self._next:
            self._quiet += 1
            return None
        self._next = now + self.interval
        skipped, self._quiet = self._quiet, 0
        return skipped
