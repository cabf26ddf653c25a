"""The message schema: every class round-trips, and the decoder rejects every malformed map."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import decode_payload, encode_payload
from carapace.protocol.messages import (
    ALL_MESSAGES,
    BY_TYPE,
    HANDSHAKE_MESSAGES,
    MAX_REQUEST_ID,
    Message,
    RequestMessage,
    message_from_map,
    message_to_map,
)

INT_MIN = -(2**63)
UINT_MAX = 2**64 - 1


# --------------------------------------------------------------------------
# Strategies built from the dataclass annotations.


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(INT_MIN, UINT_MAX)  # what msgpack can carry
    if annotation is str:
        return st.text(max_size=20)
    if annotation is bytes:
        return st.binary(max_size=20)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
    if origin is tuple:
        return st.tuples(*(strategy_for(a) for a in args))
    raise AssertionError(f"no strategy for {annotation!r}")


_single_line = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=20
)

# Fields whose valid values are narrower than their annotation (see _VALUE_RULES).
OVERRIDES: dict[tuple[type[Message], str], st.SearchStrategy[Any]] = {
    (m.CliRequest, "tty"): st.tuples(st.booleans(), st.booleans(), st.booleans()),
    (m.Output, "fd"): st.sampled_from([1, 2]),
    (m.Credit, "amount"): st.integers(1, UINT_MAX),
    (m.SseEvent, "retry"): st.none() | st.integers(0, UINT_MAX),
    (m.SseEvent, "event"): st.none() | _single_line,
    (m.SseEvent, "sse_id"): st.none() | _single_line.map(lambda s: s.replace("\x00", "")),
    (m.SseComment, "text"): _single_line,
    (m.SseEvents, "events"): st.lists(
        st.tuples(st.none() | _single_line, st.none() | st.text(max_size=20),
                  st.none() | _single_line.map(lambda s: s.replace("\x00", "")),
                  st.none() | st.integers(0, UINT_MAX)),
        min_size=1, max_size=4,
    ).map(tuple),
    (m.SseRaw, "data"): st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"") + b"\n\n"),
    (m.SseRaw, "events"): st.integers(0, UINT_MAX),
}


def hints_of(cls: type[Message]) -> dict[str, Any]:
    """The evaluated annotations of ``cls`` (typing names live only under TYPE_CHECKING)."""
    return typing.get_type_hints(cls, localns={"ClassVar": typing.ClassVar})


def fields_of(cls: type[Message]) -> list[tuple[str, Any, bool]]:
    """(name, annotation, required) for each field of ``cls``."""
    hints = hints_of(cls)
    return [(name, hints[name], required) for name, _, required in m.message_fields(cls)]


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for name, annotation, _ in fields_of(cls):
        if name == "id" and issubclass(cls, RequestMessage):
            kwargs[name] = st.integers(1, MAX_REQUEST_ID)
        else:
            kwargs[name] = OVERRIDES.get((cls, name), strategy_for(annotation))
    return st.builds(cls, **kwargs)


any_message = st.one_of(*(message_strategy(cls) for cls in ALL_MESSAGES))


# --------------------------------------------------------------------------
# A minimal valid wire map per class, to mutate one field at a time.


def valid_value(annotation: Any) -> Any:
    simple = {bool: True, int: 1, str: "s", bytes: b"b"}
    if annotation in simple:
        return simple[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return valid_value(next(a for a in args if a is not type(None)))
    if origin is tuple and args[1:] == (Ellipsis,):
        return [valid_value(args[0])]
    if origin is tuple:
        return [valid_value(a) for a in args]
    raise AssertionError(annotation)


VALID_OVERRIDES: dict[tuple[type[Message], str], Any] = {
    (m.CliRequest, "tty"): [False, True, False],
    (m.SseRaw, "data"): b"data: b\n\n",
}


def base_map(cls: type[Message]) -> dict[str, Any]:
    out: dict[str, Any] = {"t": cls.TYPE}
    for name, annotation, _ in fields_of(cls):
        out[name] = VALID_OVERRIDES.get((cls, name), valid_value(annotation))
    return out


def wrong_values(annotation: Any, required: bool) -> list[Any]:
    """Values of the wrong wire type for ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in args if a is not type(None))
        return wrong_values(inner, required=False)
    out: list[Any] = [None] if required else []
    if annotation is int:
        out += [True, False, "1", b"1", 1.0, [1], {"a": 1}]
    elif annotation is str:
        out += [b"s", 1, True, ["s"], 1.5]
    elif annotation is bytes:
        out += ["b", 1, False, [1], [b"b"]]
    elif annotation is bool:
        out += [1, 0, "true", b"\x01", [True]]
    elif origin is tuple and args[1:] == (Ellipsis,):
        out += ["x", b"x", 1, {"a": 1}]
        out += [[w] for w in wrong_values(args[0], required=True)]
    elif origin is tuple:
        good = [valid_value(a) for a in args]
        out += ["x", b"x", 1, {"a": 1}, [], good[:-1], [*good, good[0]]]
        for i, a in enumerate(args):
            for w in wrong_values(a, required=True)[:3]:
                out.append([*good[:i], w, *good[i + 1 :]])
    else:
        raise AssertionError(annotation)
    return out


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


