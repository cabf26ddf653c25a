"""SseBlocks: whole event blocks as bytes, each the moment its blank line arrives, and
exactly the events the parser would have made of the same stream."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol.sse import RAW_PENDING_MAX, Comment, Event, SseBlocks, SseParser

Item = Event | Comment


def parse_all(stream: bytes) -> list[Item]:
    parser = SseParser()
    return [*parser.feed(stream), *parser.close()]


def relay(chunks: list[bytes]) -> tuple[list[bytes], list[int], list[Item], bool]:
    """What the server sends for ``chunks``: the raw regions, their event counts, the
    parsed items once the stream left the raw path, and whether it left."""
    blocks: SseBlocks | None = SseBlocks()
    parser: SseParser | None = None
    regions: list[bytes] = []
    counts: list[int] = []
    items: list[Item] = []
    left = False
    for chunk in chunks:
        if blocks is not None:
            found = blocks.feed(chunk)
            if found is not None:
                if found[0]:
                    regions.append(found[0])
                    counts.append(found[1])
                continue
            parser, got = blocks.handover()
            items += got
            blocks, left = None, True
        else:
            assert parser is not None
            items += parser.feed(chunk)
    if blocks is not None:
        parser, got = blocks.handover()
        items += got
    assert parser is not None
    items += parser.close()
    return regions, counts, items, left


def client_view(regions: list[bytes], items: list[Item]) -> list[Item]:
    """What the local client parses: the regions as they are, then the parsed items."""
    return [*parse_all(b"".join(regions)), *items]


LINE = st.sampled_from([
    b"data: x", b"data:y", b"data", b"data: \xc3\xa9", b"event: e", b"event", b"id: 7",
    b"id", b"id: a\x00b", b"retry: 10", b"retry: x", b": comment", b":", b"foo: bar",
    b"", b"data: \xff", b"\xef\xbb\xbfdata: bom",
])
END = st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    lines = draw(st.lists(st.tuples(LINE, END), max_size=30))
    stream = b"".join(text + end for text, end in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return stream, cuts


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=400)
@given(streams())
def test_the_client_sees_what_the_parser_makes_of_the_stream(case: tuple[bytes, list[int]]
                                                             ) -> None:
    stream, cuts = case
    regions, counts, items, _ = relay(split(stream, cuts))
    assert client_view(regions, items) == parse_all(stream)
    for region, count in zip(regions, counts, strict=True):
        assert region.endswith(b"\n\n") and b"\r" not in region
        region.decode("utf-8")
        mid_stream = SseParser(at_start=False)  # a BOM here is no BOM to strip
        made = [*mid_stream.feed(region), *mid_stream.close()]
        assert count == sum(type(i) is Event for i in made)


@settings(max_examples=300)
@given(streams())
def test_each_event_leaves_the_moment_its_blank_line_arrives(case: tuple[bytes, list[int]]
                                                             ) -> None:
    """After every chunk, the raw path has sent as many events as the parser has made."""
    stream, cuts = case
    blocks = SseBlocks()
    parser = SseParser()
    made = sent = 0
    for chunk in split(stream, cuts):
        made += sum(type(i) is Event for i in parser.feed(chunk))
        found = blocks.feed(chunk)
        if found is None:
            return  # the parser goes on from here, as fast as ever
        sent += found[1]
        assert sent == made


def test_events_counted_in_one_lf_stream_as_it_arrives() -> None:
    blocks = SseBlocks()
    assert blocks.feed(b"id: 1\ndata: a\n\n") == (b"id: 1\ndata: a\n\n", 1)
    assert blocks.feed(b"data: b\n") == (b"", 0)
    assert blocks.feed(b"\n: ping\n\nevent: x\ndata") == (b"data: b\n\n: ping\n\n", 1)
    assert blocks.feed(b": c\n\n") == (b"event: x\ndata: c\n\n", 1)
    assert blocks.feed(b"retry: 5\n\nid: a\x00\n\nfoo\n\n") == (
        b"retry: 5\n\nid: a\x00\n\nfoo\n\n", 1)


def test_crlf_line_ends_travel_as_lf() -> None:
    blocks = SseBlocks()
    assert blocks.feed(b"id: 1\r\ndata: a\r\n\r\n") == (b"id: 1\ndata: a\n\n", 1)
    assert blocks.feed(b"data: b\r\n") == (b"", 0)
    assert blocks.feed(b"\r\n") == (b"data: b\n\n", 1)


@pytest.mark.parametrize("first", [b"\xef\xbb\xbfdata: a\n\n", b"data: a\r\n\r",
                                   b"data: a\rdata: b\r\r", b"data: \xff\n\n"])
def test_what_only_the_parser_gets_right_goes_to_the_parser(first: bytes) -> None:
    blocks = SseBlocks()
    assert blocks.feed(first) is None
    _, items = blocks.handover()
    assert items == SseParser().feed(first)


def test_an_unfinished_block_over_the_bound_goes_to_the_parser_with_its_line_limit() -> None:
    blocks = SseBlocks()
    assert blocks.feed(b"data: a\n\ndata: ") == (b"data: a\n\n", 1)
    big = b"x" * RAW_PENDING_MAX
    assert blocks.feed(big) is None
    parser, items = blocks.handover()
    assert items == []
    assert parser.feed(b"\n\n") == [Event(data="x" * RAW_PENDING_MAX)]


def test_the_parser_taking_over_mid_stream_strips_no_bom() -> None:
    blocks = SseBlocks()
    assert blocks.feed(b"data: a\n\n") == (b"data: a\n\n", 1)
    assert blocks.feed(b"\xef\xbb\xbfdata: b\r\r") is None
    _, items = blocks.handover()
    assert items == []  # "\ufeffdata" is an unknown field there, as the parser says
