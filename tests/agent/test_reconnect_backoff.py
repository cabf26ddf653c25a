"""The agent's reconnect backoff: jittered, doubling, capped lower while nothing listens;
and a failure that repeats is logged once per interval, not once per attempt."""

from __future__ import annotations

from carapace.agent.tunnel import (
    DEFAULT_BACKOFF_MAX,
    DEFAULT_BACKOFF_MAX_REFUSED,
    LinkConfig,
    RepeatLog,
    _Outcome,
    next_backoff,
)
from carapace.runtime.addresses import TcpAddress

CONFIG = LinkConfig(server=TcpAddress("127.0.0.1", 1), agent="vm1", token=b"t" * 32)


def delays(outcome: _Outcome, attempts: int, start: float = 0.2) -> list[tuple[float, float]]:
    out, delay = [], start
    for _ in range(attempts):
        sleep, delay = next_backoff(delay, outcome, CONFIG)
        out.append((sleep, delay))
    return out


def test_refused_retries_stay_within_the_refused_cap() -> None:
    # The server is restarting: keep dialling every 1-2 s, never 10.
    steps = delays(_Outcome("refused", resumable=False, refused=True), 12)
    assert all(sleep <= DEFAULT_BACKOFF_MAX_REFUSED for sleep, _ in steps)
    assert steps[-1][1] == DEFAULT_BACKOFF_MAX_REFUSED
    assert min(sleep for sleep, _ in steps[-3:]) >= DEFAULT_BACKOFF_MAX_REFUSED / 2


def test_other_failures_double_up_to_the_full_cap() -> None:
    # A timeout or a connection closed by a server cap may mean load: spread out.
    steps = delays(_Outcome("handshake timed out"), 12)
    assert [d for _, d in steps[:3]] == [0.4, 0.8, 1.6]
    assert steps[-1][1] == DEFAULT_BACKOFF_MAX
    assert all(d / 2 <= s <= d for (s, _), d in zip(steps, [0.2] + [d for _, d in steps],
                                                      strict=False))


def test_a_refusal_after_long_waits_drops_to_the_refused_cap() -> None:
    sleep, delay = next_backoff(DEFAULT_BACKOFF_MAX, _Outcome("x", refused=True), CONFIG)
    assert sleep <= DEFAULT_BACKOFF_MAX_REFUSED and delay == DEFAULT_BACKOFF_MAX_REFUSED


def test_a_repeated_failure_is_logged_once_per_interval_with_a_count() -> None:
    log = RepeatLog(interval=60.0)
    assert log.allow("cannot connect: refused", 0.0) == "cannot connect: refused"
    assert [log.allow("cannot connect: refused", t) for t in (1.0, 2.0, 3.0)] == [None] * 3
    assert log.allow("cannot connect: refused", 61.0) == (
        "cannot connect: refused (3 more attempt(s) failed the same way meanwhile)")
    # Another reason is news, logged at once; so is any failure after a session.
    assert log.allow("cannot connect: timed out", 62.0) == "cannot connect: timed out"
    log.reset()
    assert log.allow("cannot connect: timed out", 63.0) == "cannot connect: timed out"
