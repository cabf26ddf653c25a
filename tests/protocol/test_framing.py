"""Frame codec: length prefix, caps, chunking, and strict rejection of bad frames."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameDecoder,
    decode_payload,
    encode,
    encode_payload,
)
from carapace.protocol.messages import ALL_MESSAGES, Message

from .test_messages import any_message, message_strategy


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def decode_all(stream: bytes, cuts: list[int] | None = None, max_frame: int = DEFAULT_MAX_FRAME
               ) -> list[Message]:
    decoder = FrameDecoder(max_frame)
    out: list[Message] = []
    prev = 0
    for cut in [*(cuts or []), len(stream)]:
        decoder.feed(stream[prev:cut])
        out.extend(decoder)
        prev = cut
    decoder.close()
    return out


PING = m.Ping(nonce=7)


# --------------------------------------------------------------------------
# Encoding and round trips


def test_encode_layout() -> None:
    data = encode(PING)
    payload = encode_payload(PING)
    assert data == struct.pack(">I", len(payload)) + payload
    assert msgpack.unpackb(payload, raw=False) == {"t": "ping", "nonce": 7}
    assert HEADER_SIZE == 4


def test_bytes_travel_as_bin_and_text_as_str() -> None:
    payload = encode_payload(m.Data(id=1, data=b"\xff"))
    assert msgpack.unpackb(payload, raw=True) == {b"t": b"data", b"id": 1, b"data": b"\xff"}
    assert b"\xc4\x01\xff" in payload  # bin 8, not str


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
@settings(max_examples=25)
@given(data=st.data())
def test_every_class_round_trips_through_frames(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    decoder = FrameDecoder()
    decoder.feed(encode(msg))
    assert decoder.next_message() == msg
    assert decoder.last_frame_size == len(encode(msg))
    assert decoder.next_message() is None
    decoder.close()


@settings(max_examples=150)
@given(st.lists(any_message, max_size=8), st.data())
def test_any_chunking_gives_the_same_messages(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(msg) for msg in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    assert decode_all(stream, cuts) == msgs


@given(st.lists(any_message, max_size=4))
def test_one_byte_at_a_time(msgs: list[Message]) -> None:
    stream = b"".join(encode(msg) for msg in msgs)
    assert decode_all(stream, list(range(len(stream)))) == msgs


def test_buffered_and_next_payload() -> None:
    decoder = FrameDecoder()
    data = encode(PING) + encode(m.Pong(nonce=8))
    decoder.feed(data[:-1])
    assert decoder.buffered == len(data) - 1
    assert decoder.next_payload() == encode_payload(PING)
    assert decoder.next_payload() is None
    decoder.feed(data[-1:])
    assert decoder.next_message() == m.Pong(nonce=8)
    assert decoder.buffered == 0


def test_many_frames_keep_the_buffer_small() -> None:
    decoder = FrameDecoder()
    one = encode(m.Data(id=1, data=b"x" * 100))
    for _ in range(2000):
        decoder.feed(one + one[:50])
        assert decoder.next_message() is not None
        decoder.feed(one[50:])
        assert decoder.next_message() is not None
        assert decoder.next_message() is None
    assert decoder.buffered == 0


# --------------------------------------------------------------------------
# Truncation, caps, empty frames


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 5, -1])
def test_close_in_the_middle_of_a_frame_raises(keep: int) -> None:
    data = encode(PING)
    decoder = FrameDecoder()
    decoder.feed(data[:keep])
    assert list(decoder) == []
    with pytest.raises(ProtocolError, match="middle of a frame"):
        decoder.close()


def test_close_after_whole_frames_is_fine() -> None:
    decoder = FrameDecoder()
    decoder.close()
    decoder.feed(encode(PING))
    assert list(decoder) == [PING]
    decoder.close()


def test_length_over_the_cap_is_rejected_on_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(b"\x00\x00")
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        decoder.feed(b"\x00\x65")  # 101, and not one payload byte sent


def test_huge_length_is_rejected_before_any_payload() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"\xff\xff\xff\xff")


def test_oversized_frame_after_a_good_one() -> None:
    # The good frame in front is still delivered, then the bad header is refused
    # by the very next call, without waiting for its payload.
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode(PING) + struct.pack(">I", 101))
    assert decoder.next_message() == PING
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_message()
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode(PING) + b"\x00\x00\x00\x00" + encode(PING))
    with pytest.raises(ProtocolError, match="empty frame"):
        list(decoder)
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode(PING) + struct.pack(">I", 101)[:3])
    assert decoder.next_message() == PING
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"\x65")


def test_frame_at_the_cap_is_accepted() -> None:
    msg = m.Data(id=1, data=b"x" * 200)
    size = len(encode_payload(msg))
    assert decode_all(encode(msg), max_frame=size) == [msg]
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_all(encode(msg), max_frame=size - 1)


def test_zero_length_frame() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="empty frame"):
        decoder.feed(b"\x00\x00\x00\x00")


# --------------------------------------------------------------------------
# Bad payloads


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x82\xa1t",  # map of 2, cut short
        b"\xdb\xff\xff\xff\xff",  # str 32 claiming 4 GiB
        b"\xd4\xff",  # fixext 1 cut short
        b"\xd6\xff\x00\x00",  # timestamp ext cut short
    ],
)
def test_malformed_msgpack(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        decode_all(frame(payload))


def test_two_objects_in_one_frame() -> None:
    with pytest.raises(ProtocolError, match="more than one msgpack object"):
        decode_all(frame(encode_payload(PING) + pack(1)))
    with pytest.raises(ProtocolError, match="more than one"):
        decode_all(frame(encode_payload(PING) + encode_payload(PING)))


@pytest.mark.parametrize("obj", [[1, 2], 5, "ping", b"ping", None, 1.0])
def test_non_map_payload(obj: Any) -> None:
    with pytest.raises(ProtocolError, match="must hold a map"):
        decode_all(frame(pack(obj)))


def test_ext_types_are_not_values() -> None:
    ext = msgpack.ExtType(5, b"abc")
    with pytest.raises(ProtocolError):
        decode_all(frame(pack({"t": "ping", "nonce": ext})))
    # A msgpack timestamp (ext -1) is not an int either.
    with pytest.raises(ProtocolError):
        decode_all(frame(pack({"t": "ping", "nonce": msgpack.Timestamp(1, 0)})))


def test_deep_nesting() -> None:
    payload = b"\x91" * 100_000 + b"\x01"
    with pytest.raises(ProtocolError):
        decode_all(frame(payload))


def test_invalid_utf8_str_in_frame() -> None:
    payload = b"\x82" + pack("t") + pack("goaway") + pack("reason") + b"\xa1\xff"
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        decode_all(frame(payload))


def test_decode_payload_directly() -> None:
    assert decode_payload(encode_payload(PING)) == PING
    with pytest.raises(ProtocolError):
        decode_payload(b"")


# --------------------------------------------------------------------------
# Fuzz: nothing but ProtocolError, ever.


def _feed_everything(stream: bytes, cuts: list[int], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    prev = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[prev:cut])
        for msg in decoder:
            assert isinstance(msg, Message)
        prev = cut
    decoder.close()


@settings(max_examples=300)
@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=6),
    st.sampled_from([16, 1000, DEFAULT_MAX_FRAME]),
)
def test_random_bytes_raise_only_protocol_error(
    stream: bytes, cuts: list[int], max_frame: int
) -> None:
    try:
        _feed_everything(stream, sorted(c for c in cuts if c <= len(stream)), max_frame)
    except ProtocolError:
        pass


@st.composite
def mangled_frames(draw: st.DrawFn) -> bytes:
    """Valid frames with a few bytes flipped, inserted or removed: deeper fuzzing."""
    msgs = draw(st.lists(any_message, min_size=1, max_size=3))
    payloads = [bytearray(encode_payload(msg)) for msg in msgs]
    for payload in payloads:
        for _ in range(draw(st.integers(0, 3))):
            i = draw(st.integers(0, len(payload) - 1))
            action = draw(st.sampled_from(["flip", "insert", "delete"]))
            if action == "flip":
                payload[i] = draw(st.integers(0, 255))
            elif action == "insert":
                payload.insert(i, draw(st.integers(0, 255)))
            elif len(payload) > 1:
                del payload[i]
    return b"".join(frame(bytes(p)) for p in payloads)


@settings(max_examples=300)
@given(mangled_frames())
def test_mangled_frames_raise_only_protocol_error(stream: bytes) -> None:
    try:
        _feed_everything(stream, [], DEFAULT_MAX_FRAME)
    except ProtocolError:
        pass
