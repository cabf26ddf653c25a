"""Session bookkeeping: numbered frames kept until acknowledged, replayed exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import FrameDecoder, FrameTooLarge, encode
from carapace.protocol.messages import Ack, Data, GoAway, Message, Ping, Pong
from carapace.protocol.resume import ReplayOverflow, SessionLedger, is_numbered


def test_link_level_frames_are_not_numbered() -> None:
    assert not is_numbered(Ping(nonce=1))
    assert not is_numbered(Pong(nonce=1))
    assert not is_numbered(Ack(received=1))
    assert is_numbered(Data(id=1, data=b""))
    assert is_numbered(GoAway(reason="bye"))


def test_outgoing_encodes_and_keeps_only_numbered_frames() -> None:
    ledger = SessionLedger()
    data = Data(id=1, data=b"x")
    assert ledger.outgoing(data) == encode(data)
    assert ledger.outgoing(Ping(nonce=1)) == encode(Ping(nonce=1))
    assert ledger.replay.sent == 1
    assert ledger.replay_after(0) == [encode(data)]


def test_acknowledged_frames_are_not_replayed() -> None:
    ledger = SessionLedger()
    frames = [ledger.outgoing(Data(id=1, data=bytes([i]))) for i in range(5)]
    ledger.on_ack(Ack(received=2))
    assert ledger.replay_after(3) == frames[3:]
    assert ledger.replay.buffered_bytes == sum(len(f) for f in frames[3:])


def test_an_impossible_ack_is_the_peers_fault() -> None:
    ledger = SessionLedger()
    ledger.outgoing(Data(id=1, data=b""))
    with pytest.raises(ProtocolError):
        ledger.on_ack(Ack(received=2))  # more than was sent
    ledger.on_ack(Ack(received=1))
    with pytest.raises(ProtocolError):
        ledger.on_ack(Ack(received=0))  # going back


def test_an_impossible_resume_point_is_a_value_error() -> None:
    ledger = SessionLedger()
    ledger.outgoing(Data(id=1, data=b""))
    with pytest.raises(ValueError):
        ledger.replay_after(5)


def test_overflow_means_the_session_cannot_be_resumed() -> None:
    frame_size = len(encode(Data(id=1, data=b"x" * 100)))
    ledger = SessionLedger(replay_limit=2 * frame_size)
    ledger.outgoing(Data(id=1, data=b"x" * 100))
    ledger.outgoing(Data(id=1, data=b"x" * 100))
    with pytest.raises(ReplayOverflow):
        ledger.outgoing(Data(id=1, data=b"x" * 100))
    ledger.outgoing(Pong(nonce=1))  # link-level frames are never kept, so they still go


def test_a_frame_over_the_peers_cap_is_refused_and_not_kept() -> None:
    ledger = SessionLedger(max_frame=100, peer="server")
    ledger.outgoing(Data(id=1, data=b"x" * 50))
    with pytest.raises(FrameTooLarge, match="the server's 100-byte frame limit"):
        ledger.outgoing(Data(id=1, data=b"x" * 200))
    assert ledger.replay.sent == 1


def test_ack_is_due_every_64_frames_and_with_every_ping() -> None:
    ledger = SessionLedger()
    assert ledger.ack() is None  # nothing received yet: nothing to say
    for _ in range(63):
        ledger.incoming(Data(id=1, data=b""))
        assert ledger.ack_due() is None
    ledger.incoming(Ping(nonce=1))  # not numbered: does not count
    assert ledger.ack_due() is None
    ledger.incoming(Data(id=1, data=b""))
    assert ledger.ack_due() == Ack(received=64)
    assert ledger.ack_due() is None
    ledger.incoming(Data(id=1, data=b""))
    assert ledger.ack() == Ack(received=65)
    assert ledger.received == 65


@given(st.lists(st.one_of(st.integers(0, 3), st.just(-1)), max_size=120))
def test_across_link_drops_every_frame_arrives_once_in_order(script: list[int]) -> None:
    """A sender and a receiver; the link drops at random (-1), losing what was in
    flight; each reconnect replays from what the receiver reports. The receiver sees
    every numbered frame exactly once, in order."""
    sender, receiver = SessionLedger(), SessionLedger()
    in_flight: list[bytes] = []
    delivered: list[Message] = []
    next_n = 0

    def arrive(frames: list[bytes]) -> None:
        decoder = FrameDecoder()
        decoder.feed(b"".join(frames))
        for msg in decoder:
            receiver.incoming(msg)
            delivered.append(msg)
            ack = receiver.ack_due()
            if ack is not None:
                sender.on_ack(ack)

    for step in script:
        if step == -1:  # the link drops: in-flight frames are lost; a new link resumes
            in_flight.clear()
            in_flight.extend(sender.replay_after(receiver.received))
            continue
        for _ in range(step):
            in_flight.append(sender.outgoing(Data(id=1, data=str(next_n).encode())))
            next_n += 1
        if step:
            in_flight.append(sender.outgoing(Ping(nonce=next_n)))  # never replayed
        arrive(in_flight[:1])
        del in_flight[:1]
    arrive(in_flight)
    arrive(sender.replay_after(receiver.received))
    numbered = [m for m in delivered if isinstance(m, Data)]
    assert [int(m.data) for m in numbered] == list(range(next_n))
