"""SseParser and serialize: every WHATWG rule, chunking invariance, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol.errors import ProtocolError
from carapace.protocol.sse import (
    MAX_RETRY,
    Comment,
    Event,
    SseParser,
    serialize,
)

BOM = b"\xef\xbb\xbf"
Item = Event | Comment


def parse(stream: bytes, chunks: list[int] | None = None) -> list[Item]:
    """Feed ``stream`` split at ``chunks`` (sorted offsets), then close."""
    parser = SseParser()
    out: list[Item] = []
    prev = 0
    for cut in [*(chunks or []), len(stream)]:
        out += parser.feed(stream[prev:cut])
        prev = cut
    out += parser.close()
    return out


def parse_bytewise(stream: bytes) -> list[Item]:
    parser = SseParser()
    out: list[Item] = []
    for i in range(len(stream)):
        out += parser.feed(stream[i : i + 1])
    out += parser.close()
    return out


def reference_parse(stream: bytes) -> list[Item]:
    """A literal, character-at-a-time reading of the spec, to check the fast parser against."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\r":
            lines.append("".join(current))
            current = []
            if i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
        elif ch == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    final = "".join(current) if current else None  # a last line with no line end

    out: list[Item] = []
    event: str | None = None
    data: str | None = None
    id_: str | None = None
    retry: int | None = None
    seen = False

    def field(name: str, value: str) -> None:
        nonlocal event, data, id_, retry, seen
        if name == "event":
            event, seen = value, True
        elif name == "data":
            data = (data or "") + value + "\n"
            seen = True
        elif name == "id":
            if "\0" not in value:
                id_, seen = value, True
        elif name == "retry":
            if value and all(c in "0123456789" for c in value):
                retry, seen = min(int(value), MAX_RETRY), True

    for line in [*lines, *([final] if final is not None else [])]:
        if line == "":
            if seen:
                out.append(Event(event, None if data is None else data[:-1], id_, retry))
            event = data = id_ = None
            retry = None
            seen = False
        elif line.startswith(":"):
            out.append(Comment(line[1:]))
        elif ":" in line:
            name, value = line.split(":", 1)
            field(name, value[1:] if value.startswith(" ") else value)
        else:
            field(line, "")
    return out


# --------------------------------------------------------------------------
# Line ends


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_end_style(eol: bytes) -> None:
    stream = eol.join([b"event: greet", b"data: hello", b"data: world", b"", b"data: 2", b"", b""])
    assert parse(stream) == [
        Event(event="greet", data="hello\nworld"),
        Event(data="2"),
    ]


def test_mixed_line_ends_in_one_stream() -> None:
    stream = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r"
    assert parse(stream) == [Event(data="a\nb\nc"), Event(data="d")]


def test_cr_lf_split_across_feeds_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    # The CR already ended the line; the LF must not count as a blank line.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [Event(data="x")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: y\n\n") == [Event(data="y")]


def test_blank_cr_line_dispatches_at_once_without_waiting_for_lf() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r\r") == [Event(data="x")]
    assert not parser.pending
    assert parser.feed(b"\ndata: y\r\n\r\n") == [Event(data="y")]


def test_cr_then_cr_across_feeds_is_two_line_ends() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\r") == [Event(data="x")]


def test_lf_after_cr_is_skipped_only_once() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\n") == [Event(data="x")]


def test_event_is_returned_by_the_feed_that_completes_it() -> None:
    parser = SseParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.pending
    assert parser.feed(b"\ndata: tw") == [Event(data="one")]
    assert parser.pending
    assert parser.feed(b"o\n\n") == [Event(data="two")]
    assert not parser.pending


# --------------------------------------------------------------------------
# BOM and decoding


def test_leading_bom_is_stripped() -> None:
    assert parse(BOM + b"data: x\n\n") == [Event(data="x")]


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_leading_bom_split_across_feeds(cut: int) -> None:
    stream = BOM + b"data: x\n\n"
    assert parse(stream, [cut]) == [Event(data="x")]
    assert parse(stream, [1, 2]) == [Event(data="x")]
    assert parse_bytewise(stream) == [Event(data="x")]


def test_only_one_bom_and_only_at_the_start() -> None:
    # A second BOM is part of the first line's field name, which is then unknown.
    assert parse(BOM + BOM + b"data: x\n\n") == []
    assert parse(b"data: x\n\n" + BOM + b"data: y\n\n") == [Event(data="x")]
    assert parse(b"data: \xef\xbb\xbf\n\n") == [Event(data="\ufeff")]


def test_bom_prefix_that_is_not_a_bom() -> None:
    assert parse(b"\xef\xbbdata: x\n\n", [1]) == []  # garbage name, then a blank line
    assert parse(b"\xef\n:c\n", [1]) == [Comment("c")]
    assert parse(b"\xef\xbb") == []
    parser = SseParser()
    assert parser.feed(b"\xef") == []
    assert parser.pending
    assert parser.close() == []


