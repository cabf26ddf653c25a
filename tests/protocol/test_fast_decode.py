"""The hand-written decoders of the streaming frames (data, sse_raw, sse_event,
sse_events) accept exactly what the general schema walk accepts, and build the same
messages; whatever they do not take goes the general way, which names the problem. The
hand-written encoder of data and sse_raw writes msgpack's own bytes."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carapace.protocol import framing
from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import encode

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2**64 - 1), st.binary(max_size=8),
    st.sampled_from(["", "a", "a\nb", "a\rb", "a\x00b", "é", "data: x\n\n"]),
    st.sampled_from([b"data: x\n\n", b"x\n\n", b"x\r\n\n", b"\n\n"]),
    st.lists(st.one_of(st.none(), st.integers(-1, 5), st.text(max_size=3)), max_size=5),
    st.just([[None, "d", "1", None], ["e", None, None, 0]]),
    st.just([["e\n", "d", "1", None]]),
    st.just([]),
)
KEYS = ["id", "data", "events", "event", "sse_id", "retry", "extra"]


@st.composite
def maps(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["data", "sse_raw", "sse_event", "sse_events"]))
    obj: dict[str, Any] = {"t": kind}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5)):
        obj[key] = draw(ANY_VALUE)
    if draw(st.booleans()):
        obj["id"] = draw(st.sampled_from([1, 7, 0, -1, 2**63, True]))
    return obj


def general(obj: dict[str, Any]) -> m.Message | str:
    try:
        return m.message_from_map(obj)
    except ProtocolError as exc:
        return f"error: {exc}"


def quick(obj: dict[str, Any]) -> m.Message | str:
    try:
        return framing.message_from_obj(obj)
    except ProtocolError as exc:
        return f"error: {exc}"


# Generation is cheap but the first draws can be slow on a loaded CI machine: the
# property is what matters here, not how fast examples come.
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps())
def test_the_fast_way_agrees_with_the_general_way(obj: dict[str, Any]) -> None:
    assert quick(obj) == general(obj)


def test_valid_streaming_frames_take_the_fast_way() -> None:
    objs = [
        {"t": "data", "id": 3, "data": b"x"},
        {"t": "sse_raw", "id": 3, "data": b"data: x\n\n", "events": 1},
        {"t": "sse_event", "id": 3, "data": "x", "sse_id": "1"},
        {"t": "sse_events", "id": 3, "events": [[None, "x", "1", None], ["e", None, None, 5]]},
    ]
    for obj in objs:
        msg = framing._FAST_PATHS[obj["t"]](obj)
        assert msg is not None and msg == general(obj)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 300_000])
@pytest.mark.parametrize("rid", [1, 127, 128, 65536, 2**63 - 1])
def test_bulk_frames_are_written_by_hand_as_msgpack_writes_them(size: int, rid: int) -> None:
    for msg in (m.Data(rid, b"x" * size), m.SseRaw(rid, b"y" * size + b"\n\n", size)):
        payload = msgpack.packb(m.message_to_map(msg), use_bin_type=True)
        assert encode(msg) == struct.pack(">I", len(payload)) + payload