MUTATIONS = [
    (cls, name, value)
    for cls in ALL_MESSAGES
    for name, annotation, required in fields_of(cls)
    for value in wrong_values(annotation, required)
]


# --------------------------------------------------------------------------
# Round trips


def test_catalogue_is_consistent() -> None:
    assert len(BY_TYPE) == len(ALL_MESSAGES)
    assert HANDSHAKE_MESSAGES <= set(ALL_MESSAGES)
    for cls in ALL_MESSAGES:
        assert BY_TYPE[cls.TYPE] is cls
        assert "__dict__" not in dir(cls)  # slotted: no per-message dict


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_messages_are_frozen_and_compare_by_value(cls: type[Message]) -> None:
    msg = decode_payload(pack(base_map(cls)))
    twin = decode_payload(pack(base_map(cls)))
    assert msg == twin and hash(msg) == hash(twin)
    assert repr(msg).startswith(cls.__name__ + "(")
    name = m.message_fields(cls)[0][0]
    with pytest.raises(AttributeError):
        setattr(msg, name, getattr(msg, name))
    assert m.replace(msg) == msg
    with pytest.raises(TypeError):
        m.replace(msg, no_such_field=1)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_every_message_class(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    payload = encode_payload(msg)
    assert decode_payload(payload) == msg
    assert message_from_map(msgpack.unpackb(payload, raw=False)) == msg


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_base_map_is_valid(cls: type[Message]) -> None:
    msg = decode_payload(pack(base_map(cls)))
    assert type(msg) is cls
    # Arrays come back as tuples; packing the map again gives the same bytes.
    assert pack(message_to_map(msg)) == pack(base_map(cls))


def test_to_map_has_type_and_every_field() -> None:
    msg = m.SseEvent(id=3, data="x")
    assert message_to_map(msg) == {
        "t": "sse_event",
        "id": 3,
        "event": None,
        "data": "x",
        "sse_id": None,
        "retry": None,
    }


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_optional_fields_may_be_absent_or_nil(cls: type[Message]) -> None:
    full = base_map(cls)
    optional = [name for name, _, required in fields_of(cls) if not required]
    absent = {k: v for k, v in full.items() if k not in optional}
    msg = decode_payload(pack(absent))
    defaults = cls._DEFAULTS  # type: ignore[attr-defined]
    for name in optional:
        assert getattr(msg, name) == defaults[name]
    hints = hints_of(cls)
    nil_ok = {
        n: None
        for n in optional
        if type(None) in typing.get_args(hints[n])
    }
    msg = decode_payload(pack({**full, **nil_ok}))
    for name in nil_ok:
        assert getattr(msg, name) is None


def test_decoded_sequences_are_tuples() -> None:
    msg = decode_payload(
        pack({"t": "http_request", "id": 1, "tool": "t", "method": "GET", "target": "/",
              "headers": [[b"a", b"b"], [b"c", b"d"]], "body": b""})
    )
    assert isinstance(msg, m.HttpRequest)
    assert msg.headers == ((b"a", b"b"), (b"c", b"d"))
    assert all(type(h) is tuple for h in msg.headers)
    hash(msg)  # frozen and made of tuples: hashable


# --------------------------------------------------------------------------
# Rejections


def test_unknown_type() -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_payload(pack({"t": "nope"}))
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_payload(pack({"t": "x" * 10_000}))


@pytest.mark.parametrize("bad", [{}, {"t": 1}, {"t": b"ping"}, {"t": None}, {"type": "ping"}])
def test_missing_or_mistyped_type_key(bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="message type"):
        decode_payload(pack(bad))


@pytest.mark.parametrize("bad", [[1, 2], 5, "ping", b"ping", None, True, 1.5])
def test_non_map_payload(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="must hold a map"):
        decode_payload(pack(bad))


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in ALL_MESSAGES for name, _, required in fields_of(cls) if required],
)
def test_missing_field(cls: type[Message], name: str) -> None:
    bad = base_map(cls)
    del bad[name]
    with pytest.raises(ProtocolError, match=f"missing field '{name}'"):
        decode_payload(pack(bad))


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_unknown_extra_field(cls: type[Message]) -> None:
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_payload(pack({**base_map(cls), "extra": 1}))
    # An unknown key in place of a missing optional one (same key count).
    optional = [name for name, _, required in fields_of(cls) if not required]
    if optional:
        bad = base_map(cls)
        del bad[optional[0]]
        bad["zz"] = None
        with pytest.raises(ProtocolError, match="unknown field"):
            decode_payload(pack(bad))


def test_binary_key_is_not_a_field_name() -> None:
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_payload(pack({"t": "ping", "nonce": 1, b"nonce": 2}))
    with pytest.raises(ProtocolError):
        decode_payload(pack({"t": "ping", b"nonce": 1}))


