"""server/upstream/client.py against the real test upstream and small scripted servers.

The test upstream (carapace.debug.upstream) covers the ordinary answers;
scripted servers write exact bytes for what it never does on purpose: read
until close, explicit chunks, 1xx heads, bodies cut short, closing an idle
connection, TLS.
"""

from __future__ import annotations

import gzip
import json
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trustme

from carapace.debug.upstream import UpstreamServer, pattern_bytes, serve_upstream
from carapace.protocol.sse import Event, SseParser
from carapace.server.upstream import (
    ContentDecoder,
    UnsupportedEncoding,
    UpstreamBroken,
    UpstreamClient,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from carapace.server.upstream import client as uc
from helpers.procs import free_port

RPC = json.dumps({"jsonrpc": "2.0", "method": "version", "id": 1}).encode()


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> UpstreamServer:
    server: UpstreamServer = await nursery.start(serve_upstream, "127.0.0.1", 0)
    return server


@pytest.fixture
async def client() -> UpstreamClient:
    async with UpstreamClient() as c:
        yield c  # type: ignore[misc]


async def get(client: UpstreamClient, url: str, method: str = "GET",
              headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    resp = await client.request(method, url, headers or [], body, timeout=10)
    try:
        data = await resp.read(idle_timeout=10)
    finally:
        await resp.aclose()
    return resp.status, resp.headers, data


# -- scripted servers ---------------------------------------------------------------------


Handler = Callable[[trio.abc.Stream, "Scripted"], Awaitable[None]]


@dataclass
class Scripted:
    port: int
    connections: int = 0
    requests: list[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def scripted(nursery: trio.Nursery, handler: Handler,
                   ssl_context: ssl.SSLContext | None = None) -> Scripted:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = Scripted(listeners[0].socket.getsockname()[1], requests=[])

    async def serve(tcp: trio.SocketStream) -> None:
        server.connections += 1
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            stream = trio.SSLStream(tcp, ssl_context, server_side=True)
        try:
            async with stream:
                await handler(stream, server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await nursery.start(trio.serve_listeners, serve, listeners)
    return server


async def read_head(stream: trio.abc.Stream, server: Scripted) -> bytes:
    """One request head (these tests send no request bodies to scripted servers)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return b""
        buf += data
    assert server.requests is not None
    server.requests.append(buf)
    return buf


def answers(*parts: bytes, then_close: bool = True) -> Handler:
    """Per connection: for each request head, write ``parts`` (one send each)."""

    async def handler(stream: trio.abc.Stream, server: Scripted) -> None:
        while await read_head(stream, server):
            for part in parts:
                await stream.send_all(part)
            if then_close:
                return

    return handler


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# -- the ordinary answers (test upstream) ---------------------------------------------


async def test_keep_alive_reuses_one_connection(upstream: UpstreamServer,
                                                client: UpstreamClient) -> None:
    for _ in range(20):
        status, _, body = await get(client, upstream.url("/api/v1/rpc"), "POST", body=RPC)
        assert status == 200
        assert json.loads(body)["result"] == {"version": "0.13.x-fake"}
    assert client.connections_opened == 1
    assert upstream.stats.total_connections == 1
    assert client.idle_connections == 1 and client.active_connections == 0


async def test_content_length_body_arrives_whole(upstream: UpstreamServer,
                                                 client: UpstreamClient) -> None:
    n = 3 * 65536 + 17
    resp = await client.request("GET", upstream.url(f"/bytes?n={n}&chunk=10000"), timeout=10)
    assert resp.header(b"content-length") == str(n).encode()
    chunks = [c async for c in resp.body(10)]
    await resp.aclose()
    assert all(chunks) and b"".join(chunks) == pattern_bytes(n)
    assert resp.complete and client.idle_connections == 1


async def test_chunked_event_stream_arrives_as_written(upstream: UpstreamServer,
                                                       client: UpstreamClient) -> None:
    resp = await client.request("GET", upstream.url("/sse?count=5&interval_ms=1"), timeout=10)
    assert resp.status == 200
    assert resp.header(b"Content-Type") == b"text/event-stream"
    assert (b"Transfer-Encoding", b"chunked") in resp.headers
    parser = SseParser()
    events = [i async for c in resp.body() for i in parser.feed(c) if isinstance(i, Event)]
    await resp.aclose()
    assert [e.id for e in events] == ["1", "2", "3", "4", "5"]
    assert client.idle_connections == 1  # a chunked answer read to its end is reusable


async def test_explicit_chunks_and_reuse(nursery: trio.Nursery, client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", then_close=False))
    for _ in range(3):
        status, _, body = await get(client, server.url + "/x")
        assert (status, body) == (200, b"hello world")
    assert server.connections == 1


async def test_what_has_arrived_is_read_without_waiting(nursery: trio.Nursery,
                                                       client: UpstreamClient) -> None:
    """next_chunk_nowait: the head's own read brought the body; a later part needs a read."""
    part2 = trio.Event()

    async def handler(stream: trio.abc.Stream, server: Scripted) -> None:
        await read_head(stream, server)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n")
        await part2.wait()
        await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")

    server = await scripted(nursery, handler)
    resp = await client.request("GET", server.url + "/", timeout=10)
    assert resp.next_chunk_nowait() == b"hello"
    with pytest.raises(trio.WouldBlock):
        resp.next_chunk_nowait()
    part2.set()
    assert await resp.next_chunk(10) == b" world"
    assert resp.next_chunk_nowait() is None and resp.complete
    await resp.aclose()
    assert client.idle_connections == 1


async def test_read_until_close_is_not_pooled(nursery: trio.Nursery,
                                              client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ", b"world"))
    for _ in range(2):
        status, _, body = await get(client, server.url + "/")
        assert (status, body) == (200, b"hello world")
    assert server.connections == 2 and client.idle_connections == 0


async def test_http10_answer(nursery: trio.Nursery, client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert await get(client, server.url + "/") == (200, [(b"Content-Length", b"2")], b"ok")
    assert client.idle_connections == 0  # h11 keeps no HTTP/1.0 connection alive


async def test_connection_close_is_honoured(nursery: trio.Nursery,
                                            client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        then_close=False))
    assert (await get(client, server.url + "/"))[2] == b"ok"
    assert client.idle_connections == 0


async def test_head_has_no_body_and_keeps_the_connection(upstream: UpstreamServer,
                                                         client: UpstreamClient) -> None:
    status, headers, body = await get(client, upstream.url("/bytes?n=1000"), "HEAD")
    assert (status, body) == (200, b"")
    assert (b"Content-Length", b"1000") in headers
    status, _, body = await get(client, upstream.url("/bytes?n=10"))
    assert (status, body) == (200, pattern_bytes(10))
    assert client.connections_opened == 1


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(upstream: UpstreamServer, client: UpstreamClient,
                                code: int) -> None:
    for _ in range(2):
        status, _, body = await get(client, upstream.url(f"/status/{code}"))
        assert (status, body) == (code, b"")
    assert client.connections_opened == 1


async def test_informational_heads_are_skipped(nursery: trio.Nursery,
                                               client: UpstreamClient) -> None:
    server = await scripted(nursery, answers(
        b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        OK_HELLO))
    assert (await get(client, server.url + "/"))[::2] == (200, b"hello")


async def test_request_headers_host_and_framing(upstream: UpstreamServer,
                                                client: UpstreamClient) -> None:
    """Host from the URL, the caller's headers in order, nothing added, our own framing."""
    headers = [(b"X-One", b"1"), (b"host", b"evil.example"), (b"Content-Length", b"999"),
               (b"Transfer-Encoding", b"chunked"), (b"X-Two", b"2")]
    _, _, body = await get(client, upstream.url("/echo/x?y=1"), "POST", headers, b"abc")
    echo = json.loads(body)
    assert echo["path"] == "/echo/x?y=1"
    assert echo["body"] == "abc"
    assert echo["headers"] == [["Host", f"127.0.0.1:{upstream.port}"], ["X-One", "1"],
                               ["X-Two", "2"], ["Content-Length", "3"]]
    _, _, body = await get(client, upstream.url("/echo"), "POST")
    assert ["Content-Length", "0"] in json.loads(body)["headers"]
    _, _, body = await get(client, upstream.url("/echo"))
    assert json.loads(body)["headers"] == [["Host", f"127.0.0.1:{upstream.port}"]]


async def test_base_and_target_pair_keeps_the_base_path(upstream: UpstreamServer,
                                                        client: UpstreamClient) -> None:
    resp = await client.request("GET", (upstream.url("/echo/base/"), "/t?q=%20"), timeout=10)
    echo = json.loads(await resp.read(10))
    await resp.aclose()
    assert echo["path"] == "/echo/base/t?q=%20"


def test_url_parsing() -> None:
    assert uc.split_url("http://h:1/a/b?c=d#frag") == ("http://h:1", "/a/b?c=d")
    assert uc.split_url("http://h:1?c") == ("http://h:1", "/?c")
    assert uc.split_url("https://h") == ("https://h", "/")
    o = uc.parse_base("https://Example.COM:443/base/")
    assert (o.scheme, o.host, o.port, o.host_header, o.prefix) == (
        "https", "example.com", 443, b"example.com", "/base")
    assert uc.parse_base("http://[::1]:8080").host_header == b"[::1]:8080"
    assert uc.parse_base("http://h:80").host_header == b"h"
    with pytest.raises(UpstreamUnavailable):
        uc.parse_base("ftp://h")


# -- the pool --------------------------------------------------------------------------


async def test_idle_connections_are_capped_and_reused_last_in_first_out(
    upstream: UpstreamServer,
) -> None:
    async with UpstreamClient(max_idle_per_origin=3) as client:
        # Five answers open at once need five connections.
        resps = [await client.request("GET", upstream.url("/bytes?n=10"), timeout=10)
                 for _ in range(5)]
        assert client.connections_opened == 5 and client.active_connections == 5
        conns = [r._conn for r in resps]
        for r in resps:
            await r.read(10)
            await r.aclose()
        assert client.idle_connections == 3 and client.active_connections == 0
        resp = await client.request("GET", upstream.url("/bytes?n=10"), timeout=10)
        assert resp._conn is conns[-1]  # the most recently returned one
        await resp.aclose()
        assert client.connections_opened == 5


async def test_expired_idle_connections_are_closed(upstream: UpstreamServer) -> None:
    async with UpstreamClient(idle_expiry=0) as client:
        await get(client, upstream.url("/bytes?n=1"))
        await get(client, upstream.url("/bytes?n=1"))
        assert client.connections_opened == 2
        assert client.idle_connections == 1
    assert client.idle_connections == 0
    with pytest.raises(UpstreamUnavailable, match="closed"):
        await client.request("GET", upstream.url("/"), timeout=1)


async def test_an_unfinished_answer_closes_its_connection(upstream: UpstreamServer,
                                                          client: UpstreamClient) -> None:
    resp = await client.request("GET", upstream.url("/sse-forever?interval_ms=60000"),
                                timeout=10)
    assert await resp.next_chunk(10)
    await resp.aclose()
    assert client.idle_connections == 0 and client.active_connections == 0
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.stats.open_streams == 0 and upstream.stats.cancelled_streams == 1


async def test_cancelled_body_read_closes_the_connection(upstream: UpstreamServer,
                                                         client: UpstreamClient) -> None:
    resp = await client.request("GET", upstream.url("/sse-forever?interval_ms=60000"),
                                timeout=10)
    with trio.move_on_after(0.05):
        async for _chunk in resp.body():
            pass
    await resp.aclose()
    assert client.idle_connections == 0 and client.active_connections == 0
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.stats.open_connections == 0


async def test_upstream_closing_an_idle_connection_is_noticed(nursery: trio.Nursery,
                                                              client: UpstreamClient) -> None:
    closed = trio.Event()

    async def one_then_close(stream: trio.abc.Stream, server: Scripted) -> None:
        await read_head(stream, server)
        await stream.send_all(OK_HELLO)  # keep-alive as far as HTTP goes ...
        await stream.aclose()  # ... but the upstream drops it while it is idle
        closed.set()

    server = await scripted(nursery, one_then_close)
    assert (await get(client, server.url + "/"))[2] == b"hello"
    assert client.idle_connections == 1
    await closed.wait()
    # POST too: the dead connection is never used, so nothing is at risk.
    assert (await get(client, server.url + "/", "POST", body=b"x"))[2] == b"hello"
    assert server.connections == 2


async def test_reused_connection_dying_before_the_answer(nursery: trio.Nursery,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the readiness check cannot see: idempotent methods are retried once on a
    fresh connection; a POST is not (the upstream may have acted on it) and fails as
    unavailable."""
    closed = trio.Event()

    async def one_then_close(stream: trio.abc.Stream, server: Scripted) -> None:
        await read_head(stream, server)
        await stream.send_all(OK_HELLO)
        await stream.aclose()
        closed.set()

    server = await scripted(nursery, one_then_close)
    monkeypatch.setattr(uc._Connection, "readable", lambda self: False)
    async with UpstreamClient() as client:
        await get(client, server.url + "/")
        await closed.wait()
        closed = trio.Event()
        assert (await get(client, server.url + "/again"))[2] == b"hello"
        assert server.connections == 2 and client.connections_opened == 2
        await closed.wait()
        with pytest.raises(UpstreamUnavailable, match="without answering"):
            await client.request("POST", server.url + "/rpc", [], b"{}", timeout=10)
        assert client.connections_opened == 2  # no second try
        assert client.active_connections == 0 and client.idle_connections == 0


async def test_an_early_answer_to_a_body_the_upstream_will_not_read(
    nursery: trio.Nursery, client: UpstreamClient
) -> None:
    async def refuse(stream: trio.abc.Stream, server: Scripted) -> None:
        await read_head(stream, server)  # and not the body
        await stream.send_all(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                              b"Content-Length: 8\r\n\r\ntoo big\n")

    server = await scripted(nursery, refuse)
    status, _, body = await get(client, server.url + "/up", "POST", body=b"x" * (32 << 20))
    assert (status, body) == (413, b"too big\n")
    assert client.idle_connections == 0 and client.active_connections == 0


@pytest.mark.slow
async def test_10000_sequential_requests_reuse_one_connection(
    upstream: UpstreamServer, client: UpstreamClient
) -> None:
    url = upstream.url("/api/v1/rpc")
    headers = [(b"Content-Type", b"application/json")]
    for _ in range(10_000):
        resp = await client.request("POST", url, headers, RPC, timeout=10)
        body = await resp.read(10)
        await resp.aclose()
        assert resp.status == 200 and body.startswith(b'{"jsonrpc"')
    assert client.connections_opened == 1
    assert upstream.stats.total_connections == 1
    assert upstream.stats.rpc_calls["version"] == 10_000


@pytest.mark.slow
async def test_2000_concurrent_event_streams_open_quickly(upstream: UpstreamServer,
                                                          client: UpstreamClient) -> None:
    n = 2000
    url = upstream.url("/sse-forever?interval_ms=600000")
    opened = 0
    all_open = trio.Event()
    started = time.monotonic()

    async def one() -> None:
        nonlocal opened
        resp = await client.request("GET", url, [(b"Accept", b"text/event-stream")],
                                    timeout=60)
        try:
            assert resp.status == 200
            assert (await resp.next_chunk()).startswith(b"id: 1\n")
            opened += 1
            if opened == n:
                all_open.set()
            await trio.sleep_forever()
        finally:
            await resp.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
        await all_open.wait()
        elapsed = time.monotonic() - started
        assert client.active_connections == n and client.connections_opened == n
        assert upstream.stats.open_streams == n
        nursery.cancel_scope.cancel()
    assert client.active_connections == 0 and client.idle_connections == 0
    # Generous for a shared 2-core machine; the quadratic pool took minutes for 10,000.
    assert elapsed < 30, f"{n} streams took {elapsed:.1f} s to open"


# -- failures --------------------------------------------------------------------------


async def test_connect_refused_is_unavailable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnavailable, match="cannot connect"):
        await client.request("GET", f"http://127.0.0.1:{free_port()}/", timeout=10)
    assert client.active_connections == 0


async def test_unknown_host_is_unavailable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnavailable, match="cannot connect"):
        await client.request("GET", "http://no-such-host.invalid/", timeout=10)


async def test_no_head_in_time_is_a_timeout(upstream: UpstreamServer,
                                            client: UpstreamClient) -> None:
    started = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        await client.request("GET", upstream.url("/hang"), timeout=0.2)
    assert trio.current_time() - started < 5
    assert client.active_connections == 0 and client.idle_connections == 0


async def test_idle_body_is_a_timeout(upstream: UpstreamServer, client: UpstreamClient) -> None:
    resp = await client.request("GET", upstream.url("/sse?count=2&interval_ms=60000"),
                                timeout=10)
    chunks = resp.body(idle_timeout=0.2)
    assert await anext(chunks)
    with pytest.raises(UpstreamTimeout):
        await anext(chunks)
    await resp.aclose()
    assert client.active_connections == 0 and client.idle_connections == 0


@pytest.mark.parametrize("head,sent", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 50),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nbad framing\r\n"),
])
async def test_body_cut_short_is_broken(nursery: trio.Nursery, client: UpstreamClient,
                                        head: bytes, sent: bytes) -> None:
    server = await scripted(nursery, answers(head, sent))
    resp = await client.request("GET", server.url + "/", timeout=10)
    assert resp.status == 200
    got = b""
    with pytest.raises(UpstreamBroken):
        async for chunk in resp.body(10):
            got += chunk
    await resp.aclose()
    assert not resp.complete and client.idle_connections == 0
    assert client.active_connections == 0


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 200 OK\r\nContent-Le", b"garbage\r\n\r\n"])
async def test_no_usable_head_is_unavailable(nursery: trio.Nursery, client: UpstreamClient,
                                             reply: bytes) -> None:
    server = await scripted(nursery, answers(reply))
    with pytest.raises(UpstreamUnavailable):
        await client.request("GET", server.url + "/", timeout=10)
    assert client.active_connections == 0


async def test_invalid_request_is_refused_before_connecting(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnavailable, match="not valid"):
        await client.request("GET", "http://127.0.0.1:1/", [(b"X-Bad", b"a\r\nb")], timeout=1)
    assert client.connections_opened == 0


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_with_a_trusted_certificate(nursery: trio.Nursery, ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    server = await scripted(nursery, answers(OK_HELLO, then_close=False), server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with UpstreamClient(ssl_context=client_ctx) as client:
        for _ in range(2):
            status, _, body = await get(client, f"https://localhost:{server.port}/s")
            assert (status, body) == (200, b"hello")
        assert server.connections == 1
    assert server.requests is not None
    assert f"Host: localhost:{server.port}\r\n".encode() in server.requests[0]


async def test_https_with_an_untrusted_certificate_is_unavailable(nursery: trio.Nursery,
                                                                  ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    server = await scripted(nursery, answers(OK_HELLO), server_ctx)
    async with UpstreamClient() as client:  # the system's CAs do not know trustme's
        with pytest.raises(UpstreamUnavailable, match="TLS"):
            await client.request("GET", f"https://localhost:{server.port}/", timeout=10)
        assert client.active_connections == 0


# -- Content-Encoding --------------------------------------------------------------------


def _feed_in_pieces(decoder: ContentDecoder, data: bytes, size: int = 7) -> bytes:
    out = b"".join(decoder.feed(data[i:i + size]) for i in range(0, len(data), size))
    return out + decoder.flush()


@pytest.mark.parametrize("encoding,encode", [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda d: zlib.compress(d, wbits=-zlib.MAX_WBITS)),  # raw, as some send it
    ("gzip, deflate", lambda d: zlib.compress(gzip.compress(d))),
    ("identity", lambda d: d),
    ("", lambda d: d),
])
def test_content_decoder(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    data = b"data: event\n\n" * 500
    assert _feed_in_pieces(ContentDecoder(encoding.encode()), encode(data)) == data
    assert ContentDecoder(encoding).identity is (encode(b"x") == b"x")


def test_content_decoder_refuses_what_it_cannot_read() -> None:
    with pytest.raises(UnsupportedEncoding, match="br"):
        ContentDecoder(b"br")
    with pytest.raises(UpstreamBroken):
        ContentDecoder(b"gzip").feed(b"not gzip at all")
