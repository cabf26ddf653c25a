"""The upstream client's HTTP/1.1 wire (requests written, answers parsed by llhttp)."""

from __future__ import annotations

import h11
import pytest

from carapace.server.upstream.wire import (
    ClientConnection,
    InvalidRequest,
    ResponseHead,
    request_bytes,
)


def answer(wire: bytes, method: bytes = b"GET", *chunks: bytes,
           max_head: int = 65536) -> tuple[ClientConnection, list[object]]:
    conn = ClientConnection(max_head)
    conn.sent(method)
    conn.receive_data(wire)
    for chunk in chunks:
        conn.receive_data(chunk)
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return conn, out
        out.append(event)


def test_a_request_is_written_as_given() -> None:
    wire = request_bytes(b"POST", b"/rpc?x=1", [(b"Host", b"h:1"), (b"Content-Length", b"2")],
                         b"{}")
    assert wire == b"POST /rpc?x=1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize(("method", "target", "headers"), [
    (b"GE T", b"/", []),
    (b"GET", b"/a b", []),
    (b"GET", b"/a\r\nX: y", []),
    (b"GET", b"/", [(b"X-A", b"a\r\nX-Injected: 1")]),
    (b"GET", b"/", [(b"X-A", b"a\x00")]),
    (b"GET", b"/", [(b"X A", b"a")]),
    (b"GET", b"/", [(b"X-A:", b"a")]),
])
def test_a_request_that_is_not_http_is_refused(method: bytes, target: bytes,
                                               headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(InvalidRequest):
        request_bytes(method, target, headers, b"")


def test_a_length_answer_in_pieces_and_reuse() -> None:
    conn, got = answer(b"HTTP/1.1 200 OK\r\nContent-Le", b"GET", b"ngth: 4\r\nX-A: b \r\n\r\nab",
                       b"cd")
    head = got[0]
    assert isinstance(head, ResponseHead)
    assert (head.status_code, head.reason, head.http_version) == (200, b"OK", b"1.1")
    assert head.headers == [(b"Content-Length", b"4"), (b"X-A", b"b")]
    assert b"".join(e.data for e in got if isinstance(e, h11.Data)) == b"abcd"
    assert isinstance(got[-1], h11.EndOfMessage)
    assert conn.their_state is h11.DONE and conn.trailing_data == (b"", False)
    conn.start_next_cycle()
    conn.sent(b"GET")
    conn.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_bytes_after_the_answer_keep_the_connection_out_of_the_pool() -> None:
    for extra in (b"HTTP/1.1 200 OK\r\n", b"garbage", b"x"):
        conn, got = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
        assert isinstance(got[-1], h11.EndOfMessage)
        assert conn.trailing_data[0], extra
    conn, got = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"GET", b"late")
    assert conn.trailing_data[0]


def test_head_answers_have_no_body_and_bytes_after_them_are_noticed() -> None:
    conn, got = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"HEAD")
    assert [type(e) for e in got] == [ResponseHead, h11.EndOfMessage]
    assert conn.their_state is h11.DONE and not conn.trailing_data[0]
    conn, _ = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nstray", b"HEAD")
    assert conn.trailing_data[0]


def test_chunked_answer_and_informational_heads_skipped() -> None:
    _, got = answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    head = got[0]
    assert isinstance(head, ResponseHead) and head.status_code == 200
    assert [e.data for e in got if isinstance(e, h11.Data)] == [b"abc"]
    assert isinstance(got[-1], h11.EndOfMessage)


def test_an_answer_without_length_ends_at_close_and_is_not_reused() -> None:
    conn, got = answer(b"HTTP/1.1 200 OK\r\n\r\nabc", b"GET", b"def", b"")
    assert b"".join(e.data for e in got if isinstance(e, h11.Data)) == b"abcdef"
    assert isinstance(got[-1], h11.EndOfMessage)
    assert conn.their_state is h11.MUST_CLOSE


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"SSH-2.0-OpenSSH\r\n",
])
def test_a_malformed_answer_is_an_error(wire: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        answer(wire)


def test_an_answer_cut_short_and_a_head_too_large_are_errors() -> None:
    with pytest.raises(h11.RemoteProtocolError):
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", b"GET", b"")
    with pytest.raises(h11.RemoteProtocolError):
        answer(b"HTTP/1.1 200 OK\r\n", b"GET", *[b"X-A: " + b"a" * 100 + b"\r\n"] * 20,
               max_head=1000)


def test_connection_close_and_http10_answers_are_not_kept() -> None:
    conn, _ = answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert conn.their_state is h11.MUST_CLOSE
    conn, _ = answer(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert conn.their_state is h11.MUST_CLOSE


def test_the_chunks_of_one_read_arrive_as_one_data_event() -> None:
    # An event stream writes one chunk per event: one read's worth is handed on at once.
    conn = ClientConnection(max_head=65536)
    conn.sent(b"GET")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nab\n\r\n3\r\ncd\n\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    event = conn.next_event()
    assert isinstance(event, h11.Data) and bytes(event.data) == b"ab\ncd\n"
    assert conn.next_event() is h11.NEED_DATA
    conn.receive_data(b"2\r\nef\r\n0\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Data) and bytes(event.data) == b"ef"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_body_bytes_before_a_malformed_chunk_are_still_delivered() -> None:
    conn = ClientConnection(max_head=65536)
    conn.sent(b"GET")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nab\n\r\nzz\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    event = conn.next_event()
    assert isinstance(event, h11.Data) and bytes(event.data) == b"ab\n"
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize("endless", [
    b"5;" + b"x" * 70_000,                      # a chunk extension that never ends
    b"0\r\nX-Trailer: " + b"y" * 70_000,         # a trailer that never ends
    b"0\r\n" + b"X-T: y\r\n" * 10_000,           # trailers without end
])
def test_endless_chunk_framing_is_refused_not_buffered(endless: bytes) -> None:
    conn = ClientConnection(max_head=65536)
    conn.sent(b"GET")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    assert bytes(conn.next_event().data) == b"ab\n"  # type: ignore[attr-defined]
    for k in range(0, len(endless), 4096):
        conn.receive_data(endless[k:k + 4096])
    with pytest.raises(h11.RemoteProtocolError, match="chunk framing or trailers"):
        while conn.next_event() is not h11.NEED_DATA:
            pass