def test_non_string_key_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode_payload(pack({"t": "ping", "nonce": 1, 5: 1}))
    with pytest.raises(ProtocolError):
        message_from_map({"t": "ping", "nonce": 1, 5: 1})


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    MUTATIONS,
    ids=[f"{c.TYPE}.{n}={v!r}"[:60] for c, n, v in MUTATIONS],
)
def test_wrong_type(cls: type[Message], name: str, value: Any) -> None:
    bad = {**base_map(cls), name: value}
    with pytest.raises(ProtocolError, match=rf"{cls.TYPE}\.{name}"):
        decode_payload(pack(bad))


@pytest.mark.parametrize("cls", [c for c in ALL_MESSAGES if issubclass(c, RequestMessage)])
@pytest.mark.parametrize("rid", [0, -1, INT_MIN, MAX_REQUEST_ID + 1, UINT_MAX])
def test_request_id_out_of_range(cls: type[Message], rid: int) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        decode_payload(pack({**base_map(cls), "id": rid}))


def test_request_id_bounds_accepted() -> None:
    for rid in (1, MAX_REQUEST_ID):
        assert decode_payload(pack({"t": "end", "id": rid})) == m.End(id=rid)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (m.CliRequest, "tty", []),
        (m.CliRequest, "tty", [True, True]),
        (m.CliRequest, "tty", [True, True, True, True]),
        (m.Output, "fd", 0),
        (m.Output, "fd", 3),
        (m.Output, "fd", -1),
        (m.Credit, "amount", 0),
        (m.Credit, "amount", -5),
        (m.SseEvent, "retry", -1),
        (m.SseEvent, "event", "a\nb"),
        (m.SseEvent, "event", "a\r"),
        (m.SseEvent, "sse_id", "1\n"),
        (m.SseEvent, "sse_id", "1\x00"),
        (m.SseComment, "text", "a\nb"),
        (m.SseComment, "text", "\r"),
        (m.SseEvents, "events", []),
        (m.SseEvents, "events", [["e", "d", "1", -1]]),
        (m.SseEvents, "events", [["e", "d", "1", None], ["a\nb", "d", "2", None]]),
        (m.SseEvents, "events", [["e", "d", "1\r", None]]),
        (m.SseEvents, "events", [["e", "d", "1\x00", None]]),
        (m.SseEvents, "events", [["e", "d", "1"]]),
        (m.SseEvents, "events", [["e", b"d", "1", None]]),
        (m.SseRaw, "events", -1),
        (m.SseRaw, "data", b"data: x\n"),
        (m.SseRaw, "data", b""),
        (m.SseRaw, "data", b"data: x\r\n\n"),
    ],
)
def test_value_rules(cls: type[Message], field: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=rf"{cls.TYPE}\.{field}"):
        decode_payload(pack({**base_map(cls), field: value}))


def test_value_rules_accept_the_edges() -> None:
    assert decode_payload(pack({**base_map(m.Output), "fd": 2})) == m.Output(id=1, fd=2, data=b"b")
    assert decode_payload(pack({"t": "credit", "id": 1, "amount": 1})) == m.Credit(1, 1)
    ev = decode_payload(pack({"t": "sse_event", "id": 1, "retry": 0, "event": "", "sse_id": ""}))
    assert ev == m.SseEvent(id=1, retry=0, event="", sse_id="")
    assert decode_payload(pack({"t": "sse_comment", "id": 1, "text": ""})) == m.SseComment(1, "")


def test_invalid_utf8_in_string_value() -> None:
    raw = b"\x82" + pack("t") + pack("goaway") + pack("reason") + b"\xa2\xff\xfe"
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        decode_payload(raw)


def test_invalid_utf8_in_key() -> None:
    raw = b"\x82" + pack("t") + pack("goaway") + b"\xa2\xc3\x28" + pack("x")
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        decode_payload(raw)


def test_surrogate_in_string_is_rejected() -> None:
    # CESU-style encoded surrogate: valid-looking bytes, but not UTF-8.
    raw = b"\x82" + pack("t") + pack("goaway") + pack("reason") + b"\xa3\xed\xa0\x80"
    with pytest.raises(ProtocolError):
        decode_payload(raw)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(INT_MIN, UINT_MAX) | st.floats()
        | st.text(max_size=5) | st.binary(max_size=5),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["t", "id", "data"]), inner,
                          max_size=4),
        max_leaves=12,
    ),
    st.sampled_from(sorted(BY_TYPE)),
)
def test_arbitrary_maps_raise_only_protocol_error(obj: Any, kind: str) -> None:
    for candidate in (obj, {**obj, "t": kind} if isinstance(obj, dict) else obj):
        try:
            msg = decode_payload(pack(candidate))
        except ProtocolError:
            continue
        assert isinstance(msg, Message)
        assert decode_payload(encode_payload(msg)) == msg
