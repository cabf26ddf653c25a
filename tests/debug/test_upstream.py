"""The test upstream, driven over real sockets with httpx."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from carapace.debug.upstream import UpstreamServer, pattern_bytes, serve_upstream
from carapace.protocol.sse import Comment, Event, SseParser
from helpers.procs import free_port, running


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> UpstreamServer:
    server: UpstreamServer = await nursery.start(serve_upstream, "127.0.0.1", 0)
    return server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
        yield c


async def rpc(client: httpx.AsyncClient, up: UpstreamServer, payload: Any) -> Any:
    r = await client.post(up.url("/api/v1/rpc"), content=json.dumps(payload))
    assert r.status_code == 200
    return r.json()


async def read_sse(
    client: httpx.AsyncClient, url: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> tuple[list[Event | Comment], bytes, httpx.Response]:
    """The whole stream (it must end by itself), parsed, plus its raw bytes."""
    parser = SseParser()
    items: list[Event | Comment] = []
    raw = bytearray()
    async with client.stream("GET", url, headers=headers) as resp:
        async for chunk in resp.aiter_raw():
            raw += chunk
            items += parser.feed(chunk)
    return items, bytes(raw), resp


def events_of(items: list[Event | Comment]) -> list[Event]:
    return [i for i in items if isinstance(i, Event)]


async def stats(client: httpx.AsyncClient, up: UpstreamServer) -> dict[str, Any]:
    r = await client.get(up.url("/stats"))
    result: dict[str, Any] = r.json()
    return result


async def poll_stats(
    client: httpx.AsyncClient, up: UpstreamServer, **expected: int
) -> dict[str, Any]:
    """Poll /stats until every ``expected`` counter has its value (5 s deadline)."""
    current: dict[str, Any] = {}
    with trio.move_on_after(5):
        while True:
            current = await stats(client, up)
            if all(current[k] == v for k, v in expected.items()):
                return current
            await trio.sleep(0.01)
    raise AssertionError(f"stats never reached {expected}: {current}")


# ---------------------------------------------------------------- signal-cli-like


async def test_jsonrpc_single_calls(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    ans = await rpc(client, upstream, {"jsonrpc": "2.0", "method": "version", "id": 1})
    assert ans == {"jsonrpc": "2.0", "result": {"version": "0.13.x-fake"}, "id": 1}

    ans = await rpc(
        client,
        upstream,
        {"jsonrpc": "2.0", "method": "send", "params": {"recipient": ["+1555"]}, "id": "a"},
    )
    assert ans["id"] == "a"
    assert isinstance(ans["result"]["timestamp"], int) and ans["result"]["timestamp"] > 1e12
    assert ans["result"]["results"][0]["recipientAddress"]["number"] == "+1555"

    ans = await rpc(client, upstream, {"jsonrpc": "2.0", "method": "listAccounts", "id": 2})
    assert ans["result"] == [{"number": "+15550000001"}]

    ans = await rpc(client, upstream, {"jsonrpc": "2.0", "method": "deleteEverything", "id": 3})
    assert ans == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found"},
        "id": 3,
    }
    s = await stats(client, upstream)
    assert s["rpc_calls"] == {"version": 1, "send": 1, "listAccounts": 1, "deleteEverything": 1}


async def test_jsonrpc_batch_and_notifications(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    ans = await rpc(
        client,
        upstream,
        [
            {"jsonrpc": "2.0", "method": "version", "id": 1},
            {"jsonrpc": "2.0", "method": "version"},  # notification: no answer
            {"jsonrpc": "2.0", "method": "nope", "id": 2},
            {"no": "jsonrpc"},
        ],
    )
    assert [a["id"] for a in ans] == [1, 2, None]
    assert ans[0]["result"] == {"version": "0.13.x-fake"}
    assert ans[1]["error"]["code"] == -32601
    assert ans[2]["error"]["code"] == -32600
    r = await client.post(
        upstream.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version"}
    )
    assert r.status_code == 200 and r.content == b""


async def test_jsonrpc_parse_error_is_http_200(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    r = await client.post(upstream.url("/api/v1/rpc"), content=b"{not json")
    assert r.status_code == 200
    assert r.json() == {
        "jsonrpc": "2.0",
        "error": {"code": -32700, "message": "Parse error"},
        "id": None,
    }


async def test_check_and_method_rules(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    r = await client.get(upstream.url("/api/v1/check"))
    assert r.status_code == 200 and r.content == b""
    r = await client.head(upstream.url("/api/v1/check"))
    assert r.status_code == 200
    r = await client.get(upstream.url("/api/v1/rpc"))
    assert r.status_code == 405
    r = await client.get(upstream.url("/no/such/route"))
    assert r.status_code == 404 and "/sse" in r.json()["routes"]
    r = await client.get(upstream.url("/sse?count=many"))
    assert r.status_code == 400 and "count" in r.json()["error"]


async def test_signal_events_stream(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    url = upstream.url("/api/v1/events?account=%2B4912345&count=3&interval_ms=1")
    items, _, resp = await read_sse(client, url)
    assert resp.headers["content-type"] == "text/event-stream"
    evs = events_of(items)
    assert [e.id for e in evs] == ["1", "2", "3"]
    assert {e.event for e in evs} == {"receive"}
    for n, e in enumerate(evs, 1):
        assert e.data is not None
        data = json.loads(e.data)
        assert data["account"] == "+4912345"
        assert data["seq"] == n
        assert isinstance(data["ts"], float)
        assert data["envelope"]["dataMessage"]["message"] == f"fake message {n}"
    # Resume: the stream carries on after Last-Event-ID.
    items, _, _ = await read_sse(client, url.replace("count=3", "count=5"), {"Last-Event-ID": "3"})
    assert [e.id for e in events_of(items)] == ["4", "5"]


# ---------------------------------------------------------------- generic SSE


async def test_sse_count_order_ids(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    items, raw, resp = await read_sse(client, upstream.url("/sse?count=5&interval_ms=1"))
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-cache"
    evs = events_of(items)
    assert len(evs) == len(items) == 5
    assert [e.id for e in evs] == ["1", "2", "3", "4", "5"]
    datas = [json.loads(e.data or "") for e in evs]
    assert [d["seq"] for d in datas] == [1, 2, 3, 4, 5]
    ts = [d["ts"] for d in datas]
    assert ts == sorted(ts)
    assert b"\r" not in raw and evs[0].event is None and evs[0].retry is None
    s = await poll_stats(client, upstream, completed_streams=1, open_streams=0)
    assert s["cancelled_streams"] == 0 and s["events_sent"] == 5


async def test_sse_variants(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    url = upstream.url(
        "/sse?count=3&interval_ms=0&multiline=1&crlf=1&comment=1&event=tick&retry=1500&size=300"
    )
    items, raw, _ = await read_sse(client, url)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.count(b"\r\ndata: ") + raw.startswith(b"data: ") == 9  # 3 data lines per event
    comments = [i for i in items if isinstance(i, Comment)]
    assert [c.text for c in comments] == [" comment 1", " comment 2", " comment 3"]
    evs = events_of(items)
    assert [e.event for e in evs] == ["tick"] * 3
    assert [e.retry for e in evs] == [1500, None, None]
    for n, e in enumerate(evs, 1):
        assert e.data is not None and e.data.count("\n") == 2
        assert json.loads(e.data)["seq"] == n
        assert 290 <= len(e.data) <= 310


async def test_sse_last_event_id_resumes(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    url = upstream.url("/sse?count=5&interval_ms=0")
    items, _, _ = await read_sse(client, url, {"Last-Event-ID": "3"})
    evs = events_of(items)
    assert [e.id for e in evs] == ["4", "5"]
    assert [json.loads(e.data or "")["seq"] for e in evs] == [4, 5]
    items, _, _ = await read_sse(client, url, {"Last-Event-ID": "5"})
    assert items == []


async def test_sse_buffered_writes_bursts(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    url = upstream.url("/sse-buffered?count=4&interval_ms=30&hold_ms=300")
    arrivals: list[float] = []
    parser = SseParser()
    evs: list[Event] = []
    async with client.stream("GET", url) as resp:
        async for chunk in resp.aiter_raw():
            for item in parser.feed(chunk):
                assert isinstance(item, Event)
                evs.append(item)
                arrivals.append(trio.current_time())
    ts = [json.loads(e.data or "")["ts"] for e in evs]
    assert [e.id for e in evs] == ["1", "2", "3", "4"]
    assert ts[-1] - ts[0] >= 0.08  # generated over ~90 ms ...
    assert arrivals[-1] - arrivals[0] < (ts[-1] - ts[0]) / 2  # ... delivered as one burst


async def test_echo_header_sse(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    items, _, _ = await read_sse(
        client, upstream.url("/echo-header-sse?name=X-Secret"), {"X-Secret": "hunter2"}
    )
    datas = [json.loads(e.data or "") for e in events_of(items)]
    assert [d["seq"] for d in datas] == [1, 2, 3]
    assert {d["value"] for d in datas} == {"hunter2"}
    assert {d["header"] for d in datas} == {"X-Secret"}


async def test_a_repeated_header_is_read_as_its_first_value(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    items, _, _ = await read_sse(
        client, upstream.url("/echo-header-sse?name=X-Dup&interval_ms=0"),
        [("X-Dup", "first"), ("x-dup", "second")],
    )
    assert {json.loads(e.data or "")["value"] for e in events_of(items)} == {"first"}


async def test_an_absolute_target_without_a_path_asks_for_the_root(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    async with stream:
        await stream.send_all(b"GET http://x?count=1&interval_ms=0 HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/event-stream" in raw
    assert (await stats(client, upstream))["paths"] == {"/": 1, "/stats": 1}


# ---------------------------------------------------------------- plain routes


async def test_echo(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    r = await client.request(
        "PUT",
        upstream.url("/echo/some/where?x=1&y=%20"),
        headers={"X-Mixed-Case": "Value One"},
        content=b"hello body",
    )
    assert r.status_code == 200
    d = r.json()
    assert d["method"] == "PUT"
    assert d["path"] == "/echo/some/where?x=1&y=%20"
    assert ["X-Mixed-Case", "Value One"] in d["headers"]
    assert d["body"] == "hello body"
    assert d["body_sha256"] == hashlib.sha256(b"hello body").hexdigest()


async def test_bytes(upstream: UpstreamServer, client: httpx.AsyncClient) -> None:
    n = 300_000
    r = await client.get(upstream.url(f"/bytes?n={n}&chunk=7000"))
    assert r.status_code == 200
    assert r.headers["content-length"] == str(n)
    assert r.content == pattern_bytes(n)
    assert r.content[:32] == hashlib.sha256((0).to_bytes(8, "big")).digest()
    assert r.content[32:64] == hashlib.sha256((1).to_bytes(8, "big")).digest()
    assert pattern_bytes(10, 5) == pattern_bytes(15)[5:]
    big = pattern_bytes(3 << 20)
    assert big[1 << 20 : (1 << 20) + 64] == big[:64]  # period 1 MiB
    assert pattern_bytes(100, (1 << 20) - 50) == big[(1 << 20) - 50 : (1 << 20) + 50]


async def test_status_slow_and_keepalive(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(upstream.url("/status/418"))
    assert r.status_code == 418 and r.reason_phrase == "I'm a Teapot"
    r = await client.get(upstream.url("/status/204"))
    assert r.status_code == 204 and r.content == b""
    t0 = trio.current_time()
    r = await client.get(upstream.url("/slow?delay_ms=100"))
    assert r.status_code == 200 and trio.current_time() - t0 >= 0.1
    s = await stats(client, upstream)
    assert s["total_connections"] == 1  # one kept-alive connection served all of them
    assert s["total_requests"] == 4


async def test_stats_count_a_cancelled_stream(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    parser = SseParser()
    async with client.stream("GET", upstream.url("/sse-forever?interval_ms=20")) as resp:
        got: list[Event | Comment] = []
        async for chunk in resp.aiter_raw():
            got += parser.feed(chunk)
            if len(got) >= 2:
                break
        s = await stats(client, upstream)
        assert s["open_streams"] == 1
    s = await poll_stats(client, upstream, open_streams=0, cancelled_streams=1)
    assert s["completed_streams"] == 0


async def test_hang_ends_when_client_goes_away(
    upstream: UpstreamServer, client: httpx.AsyncClient
) -> None:
    with trio.move_on_after(0.2):
        await client.get(upstream.url("/hang"))
        raise AssertionError("/hang answered")
    await poll_stats(client, upstream, open_requests=1, cancelled_requests=1)
    r = await client.post(upstream.url("/stats/reset"))
    assert r.json()["total_requests"] == 0


def test_module_entry_point() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "carapace.debug.upstream", "--port", str(port)]
    with running(argv, port=port) as proc:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/check", trust_env=False)
        assert r.status_code == 200
        assert proc.poll() is None
        assert f"http://127.0.0.1:{port}" in proc.stdout_text()