def test_multibyte_character_split_across_feeds() -> None:
    stream = "data: é€😀\n\n".encode()
    expected = [Event(data="é€😀")]
    for cut in range(len(stream)):
        assert parse(stream, [cut]) == expected
    assert parse_bytewise(stream) == expected


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert parse(b"data: a\xffb\n\n") == [Event(data="a\ufffdb")]
    assert parse(b"data: \xe2\x82\n\n") == [Event(data="\ufffd")]  # truncated sequence
    assert parse(b":\xc3\n") == [Comment("\ufffd")]


# --------------------------------------------------------------------------
# Fields


def test_data_lines_join_with_lf() -> None:
    assert parse(b"data: a\ndata: b\ndata: c\n\n") == [Event(data="a\nb\nc")]


def test_empty_data_line() -> None:
    assert parse(b"data\n\n") == [Event(data="")]
    assert parse(b"data:\n\n") == [Event(data="")]
    assert parse(b"data: \n\n") == [Event(data="")]
    assert parse(b"data\ndata\n\n") == [Event(data="\n")]
    assert parse(b"data: a\ndata\n\n") == [Event(data="a\n")]


def test_only_one_leading_space_is_removed() -> None:
    assert parse(b"data:  two\n\n") == [Event(data=" two")]
    assert parse(b"data:x\n\n") == [Event(data="x")]
    assert parse(b"data:\tx\n\n") == [Event(data="\tx")]
    assert parse(b"data: a: b\n\n") == [Event(data="a: b")]


def test_event_id_retry() -> None:
    assert parse(b"event: add\nid: 7\nretry: 1500\ndata: x\n\n") == [
        Event(event="add", data="x", id="7", retry=1500)
    ]


def test_last_value_of_repeated_fields_wins() -> None:
    stream = b"event: a\nevent: b\nid: 1\nid: 2\nretry: 5\nretry: 6\n\n"
    assert parse(stream) == [Event(event="b", id="2", retry=6)]


def test_fields_do_not_leak_into_the_next_block() -> None:
    stream = b"event: a\nid: 1\nretry: 9\ndata: x\n\ndata: y\n\n"
    assert parse(stream) == [Event(event="a", data="x", id="1", retry=9), Event(data="y")]


def test_empty_event_and_id_are_kept() -> None:
    assert parse(b"event:\ndata: x\n\n") == [Event(event="", data="x")]
    # An empty id resets the client's last event id: it must be forwarded.
    assert parse(b"id\n\n") == [Event(id="")]
    assert parse(b"id:\n\n") == [Event(id="")]


def test_id_with_nul_is_ignored() -> None:
    assert parse(b"id: 1\nid: a\x00b\ndata: x\n\n") == [Event(data="x", id="1")]
    assert parse(b"id: a\x00b\n\n") == []


def test_nul_is_fine_in_data_event_and_comments() -> None:
    assert parse(b"event: a\x00\ndata: b\x00\n:c\x00\n\n") == [
        Comment("c\x00"),
        Event(event="a\x00", data="b\x00"),
    ]


@pytest.mark.parametrize(
    "value", [b"", b"-1", b"+1", b"1.5", b"1e3", b" 1", b"1 ", b"x", b"\xd9\xa1", b"\xc2\xb2"]
)
def test_retry_that_is_not_ascii_digits_is_ignored(value: bytes) -> None:
    # b" 1" arrives as "retry:  1": after the one stripped space, " 1" is not all digits.
    assert parse(b"retry: " + value + b"\ndata: x\n\n") == [Event(data="x")]
    assert parse(b"retry: 100\nretry: " + value + b"\n\n") == [Event(retry=100)]


def test_retry_digits() -> None:
    assert parse(b"retry: 0\n\n") == [Event(retry=0)]
    assert parse(b"retry:007\n\n") == [Event(retry=7)]
    assert parse(b"retry: 18446744073709551616\n\n") == [Event(retry=MAX_RETRY)]
    # Far beyond int()'s default digit limit: clamped, never an exception.
    assert parse(b"retry: " + b"9" * 10000 + b"\n\n") == [Event(retry=MAX_RETRY)]
    assert parse(b"retry: " + b"0" * 10000 + b"12\n\n") == [Event(retry=12)]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"foo: bar\ndata: x\nDATA: y\nData: z\n\n") == [Event(data="x")]
    assert parse(b"foo: bar\n\n") == []
    assert parse(b" data: x\n\n") == []


def test_line_without_colon_is_a_field_with_empty_value() -> None:
    assert parse(b"event\ndata\n\n") == [Event(event="", data="")]
    assert parse(b"dat\n\n") == []


