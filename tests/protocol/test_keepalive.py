"""Keepalive: the ping schedule, the idle timeout, round trips, a bounded ping table."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol.keepalive import PINGS_REMEMBERED, Expired, Keepalive
from carapace.protocol.messages import Ping


def test_nothing_is_due_before_the_interval() -> None:
    ka = Keepalive(5.0, 15.0, now=100.0)
    assert ka.next_tick == 105.0
    assert ka.tick(100.0) is None
    assert ka.tick(104.999) is None
    assert ka.tick(105.0) == Ping(nonce=1)
    assert ka.next_tick == 110.0


def test_the_next_ping_is_an_interval_after_the_tick_that_sent_one() -> None:
    ka = Keepalive(5.0, 15.0, now=0.0)
    ka.heard(5.0)
    assert ka.tick(5.5) == Ping(nonce=1)  # woken late: the schedule follows the wake-up
    assert ka.tick(10.0) is None
    assert ka.tick(10.5) == Ping(nonce=2)


def test_a_silent_peer_expires_after_the_idle_timeout_not_at_it() -> None:
    ka = Keepalive(5.0, 15.0, now=0.0)
    assert isinstance(ka.tick(5.0), Ping)
    assert isinstance(ka.tick(10.0), Ping)
    assert isinstance(ka.tick(15.0), Ping)  # exactly 15 s of silence: still alive
    assert ka.tick(20.0) == Expired(20.0)
    assert ka.expired


def test_expired_stays_expired() -> None:
    ka = Keepalive(1.0, 1.5, now=0.0)
    assert isinstance(ka.tick(1.0), Ping)
    assert isinstance(ka.tick(2.0), Expired)
    ka.heard(2.1)
    assert ka.tick(2.2) == Expired(2.2 - 2.1)  # not due, yet the verdict stands


def test_any_frame_heard_keeps_the_link_alive() -> None:
    ka = Keepalive(5.0, 15.0, now=0.0)
    for t in range(5, 100, 5):
        ka.heard(t - 1.0)
        assert isinstance(ka.tick(float(t)), Ping)


def test_silence_may_be_counted_from_before_pinging_starts() -> None:
    """The server counts from the connection's opening, handshake included."""
    opened, serving = 0.0, 2.0
    ka = Keepalive(5.0, 15.0, now=serving, last_heard=opened)
    assert isinstance(ka.tick(7.0), Ping)
    assert isinstance(ka.tick(12.0), Ping)
    assert ka.tick(17.0) == Expired(17.0)  # 17 s since it opened, though 15 since serving


def test_a_pong_gives_the_round_trip_once() -> None:
    ka = Keepalive(5.0, 15.0, now=0.0)
    ping = ka.tick(5.0)
    assert isinstance(ping, Ping)
    assert ka.outstanding == 1
    assert ka.on_pong(ping.nonce, 5.25) == 0.25
    assert ka.outstanding == 0
    assert ka.on_pong(ping.nonce, 5.5) is None  # a second pong says nothing new


def test_unknown_and_forgotten_pongs_say_nothing() -> None:
    ka = Keepalive(1.0, 1000.0, now=0.0)
    assert ka.on_pong(1, 0.5) is None  # never sent
    nonces = []
    for t in range(1, PINGS_REMEMBERED + 2):
        ping = ka.tick(float(t))
        assert isinstance(ping, Ping)
        nonces.append(ping.nonce)
    assert ka.outstanding == PINGS_REMEMBERED
    assert ka.on_pong(nonces[0], 100.0) is None  # the oldest was forgotten
    assert ka.on_pong(nonces[1], 100.0) == 100.0 - 2


@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans(), st.integers(0, 40)),
                max_size=200))
def test_the_ping_table_stays_bounded(steps: list[tuple[float, bool, int]]) -> None:
    """Whatever the peer answers (or not), at most PINGS_REMEMBERED pings are remembered,
    nonces only grow, and a round trip is never negative."""
    ka = Keepalive(1.0, 1e9, now=0.0)
    now, last_nonce = 0.0, 0
    for advance, answer, nonce in steps:
        now += advance
        action = ka.tick(now)
        if isinstance(action, Ping):
            assert action.nonce == last_nonce + 1
            last_nonce = action.nonce
        if answer:
            rtt = ka.on_pong(nonce, now)
            assert rtt is None or rtt >= 0
        assert ka.outstanding <= PINGS_REMEMBERED
