"""Bodies framed by the server itself (bodies.py): an event stream's chunked body and a
bulk body of known length give the same bytes as h11 would, in any split, and the
chunked decoder is as strict as h11 about what it refuses."""

from __future__ import annotations

from itertools import pairwise

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.server.upstream import UpstreamBroken, UpstreamClient
from carapace.server.upstream.bodies import (
    MAX_CHUNK_LINE,
    MAX_TRAILERS,
    ChunkedDecoder,
    ChunkedError,
    LengthDecoder,
)

from .test_upstream_client import answers, scripted

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def encode(chunks: list[bytes], trailers: bytes = b"", ext: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c) + (
        b"0\r\n" + trailers + b"\r\n")


def decode(wire: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    out = b""
    bounds = [0, *sorted(cuts), len(wire)]
    for a, b in pairwise(bounds):
        decoder.feed(wire[a:b])
        out += decoder.take()
    return out, decoder.done


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_any_split_gives_the_body_and_its_end(chunks: list[bytes], data: st.DataObject) -> None:
    wire = encode(chunks, trailers=b"X-T: 1\r\n", ext=b";name=v")
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert decode(wire, cuts) == (b"".join(chunks), True)


def test_what_one_read_brings_comes_out_at_once_and_nothing_waits() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"5\r\nhello\r\n3\r\nabc\r\n2\r\nxy")
    assert decoder.take() == b"helloabcxy"  # a chunk's first bytes do not wait for the rest
    assert not decoder.done
    decoder.feed(b"\r\n0\r\n\r\n")
    assert decoder.take() == b"" and decoder.done


@pytest.mark.parametrize("wire", [
    b"zz\r\nbad\r\n",                      # not hex
    b"0x5\r\nhello\r\n",                    # int() would take it; HTTP does not
    b"+5\r\nhello\r\n",
    b"\r\nhello\r\n",                       # no size at all
    b"1" * 17 + b"\r\n",                    # more hex digits than any real size
    b"5\r\nhelloXY",                        # data not followed by CRLF
    b"0\r\nno colon\r\n\r\n",              # a trailer line that is no header
    b"0\r\n folded: x\r\n\r\n",
])
def test_bad_framing_is_refused(wire: bytes) -> None:
    decoder = ChunkedDecoder()
    decoder.feed(wire)
    with pytest.raises(ChunkedError):
        decoder.take()
        decoder.feed(b"0\r\n\r\n")
        decoder.take()


def test_bad_framing_after_good_chunks_is_raised_once_they_are_taken() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"5\r\nhello\r\nzz\r\n")
    assert decoder.take() == b"hello"
    with pytest.raises(ChunkedError, match="chunk size"):
        decoder.take()


def test_a_body_of_known_length() -> None:
    decoder = LengthDecoder(10)
    decoder.feed(b"abc")
    assert decoder.take() == b"abc" and not decoder.done
    decoder.feed(b"defghijEXTRA")
    assert decoder.take() == b"defghij" and decoder.done
    assert LengthDecoder(0).done


def test_an_endless_size_line_is_refused_not_buffered() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"5" * MAX_CHUNK_LINE)
    assert decoder.take() == b""
    decoder.feed(b";")
    with pytest.raises(ChunkedError, match="over"):
        decoder.take()


def test_endless_trailers_are_refused() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n")
    with pytest.raises(ChunkedError):
        for _ in range(MAX_TRAILERS // 10 + 2):
            decoder.feed(b"X-A: 1234\r\n")
            decoder.take()


def test_h11_reads_the_same_body() -> None:
    """The reference: h11 decoding the same wire bytes."""
    chunks = [b"data: 1\n\n", b"data: 2\n\n" * 3, b"x"]
    wire = encode(chunks, trailers=b"X-T: 1\r\n", ext=b"; a=b")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    body = b""
    while type(event := conn.next_event()) is not h11.EndOfMessage:
        if type(event) is h11.Data:
            body += event.data
    assert decode(wire, [3, 20]) == (body, True)


# -- through the upstream client ------------------------------------------------------


@pytest.fixture
async def client() -> UpstreamClient:
    async with UpstreamClient() as c:
        yield c  # type: ignore[misc]


async def read_here(client: UpstreamClient, url: str, method: str = "GET") -> bytes:
    resp = await client.request(method, url, [], b"", timeout=10)
    try:
        resp.read_body_here(method)
        return await resp.read(idle_timeout=10)
    finally:
        await resp.aclose()


async def test_an_event_stream_read_here_arrives_whole_and_is_not_pooled(
        nursery: trio.Nursery, client: UpstreamClient) -> None:
    events = [b"data: %d\n\n" % i for i in range(50)]
    server = await scripted(nursery, answers(SSE_HEAD + encode(events[:1])[:-5],
                                             *(encode([e])[:-5] for e in events[1:]),
                                             b"0\r\n\r\n", then_close=False))
    assert await read_here(client, server.url + "/sse") == b"".join(events)
    assert client.idle_connections == 0 and client.active_connections == 0


@pytest.mark.parametrize("tail", [b"5\r\nhel", b"zz\r\n", b"5\r\nhelloXX"])
async def test_a_broken_or_cut_chunked_stream_is_broken(
        nursery: trio.Nursery, client: UpstreamClient, tail: bytes) -> None:
    server = await scripted(nursery, answers(SSE_HEAD, b"5\r\nabcde\r\n", tail))
    resp = await client.request("GET", server.url + "/sse", [], b"", timeout=10)
    resp.read_body_here("GET")
    got = b""
    with pytest.raises(UpstreamBroken):
        while (chunk := await resp.next_chunk(10)) is not None:
            got += chunk
    await resp.aclose()
    assert got.startswith(b"abcde")  # what came before the break is delivered first
    assert client.active_connections == 0


async def test_an_answer_to_head_has_no_body_to_read(nursery: trio.Nursery,
                                                    client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(SSE_HEAD, then_close=False))
    with trio.fail_after(5):  # h11 knows there is no body; waiting for chunks would hang
        assert await read_here(client, server.url + "/sse", method="HEAD") == b""


async def test_a_bulk_body_read_here_arrives_whole_and_a_small_one_keeps_pooling(
        nursery: trio.Nursery, client: UpstreamClient) -> None:
    big = bytes(range(256)) * 1024
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big)
    server = await scripted(nursery, answers(head + big[:1000], big[1000:], then_close=False))
    resp = await client.request("GET", server.url + "/big", [], b"", timeout=10)
    resp.read_body_here("GET", chunked=False, min_length=64 * 1024)
    assert await resp.read(idle_timeout=10) == big and resp.complete
    await resp.aclose()
    assert client.idle_connections == 0  # framed here: not pooled

    small = await scripted(nursery, answers(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                                            b"hello", then_close=False))
    resp = await client.request("GET", small.url + "/", [], b"", timeout=10)
    resp.read_body_here("GET", chunked=False, min_length=64 * 1024)
    assert await resp.read(idle_timeout=10) == b"hello"
    await resp.aclose()
    assert client.idle_connections == 1  # h11 read it: pooled as ever


async def test_a_bulk_body_cut_short_is_broken(nursery: trio.Nursery,
                                               client: UpstreamClient) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    server = await scripted(nursery, answers(head, b"x" * 5000))
    resp = await client.request("GET", server.url + "/big", [], b"", timeout=10)
    resp.read_body_here("GET", chunked=False, min_length=64 * 1024)
    with pytest.raises(UpstreamBroken):
        await resp.read(idle_timeout=10)
    await resp.aclose()
    assert not resp.complete and client.active_connections == 0
