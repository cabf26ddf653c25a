"""A strict receiver (the server) holds the sender to its credit exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.flow import ReceiveWindow, SendWindow, StreamFlow, flow_cost


def test_one_frame_may_overdraw_the_window() -> None:
    r = ReceiveWindow(100, strict=True)
    r.received(60)
    r.received(10_000)  # sent with 40 bytes of credit left: allowed
    assert not r.over_limit()


def test_a_frame_sent_without_credit_is_caught_at_once() -> None:
    r = ReceiveWindow(100, strict=True)
    r.received(100)
    assert not r.over_limit()
    r.received(1)  # the sender had no credit left
    assert r.over_limit()


def test_credit_returned_lets_the_sender_go_on() -> None:
    r = ReceiveWindow(100, strict=True)
    r.received(100)
    assert r.consumed(100) == 100
    r.received(100)
    assert not r.over_limit()


def test_consumed_but_not_yet_returned_still_counts() -> None:
    r = ReceiveWindow(100, strict=True)
    r.received(100)
    assert r.consumed(40) == 0  # below half a window: no credit frame went out
    r.received(1)  # so the sender still had none
    assert r.over_limit()


def test_control_frames_cost_nothing_even_when_strict() -> None:
    flow = StreamFlow(1, 10, strict=True)
    flow.received(m.Data(id=1, data=b"x" * 10))
    for _ in range(1000):
        flow.received(m.End(id=1))
        flow.received(m.Signal(id=1, signum=2))


def test_many_small_frames_past_the_window_are_refused() -> None:
    flow = StreamFlow(5, 1024, peer="agent", strict=True)
    small = m.Data(id=5, data=b"y" * 10)
    with pytest.raises(ProtocolError, match="request 5: agent ignored flow control"):
        for _ in range(1024 // flow_cost(small) + 2):
            flow.received(small)


def test_a_lenient_receiver_keeps_its_slack() -> None:
    flow = StreamFlow(5, 1024)
    for _ in range(100):
        flow.received(m.Data(id=5, data=b"y" * 100))


@given(st.integers(1, 10_000), st.lists(st.integers(0, 5_000), min_size=1, max_size=60),
       st.lists(st.integers(1, 5_000), max_size=60))
def test_a_compliant_sender_is_never_refused(window: int, sizes: list[int],
                                             drains: list[int]) -> None:
    """Credit returned in any batches, and arriving late: a sender that waits for
    positive credit never trips the strict check."""
    send, recv = SendWindow(window), ReceiveWindow(window, strict=True)
    queue = [s + 16 for s in sizes]
    undrained = 0
    in_transit: list[int] = []  # credit frames on their way back
    while queue:
        if send.open:
            cost = queue.pop(0)
            send.spend(cost)
            recv.received(cost)
            undrained += cost
            assert not recv.over_limit()
        elif in_transit:
            send.grant(in_transit.pop(0))
        else:
            step = min(drains.pop(0) if drains else undrained, undrained)
            undrained -= step
            credit = recv.consumed(step)
            if credit:
                in_transit.append(credit)
