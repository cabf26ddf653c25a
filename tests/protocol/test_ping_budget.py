"""The peer's ping budget: a compliant keepalive never meets it, a flood does at once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol.errors import ProtocolError
from carapace.protocol.keepalive import (
    DEFAULT_PING_INTERVAL,
    PING_BURST,
    PING_RATE_LIMIT,
    Keepalive,
    PingBudget,
)
from carapace.protocol.messages import Ping, Pong


def test_a_keepalive_at_any_sane_interval_is_always_answered() -> None:
    for interval in (DEFAULT_PING_INTERVAL, 1.0, 0.1, 1 / PING_RATE_LIMIT):
        budget = PingBudget(0.0)
        now = 0.0
        for _ in range(1000):
            now += interval
            assert budget.take(now)


def test_a_flood_is_refused_after_the_burst_and_stays_refused() -> None:
    budget = PingBudget(0.0)
    assert all(budget.take(0.0) for _ in range(PING_BURST))
    assert not budget.take(0.0)
    # 10,000 more at once, within one millisecond: none is answered
    assert not any(budget.take(i / 10_000_000) for i in range(10_000))


def test_the_budget_refills_at_its_rate() -> None:
    budget = PingBudget(0.0)
    for _ in range(PING_BURST):
        budget.take(0.0)
    assert not budget.take(0.0)
    assert budget.take(1 / PING_RATE_LIMIT)
    assert not budget.take(1 / PING_RATE_LIMIT)


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=300))
def test_never_more_than_the_burst_plus_the_rate_over_any_run(gaps: list[float]) -> None:
    budget = PingBudget(0.0)
    now = 0.0
    answered = 0
    for gap in gaps:
        now += gap
        answered += budget.take(now)
    assert answered <= PING_BURST + now * PING_RATE_LIMIT + 1e-6


def test_keepalive_answers_pings_and_ends_a_flood_only_with_a_budget() -> None:
    guarded = Keepalive(5.0, 15.0, 0.0, ping_budget=PingBudget(0.0))
    trusting = Keepalive(5.0, 15.0, 0.0)
    for n in range(PING_BURST):
        assert guarded.on_ping(Ping(nonce=n), 0.0) == Pong(nonce=n)
    with pytest.raises(ProtocolError, match="pings a second"):
        guarded.on_ping(Ping(nonce=PING_BURST), 0.0)
    # the agent's side keeps no budget: its peer is the host it trusts
    assert all(trusting.on_ping(Ping(nonce=n), 0.0) == Pong(nonce=n) for n in range(1000))
