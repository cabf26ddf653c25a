"""Link keepalive: when to ping, when a silent link is dead, what a pong says.

Both ends of a link run the same machine. Every frame heard from the peer
counts as a sign of life (:meth:`Keepalive.heard`); every ``interval``
seconds :meth:`Keepalive.tick` either says the link has been silent for
longer than ``idle_timeout`` (:class:`Expired`) or hands out the next
``ping``. A ``pong`` that answers one of the last few pings gives the round
trip time. Time is passed in, never read here, so the caller's clock (trio's,
or a test's) is the only one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError
from .messages import Ping, Pong

DEFAULT_IDLE_TIMEOUT = 15.0
"""Seconds of silence after which either side drops a link (the spec's 15 s)."""

DEFAULT_PING_INTERVAL = DEFAULT_IDLE_TIMEOUT / 3
"""A ping every third of the idle timeout: two can be lost before a live link is dropped."""

PINGS_REMEMBERED = 8
"""Pings whose pong still yields a round trip time; older ones are forgotten.

With the default 5 s interval that is 40 s, well past the idle timeout: a pong
later than that says nothing useful, and a peer that never answers must not
grow the table.
"""


PING_RATE_LIMIT = 20.0
"""Pings per second a peer may send, sustained. A compliant peer sends one every third
of its idle timeout (every 5 s by default); 20 a second would be an idle timeout of
0.15 s, which no real link uses. Each ping is owed a pong, so a peer that pings faster
without reading its socket would make the other side queue pongs without end."""

PING_BURST = 40
"""Pings a peer may send at once above :data:`PING_RATE_LIMIT` before it is refused."""


class PingBudget:
    """The peer's pings, as a token bucket: each one answered takes a token.

    A peer past it is flooding, not keeping the link alive, and is to be cut
    off before its pongs pile up: the check costs the same whatever it sent.
    """

    def __init__(self, now: float, rate: float = PING_RATE_LIMIT,
                 burst: int = PING_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Whether a ping that arrived at ``now`` may be answered (False: a flood)."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class Expired:
    """Nothing was heard from the peer for longer than the idle timeout: drop the link."""

    silent_for: float


class Keepalive:
    """One link's keepalive state; ``now`` is the caller's clock in seconds."""

    def __init__(self, interval: float, idle_timeout: float, now: float, *,
                 last_heard: float | None = None,
                 ping_budget: PingBudget | None = None) -> None:
        """Start pinging: the first tick is due ``interval`` after ``now``.

        ``last_heard`` is when the peer was last heard if that was before
        ``now``; the server counts silence from the moment the connection
        opened, so a peer that goes quiet during the handshake gets no extra
        time for it. ``ping_budget`` bounds the peer's pings (the server's
        side: its peer is the VM); without one every ping is answered.
        """
        self.interval = interval
        self.idle_timeout = idle_timeout
        self.last_heard = now if last_heard is None else last_heard
        self.next_tick = now + interval
        """When :meth:`tick` has something to say next."""
        self.expired = False
        self.ping_budget = ping_budget
        self._nonce = 0
        self._sent: dict[int, float] = {}  # nonce -> when it was sent, oldest first

    def heard(self, now: float) -> None:
        """A frame (any frame) arrived from the peer."""
        self.last_heard = now

    def tick(self, now: float) -> Ping | Expired | None:
        """The ping to send now, :class:`Expired` if the peer is gone, None if not yet due.

        Once expired it stays expired: the link is to be dropped, not revived.
        """
        if self.expired:
            return Expired(now - self.last_heard)
        if now < self.next_tick:
            return None
        self.next_tick = now + self.interval
        silent_for = now - self.last_heard
        if silent_for > self.idle_timeout:
            self.expired = True
            return Expired(silent_for)
        self._nonce += 1
        self._sent[self._nonce] = now
        self._sent.pop(self._nonce - PINGS_REMEMBERED, None)
        return Ping(nonce=self._nonce)

    def on_ping(self, ping: Ping, now: float) -> Pong:
        """The pong owed for the peer's ``ping``; ProtocolError past its ping budget."""
        if self.ping_budget is not None and not self.ping_budget.take(now):
            raise ProtocolError(f"more than {PING_RATE_LIMIT:g} pings a second: a flood, not "
                                "a keepalive (each is owed a pong)")
        return Pong(nonce=ping.nonce)

    def on_pong(self, nonce: int, now: float) -> float | None:
        """The round trip time of the ping ``nonce`` answers, or None.

        None for a nonce we never sent, one too old to remember, or one
        already answered: a pong counts once.
        """
        sent = self._sent.pop(nonce, None)
        return None if sent is None else now - sent

    @property
    def outstanding(self) -> int:
        """Pings sent and not (yet) answered, among the remembered ones."""
        return len(self._sent)
