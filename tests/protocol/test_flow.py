"""Credit windows: costs, spending, overdraw by one frame, batched credit, the abuse limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.flow import (
    DEFAULT_WINDOW,
    FRAME_OVERHEAD,
    ReceiveWindow,
    SendWindow,
    StreamFlow,
    flow_cost,
)

# --------------------------------------------------------------------------
# flow_cost


def test_default_window() -> None:
    assert DEFAULT_WINDOW == 256 * 1024
    assert FRAME_OVERHEAD == 16


def test_cost_of_data_and_output() -> None:
    assert flow_cost(m.Data(id=1, data=b"")) == FRAME_OVERHEAD
    assert flow_cost(m.Data(id=1, data=b"x" * 100)) == 100 + FRAME_OVERHEAD
    assert flow_cost(m.Output(id=1, fd=2, data=b"abc")) == 3 + FRAME_OVERHEAD


def test_cost_of_sse_event() -> None:
    assert flow_cost(m.SseEvent(id=1)) == FRAME_OVERHEAD
    ev = m.SseEvent(id=1, event="add", data="hello", sse_id="42", retry=10_000)
    assert flow_cost(ev) == 3 + 5 + 2 + FRAME_OVERHEAD  # retry is not counted


def test_sse_costs_count_utf8_bytes_not_characters() -> None:
    ev = m.SseEvent(id=1, event="é", data="€😀", sse_id="ü")
    assert flow_cost(ev) == 2 + (3 + 4) + 2 + FRAME_OVERHEAD
    assert flow_cost(m.SseComment(id=1, text="€")) == 3 + FRAME_OVERHEAD


def test_a_batch_costs_what_its_events_would_one_frame_each() -> None:
    fields = [("add", "hello", "42", 10_000), (None, None, None, None), ("é", "€😀", "ü", None)]
    batch = m.SseEvents(id=1, events=tuple(fields))
    singles = [m.SseEvent(id=1, event=e, data=d, sse_id=i, retry=r) for e, d, i, r in fields]
    assert flow_cost(batch) == sum(flow_cost(ev) for ev in singles)
    assert flow_cost(batch) == (3 + 5 + 2) + 0 + (2 + 7 + 2) + 3 * FRAME_OVERHEAD


def test_a_whole_answer_costs_what_its_body_would_as_data() -> None:
    whole = m.HttpResponse(id=1, status=200, headers=((b"a", b"b"),), body=b"x" * 99)
    assert flow_cost(whole) == flow_cost(m.Data(id=1, data=b"x" * 99)) == 99 + FRAME_OVERHEAD
    # no body: as a head and an end, which cost nothing
    assert flow_cost(m.HttpResponse(id=1, status=204, headers=(), body=b"")) == 0


def test_cost_of_sse_comment() -> None:
    assert flow_cost(m.SseComment(id=1, text="")) == FRAME_OVERHEAD
    assert flow_cost(m.SseComment(id=1, text=" keepalive")) == 10 + FRAME_OVERHEAD


@pytest.mark.parametrize(
    "msg",
    [
        m.HttpRequest(id=1, tool="t", method="POST", target="/", headers=(), body=b"x" * 99),
        m.HttpHead(id=1, status=200, headers=((b"a", b"b"),), sse=True),
        m.End(id=1),
        m.CliRequest(id=1, tool="t", argv=(b"x",), cwd=b"/", env=(), tty=(False,) * 3),
        m.Exit(id=1, code=0),
        m.Signal(id=1, signum=15),
        m.Cancel(id=1, reason="gone"),
        m.Credit(id=1, amount=1000),
        m.RequestFailed(id=1, status=403, code="denied", message="no"),
        m.Ping(nonce=1),
        m.Pong(nonce=1),
        m.GoAway(reason="bye"),
        m.Ack(received=3),
        m.Hello(versions=(1,), agent="a", nonce=b"n" * 32),
        m.Challenge(version=1, nonce=b"n" * 32, proof=b"p" * 32),
        m.Auth(proof=b"p" * 32),
        m.Welcome(session=b"s", window=1, max_frame=1, server="s"),
        m.Reject(code="auth", message="no"),
    ],
    ids=lambda msg: msg.TYPE,
)
def test_control_frames_are_free(msg: m.Message) -> None:
    assert flow_cost(msg) == 0


# --------------------------------------------------------------------------
# SendWindow


def test_send_window_spends_and_closes() -> None:
    w = SendWindow(100)
    assert w.open and w.credit == 100
    w.spend(60)
    assert w.open and w.credit == 40
    w.spend(40)
    assert not w.open and w.credit == 0


def test_overdraw_by_one_frame() -> None:
    # A frame larger than the remaining credit (even than the window) still goes.
    w = SendWindow(100)
    w.spend(10)
    assert w.open
    w.spend(1000)
    assert w.credit == -910
    assert not w.open
    w.grant(910)
    assert not w.open  # exactly zero: still closed
    w.grant(1)
    assert w.open


def test_grant_must_be_positive() -> None:
    w = SendWindow(100)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            w.grant(bad)
    assert w.credit == 100


def test_default_send_window() -> None:
    assert SendWindow().credit == DEFAULT_WINDOW


# --------------------------------------------------------------------------
# ReceiveWindow


def test_credit_is_batched_at_half_the_window() -> None:
    r = ReceiveWindow(100)
    r.received(120)
    assert r.outstanding == 120
    assert r.consumed(30) == 0
    assert r.consumed(19) == 0
    assert r.consumed(1) == 50  # reaches half: the whole batch goes back
    assert r.outstanding == 70
    assert r.consumed(49) == 0
    assert r.consumed(21) == 70
    assert r.outstanding == 0


def test_one_large_consumption_is_returned_at_once() -> None:
    r = ReceiveWindow(100)
    r.received(500)
    assert r.consumed(500) == 500
    assert r.outstanding == 0


def test_odd_window_half() -> None:
    r = ReceiveWindow(101)
    r.received(101)
    assert r.consumed(50) == 0
    assert r.consumed(1) == 51


def test_over_limit() -> None:
    window = 1000
    r = ReceiveWindow(window)
    limit = 2 * window + 16 * 1024 * 1024
    r.received(limit)
    assert not r.over_limit()
    r.received(1)
    assert r.over_limit()
    r.consumed(limit + 1)
    assert not r.over_limit()


@given(
    st.integers(1, 10_000),
    st.lists(st.integers(0, 5_000), min_size=1, max_size=50),
)
def test_sender_and_receiver_never_deadlock(window: int, sizes: list[int]) -> None:
    """Simulate one stream: a sender that respects credit, a receiver that drains fully.

    Every frame eventually goes; the sender never has more than one window plus
    one frame in flight; the receiver never sees an overdraw.
    """
    send = SendWindow(window)
    recv = ReceiveWindow(window)
    queue = [s + 16 for s in sizes]
    in_flight = 0
    max_cost = max(queue)
    while queue:
        if send.open:
            cost = queue.pop(0)
            send.spend(cost)
            recv.received(cost)
            in_flight += cost
            assert in_flight <= window + max_cost
            assert not recv.over_limit()
            continue
        # Blocked: the consumer drains everything, and credit must come back.
        credit = recv.consumed(in_flight)
        in_flight = 0
        assert credit > 0, "sender blocked and no credit returned: deadlock"
        send.grant(credit)
    # Credit accounting stays exact: what was not yet returned is still owed.
    assert send.credit + recv.outstanding == window


# --------------------------------------------------------------------------
# StreamFlow


def test_stream_flow_spends_and_is_granted() -> None:
    flow = StreamFlow(7, 100)
    assert flow.may_send and flow.credit == 100
    flow.spend(150)  # one frame may overdraw
    assert not flow.may_send and flow.credit == -50
    flow.grant(51)
    assert flow.may_send and flow.credit == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_a_credit_that_is_not_positive_is_the_peers_fault(bad: int) -> None:
    flow = StreamFlow(7, 100)
    with pytest.raises(ProtocolError, match=f"credit of {bad} bytes for request 7"):
        flow.grant(bad)
    assert flow.credit == 100


def test_stream_flow_returns_credit_in_batches() -> None:
    flow = StreamFlow(3, 100)
    data = m.Data(id=3, data=b"x" * 34)  # costs 50: half the window
    flow.received(data)
    assert flow.consumed(flow_cost(data) - 1) is None
    assert flow.consumed(1) == m.Credit(id=3, amount=50)


def test_control_frames_cost_the_receiver_nothing() -> None:
    flow = StreamFlow(3, 1)
    for _ in range(10_000):
        flow.received(m.End(id=3))  # would be far over the limit if it counted


def test_a_peer_that_ignores_flow_control_is_named() -> None:
    flow = StreamFlow(9, 1000, peer="agent")
    big = m.Data(id=9, data=b"x" * (1024 * 1024))
    with pytest.raises(ProtocolError, match="request 9: agent ignored flow control"):
        for _ in range(17):
            flow.received(big)


@given(st.integers(1, 10_000), st.lists(st.integers(0, 5_000), min_size=1, max_size=50))
def test_two_stream_flows_never_deadlock(window: int, sizes: list[int]) -> None:
    """A sender's and a receiver's StreamFlow over one stream: every frame goes, and
    the sender never holds more credit than the window."""
    sender, receiver = StreamFlow(1, window), StreamFlow(1, window)
    queue = [m.Data(id=1, data=b"x" * s) for s in sizes]
    drained = 0
    while queue:
        if sender.may_send:
            msg = queue.pop(0)
            sender.spend(flow_cost(msg))
            receiver.received(msg)
            drained += flow_cost(msg)
            continue
        credit = receiver.consumed(drained)
        drained = 0
        assert credit is not None, "sender blocked and no credit returned: deadlock"
        sender.grant(credit.amount)
    credit = receiver.consumed(drained)
    if credit is not None:
        sender.grant(credit.amount)
    assert sender.credit <= window