def test_comments() -> None:
    assert parse(b": keepalive\n") == [Comment(" keepalive")]
    assert parse(b":\n") == [Comment("")]
    assert parse(b"::x\n") == [Comment(":x")]
    # A comment inside a block neither ends nor changes it.
    assert parse(b"data: a\n: mid\ndata: b\n\n") == [Comment(" mid"), Event(data="a\nb")]


def test_comment_is_returned_as_soon_as_its_line_ends() -> None:
    parser = SseParser()
    assert parser.feed(b":ping") == []
    assert parser.feed(b"\r") == [Comment("ping")]
    assert not parser.pending


def test_blank_lines_without_fields_emit_nothing() -> None:
    assert parse(b"\n\n\r\n\r\r") == []
    assert parse(b": c\n\n") == [Comment(" c")]
    assert parse(b"data: x\n\n\n\n") == [Event(data="x")]


def test_block_without_data_is_forwarded() -> None:
    assert parse(b"event: ping\n\n") == [Event(event="ping")]
    assert parse(b"retry: 10\n\n") == [Event(retry=10)]
    assert parse(b"id: 5\n\n") == [Event(id="5")]


# --------------------------------------------------------------------------
# End of stream


def test_close_discards_an_unterminated_block() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\ndata: b\n") == []
    assert parser.pending
    assert parser.close() == []
    assert not parser.pending


def test_close_processes_a_final_line_without_line_end() -> None:
    assert parse(b"data: x\n\n: bye") == [Event(data="x"), Comment(" bye")]
    # The last field line is processed, but there is still no blank line.
    assert parse(b"data: x\n\ndata: y") == [Event(data="x")]


def test_close_on_empty_and_on_clean_end() -> None:
    parser = SseParser()
    assert parser.close() == []
    assert parser.feed(b"data: x\n\n") == [Event(data="x")]
    assert not parser.pending
    assert parser.close() == []


def test_parser_is_fresh_after_close() -> None:
    parser = SseParser()
    parser.feed(b"data: x\r")
    parser.close()
    assert parser.feed(BOM + b"\ndata: y\n\n") == [Event(data="y")]


def test_feed_empty_bytes() -> None:
    parser = SseParser()
    assert parser.feed(b"") == []
    parser.feed(b"data: x\r")
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [Event(data="x")]


def test_bytearray_input() -> None:
    parser = SseParser()
    assert parser.feed(bytearray(b"data: x\n\n")) == [Event(data="x")]


# --------------------------------------------------------------------------
# The max_line bound


def test_line_at_the_limit_is_accepted() -> None:
    parser = SseParser(max_line=16)
    line = b"data:" + b"x" * 11
    assert len(line) == 16
    assert parser.feed(line + b"\r\n\r\n") == [Event(data="x" * 11)]
    for i in range(len(line)):
        assert parser.feed(line[i : i + 1]) == []
    assert parser.feed(b"\n\n") == [Event(data="x" * 11)]


@pytest.mark.parametrize("chunk", [1, 5, 17, 1000])
def test_line_over_the_limit_raises(chunk: int) -> None:
    stream = b"data: a\n\n" + b"data:" + b"x" * 12 + b"\n\n"
    parser = SseParser(max_line=16)
    with pytest.raises(ProtocolError, match="16-byte limit"):
        for i in range(0, len(stream), chunk):
            parser.feed(stream[i : i + chunk])


def test_unterminated_line_over_the_limit_raises_before_it_ends() -> None:
    parser = SseParser(max_line=100)
    parser.feed(b"data: " + b"x" * 94)
    with pytest.raises(ProtocolError):
        parser.feed(b"x")


def test_max_line_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SseParser(max_line=0)


def test_huge_line_in_small_chunks() -> None:
    # Linear, not quadratic: 4 MiB in 64-byte pieces is 65536 feeds.
    payload = b"x" * (4 * 1024 * 1024)
    stream = b"data: " + payload + b"\n\n"
    parser = SseParser()
    out: list[Item] = []
    for i in range(0, len(stream), 64):
        out += parser.feed(stream[i : i + 64])
    assert out == [Event(data=payload.decode())]


# --------------------------------------------------------------------------
# serialize


def test_serialize_examples() -> None:
    assert serialize(Event(data="a\nb")) == b"data: a\ndata: b\n\n"
    assert serialize(Event(data="")) == b"data: \n\n"
    assert serialize(Event(event="e", data="d", id="1", retry=5)) == (
        b"event: e\nid: 1\nretry: 5\ndata: d\n\n"
    )
    assert serialize(Event(id="")) == b"id: \n\n"
    assert serialize(Comment(" keepalive")) == b": keepalive\n"
    assert serialize(Comment("")) == b":\n"
    assert serialize(Event(data="é")) == "data: é\n\n".encode()


