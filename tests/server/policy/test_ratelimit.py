"""The sliding-window limiter, driven by explicit times (no clock, no sleeps)."""

from __future__ import annotations

import pytest

from carapace.server.policy import RateLimiter


def test_allows_up_to_max_then_waits_for_the_oldest() -> None:
    rl = RateLimiter()
    for t in (0.0, 1.0, 2.0):
        assert rl.check("sig", 3, 10, t) is None
    assert rl.check("sig", 3, 10, 2.5) == 8.0  # oldest (t=0) leaves at t=10
    assert rl.check("sig", 3, 10, 9.99) == 1.0  # rounded up, at least 1
    assert rl.check("sig", 3, 10, 10.0) is None  # t=0 has left the window
    assert rl.check("sig", 3, 10, 10.5) == 1.0  # t=1 leaves at 11


def test_sliding_not_fixed_window() -> None:
    rl = RateLimiter()
    # 100 per 60 s: a burst at the end of one minute and the start of the next
    # must not add up to 200.
    for i in range(100):
        assert rl.check("k", 100, 60, 59.0 + i * 0.001) is None
    assert rl.check("k", 100, 60, 61.0) == 58.0
    assert rl.check("k", 100, 60, 119.0) is None


def test_denied_requests_are_not_counted() -> None:
    rl = RateLimiter()
    assert rl.check("k", 1, 5, 0.0) is None
    for t in (1.0, 2.0, 3.0, 4.0):
        assert rl.check("k", 1, 5, t) is not None
    assert rl.check("k", 1, 5, 5.0) is None


def test_retry_after_is_whole_and_at_least_one() -> None:
    rl = RateLimiter()
    assert rl.check("k", 1, 0.25, 0.0) is None
    wait = rl.check("k", 1, 0.25, 0.1)
    assert wait == 1.0 and float(wait).is_integer()


def test_keys_are_independent() -> None:
    rl = RateLimiter()
    assert rl.check(("tool", "sig"), 1, 60, 0.0) is None
    assert rl.check(("agent", "vm1"), 1, 60, 0.0) is None
    assert rl.check(("tool", "sig"), 1, 60, 1.0) == 59.0
    assert rl.check(("agent", "vm2"), 1, 60, 1.0) is None


def test_lowered_limit_applies_at_once() -> None:
    rl = RateLimiter()
    for t in range(10):
        assert rl.check("k", 10, 100, float(t)) is None
    # reload: now 2 per 100 s; the two newest stamps (8, 9) decide
    assert rl.check("k", 2, 100, 10.0) == 98.0
    assert rl.check("k", 2, 100, 108.0) is None


def test_raised_limit_applies_at_once() -> None:
    rl = RateLimiter()
    assert rl.check("k", 1, 100, 0.0) is None
    assert rl.check("k", 1, 100, 1.0) is not None
    assert rl.check("k", 5, 100, 2.0) is None


def test_time_going_backwards_never_asks_for_more_than_a_window() -> None:
    rl = RateLimiter()
    assert rl.check("k", 1, 10, 100.0) is None
    assert rl.check("k", 1, 10, 50.0) == 10.0


def test_old_keys_are_swept() -> None:
    rl = RateLimiter(sweep_every_secs=10)
    for i in range(1000):
        rl.check(f"k{i}", 5, 1, 0.0)
    assert len(rl) == 1000
    rl.check("late", 5, 1, 100.0)
    assert len(rl) == 1


def test_max_keys_bounds_memory() -> None:
    rl = RateLimiter(max_keys=10)
    for i in range(100):
        rl.check(f"k{i}", 5, 1000, float(i) * 0.001)
    assert len(rl) == 10


def test_per_key_memory_bounded_by_max_requests() -> None:
    rl = RateLimiter()
    for i in range(10_000):
        rl.check("k", 3, 1e9, float(i))
    assert len(rl._logs["k"].stamps) == 3


def test_reset() -> None:
    rl = RateLimiter()
    rl.check("a", 1, 10, 0.0)
    rl.check("b", 1, 10, 0.0)
    rl.reset("a")
    assert rl.check("a", 1, 10, 1.0) is None
    rl.reset()
    assert len(rl) == 0


@pytest.mark.parametrize(
    ("max_requests", "window"), [(0, 1), (-1, 1), (True, 1), (1, 0), (1, -1), (1, float("inf"))]
)
def test_bad_limits_raise(max_requests: int, window: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter().check("k", max_requests, window, 0.0)
