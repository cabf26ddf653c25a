"""The agent's local HTTP/1.1 connection (llhttp + written heads): h11's rules, kept."""

from __future__ import annotations

import h11
import pytest

from carapace.agent.local_http import LocalRequest, ServerConnection


def events(conn: ServerConnection) -> list[object]:
    out = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return out
        out.append(event)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return out


def parse(*chunks: bytes, limit: int = 65536) -> tuple[ServerConnection, list[object]]:
    conn = ServerConnection(limit)
    for chunk in chunks:
        conn.receive_data(chunk)
    return conn, events(conn)


def refused(wire: bytes, limit: int = 65536) -> h11.RemoteProtocolError:
    conn = ServerConnection(limit)
    conn.receive_data(wire)
    with pytest.raises(h11.RemoteProtocolError) as info:
        events(conn)
    return info.value


def test_a_request_in_pieces_reads_as_head_body_end() -> None:
    conn, got = parse(b"POST /api/v1/rpc?x=1 HTTP/1.1\r\nHo", b"st: a\r\nContent-Len",
                      b"gth: 5\r\nX-A: b  \r\n\r\nab", b"cde")
    head = got[0]
    assert isinstance(head, LocalRequest)
    assert (head.method, head.target) == (b"POST", b"/api/v1/rpc?x=1")
    assert head.headers == [(b"Host", b"a"), (b"Content-Length", b"5"), (b"X-A", b"b")]
    assert b"".join(e.data for e in got if isinstance(e, h11.Data)) == b"abcde"
    assert isinstance(got[-1], h11.EndOfMessage)
    assert conn.their_state is h11.DONE and conn.our_state is h11.SEND_RESPONSE


def test_a_chunked_request_body_is_decoded_and_trailers_dropped() -> None:
    _, got = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert isinstance(got[0], LocalRequest) and got[0].headers[-1][0] == b"Transfer-Encoding"
    assert [e.data for e in got if isinstance(e, h11.Data)] == [b"abc"]


@pytest.mark.parametrize(("wire", "status"), [
    # Request smuggling: both framings, or two lengths, or a coding h11 would not take.
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n", 400),
    # Folded, bare-LF and control-character heads.
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
    # Versions other than 1.0/1.1, and Host rules.
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00garbage", 400),
])
def test_what_h11_refuses_is_refused(wire: bytes, status: int) -> None:
    assert refused(wire).error_status_hint == status


def test_a_head_over_the_limit_is_431_also_in_pieces() -> None:
    conn = ServerConnection(1000)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    for _ in range(20):
        conn.receive_data(b"a" * 100)
    with pytest.raises(h11.RemoteProtocolError) as info:
        events(conn)
    assert info.value.error_status_hint == 431


def test_a_close_in_the_middle_of_a_request_is_an_error_and_when_idle_is_not() -> None:
    conn = ServerConnection(65536)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc")
    conn.receive_data(b"")
    with pytest.raises(h11.RemoteProtocolError):
        events(conn)
    _, got = parse(b"")
    assert isinstance(got[0], h11.ConnectionClosed)


def test_pipelined_requests_come_one_cycle_at_a_time() -> None:
    conn = ServerConnection(65536)
    conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    first = events(conn)
    assert isinstance(first[0], LocalRequest) and first[0].target == b"/1"
    assert conn.next_event() is h11.PAUSED  # not before this one is answered
    conn.send_whole(200, [(b"Content-Length", b"2")], b"ok")
    conn.start_next_cycle()
    second = events(conn)
    assert isinstance(second[0], LocalRequest) and second[0].target == b"/2"


def test_answers_are_framed_as_h11_frames_them() -> None:
    conn, _ = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    wire = conn.send_whole(200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"2"),
                                 (b"Connection", b"keep-alive")], b"ok")
    assert wire == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                    b"\r\nok")
    assert conn.our_state is h11.DONE
    # Unknown length to an HTTP/1.1 client: chunked, and what h11 makes of it.
    conn.start_next_cycle()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    wire = conn.send_head(200, [(b"Content-Type", b"text/event-stream")])
    wire += conn.send(h11.Data(data=b"data: 1\n\n")) + conn.send(h11.EndOfMessage())
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    got = [client.next_event() for _ in range(3)]
    assert isinstance(got[0], h11.Response) and got[0].status_code == 200
    assert isinstance(got[1], h11.Data) and got[1].data == b"data: 1\n\n"
    assert isinstance(got[2], h11.EndOfMessage)


def test_http10_and_connection_close_clients_get_one_answer_then_close() -> None:
    conn, _ = parse(b"GET / HTTP/1.0\r\n\r\n")
    wire = conn.send_head(200, [])
    assert b"Connection: close" in wire and b"chunked" not in wire
    assert conn.send_data(b"abc") == b"abc"
    conn.send_end()
    assert conn.our_state is h11.MUST_CLOSE and conn.their_state is h11.MUST_CLOSE
    conn, _ = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"Connection: close" in conn.send_whole(200, [(b"Content-Length", b"0")], b"")
    assert conn.our_state is h11.MUST_CLOSE


def test_head_and_no_content_answers_carry_no_body() -> None:
    conn, _ = parse(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    wire = conn.send_whole(200, [(b"Content-Length", b"10")], b"")
    assert wire.endswith(b"Content-Length: 10\r\n\r\n")
    conn, _ = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"chunked" not in conn.send_head(204, [])
    with pytest.raises(h11.LocalProtocolError):
        conn.send_data(b"x")


def test_a_header_that_would_split_the_answer_is_refused() -> None:
    conn, _ = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(h11.LocalProtocolError):
        conn.send_head(200, [(b"X-A", b"a\r\nSet-Cookie: b")])
    with pytest.raises(h11.LocalProtocolError):
        conn.send_head(200, [(b"X A", b"a")])


def test_length_mismatches_are_refused() -> None:
    conn, _ = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.send_head(200, [(b"Content-Length", b"3")])
    with pytest.raises(h11.LocalProtocolError):
        conn.send_data(b"abcd")
    conn.send_data(b"ab")
    with pytest.raises(h11.LocalProtocolError):
        conn.send_end()


def test_an_error_answer_before_any_request_closes_the_connection() -> None:
    conn = ServerConnection(65536)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and nothing more (a timeout)
    wire = conn.send_whole(408, [(b"Content-Length", b"0")], b"")
    assert wire.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in wire


def test_a_pipelined_body_does_not_count_against_the_next_head() -> None:
    conn = ServerConnection(1000)
    body = b"x" * 5000
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + body
                      + b"GET /2 HTTP/1.1\r\nHo")
    got = events(conn)
    assert isinstance(got[-1], h11.EndOfMessage)
    conn.send_whole(200, [(b"Content-Length", b"0")], b"")
    conn.start_next_cycle()
    conn.receive_data(b"st: a\r\n\r\n")
    second = events(conn)
    assert isinstance(second[0], LocalRequest) and second[0].target == b"/2"


@pytest.mark.parametrize("endless", [
    b"5;" + b"x" * 70_000,                      # a chunk extension that never ends
    b"0\r\nX-Trailer: " + b"y" * 70_000,         # a trailer that never ends
])
def test_endless_chunk_framing_is_refused_not_buffered(endless: bytes) -> None:
    conn = ServerConnection(65536)
    conn.receive_data(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n")
    for k in range(0, len(endless), 4096):
        conn.receive_data(endless[k:k + 4096])
    with pytest.raises(h11.RemoteProtocolError, match="chunk framing or trailers"):
        while conn.next_event() is not h11.NEED_DATA:
            pass