def test_serialize_event_with_no_fields_dispatches_nothing() -> None:
    assert parse(serialize(Event())) == []
    # ...and does not disturb what follows.
    assert parse(serialize(Event()) + serialize(Event(data="x"))) == [Event(data="x")]


def test_serialize_data_with_cr_reads_back_as_lf() -> None:
    assert serialize(Event(data="a\rb\r\nc")) == b"data: a\ndata: b\ndata: c\n\n"


@pytest.mark.parametrize(
    "item",
    [
        Event(event="a\nb"),
        Event(event="a\rb"),
        Event(id="1\n"),
        Event(id="\r"),
        Event(id="a\x00"),
        Event(retry=-1),
        Comment("a\nb"),
        Comment("a\r"),
        Event(data="\ud800"),  # a lone surrogate cannot be UTF-8
    ],
)
def test_serialize_refuses_what_the_format_cannot_carry(item: Item) -> None:
    with pytest.raises(ValueError):
        serialize(item)


# --------------------------------------------------------------------------
# Properties

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
_line = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=30
)

events = st.builds(
    Event,
    event=st.none() | _line,
    data=st.none() | _text.map(lambda s: s.replace("\r", "")),
    id=st.none() | _line.map(lambda s: s.replace("\x00", "")),
    retry=st.none() | st.integers(0, MAX_RETRY),
)
comments = st.builds(Comment, _line)
items = st.one_of(events, comments)


def _dispatched(item: Item) -> bool:
    return isinstance(item, Comment) or item != Event()


@given(items)
def test_serialize_parse_round_trip(item: Item) -> None:
    expected = [item] if _dispatched(item) else []
    assert parse(serialize(item)) == expected


def _with_line_ends(stream: bytes, ends: list[bytes]) -> bytes:
    """Replace each LF of ``stream`` by the next of ``ends`` (cycled)."""
    lines = stream.split(b"\n")
    out = bytearray()
    for i, line in enumerate(lines[:-1]):
        out += line + ends[i % len(ends)]
    return bytes(out + lines[-1])


@given(
    st.lists(items, max_size=8),
    st.sampled_from([b"\n", b"\r", b"\r\n"]),
    st.booleans(),
)
def test_stream_of_serialized_items_round_trips_in_every_line_end_style(
    stream_items: list[Item], eol: bytes, bom: bool
) -> None:
    stream = (BOM if bom else b"") + _with_line_ends(
        b"".join(serialize(i) for i in stream_items), [eol]
    )
    expected = [i for i in stream_items if _dispatched(i)]
    assert parse(stream) == expected
    assert parse_bytewise(stream) == expected


# Streams that mix serialized items, arbitrary line ends (so CR then LF can
# merge into one line end), raw field lines and byte-level garbage.
_raw_lines = st.one_of(
    items.map(serialize),
    st.sampled_from(
        [
            b"",
            b"data",
            b"data:",
            b"id: \x00",
            b"retry: 12x",
            b"retry: 99",
            b"event:",
            b":",
            b"\xef\xbb\xbf",
            b"\xf0\x9f\x98",
            b"\xe2\x82\xac",
            b"\xff",
            b"unknown: x",
        ]
    ),
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(_raw_lines, max_size=10))
    ends = draw(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=1, max_size=6))
    stream = _with_line_ends(b"\n".join(parts), ends)
    if draw(st.booleans()):
        stream = BOM + stream
    return stream


@settings(max_examples=300)
@given(st.data())
def test_every_chunking_gives_the_same_result(data: st.DataObject) -> None:
    stream = data.draw(streams())
    whole = parse(stream)
    assert whole == reference_parse(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    assert parse(stream, cuts) == whole
    assert parse_bytewise(stream) == whole


_noise = st.lists(
    st.one_of(
        st.binary(max_size=8),
        st.sampled_from([b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"id", b"retry", b"event"]),
        st.sampled_from([b"\x00", b"\xef\xbb\xbf", b"\xef", b"\xbb", b"\xc3", b"\xa9", b"7"]),
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=300)
@given(_noise, st.lists(st.integers(0, 400), max_size=8))
def test_random_bytes_never_raise_and_match_the_reference(stream: bytes, cuts: list[int]) -> None:
    cuts = sorted(c for c in cuts if c <= len(stream))
    result = parse(stream, cuts)
    assert result == reference_parse(stream)
    assert parse_bytewise(stream) == result


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_arbitrary_binary_never_raises(stream: bytes, cuts: list[int]) -> None:
    cuts = sorted(c for c in cuts if c <= len(stream))
    assert parse(stream, cuts) == reference_parse(stream)
