"""HTTP tools end to end: real upstream, server and agent processes on loopback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest
import trio

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, deployment, rss_kib


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(
        tmp_path_factory.mktemp("dep"), agent_args=["--sse-keepalive", "0.3"]
    ) as d:
        yield d


def events_of(body: bytes) -> list[Event]:
    parser = SseParser()
    items = parser.feed(body) + parser.close()
    return [e for e in items if isinstance(e, Event)]


def test_jsonrpc_call_returns_upstream_answer(dep: Deployment) -> None:
    r = httpx.post(dep.url("/api/v1/rpc"),
                   json={"jsonrpc": "2.0", "method": "version", "id": 7})
    assert r.status_code == 200
    assert r.json() == {"jsonrpc": "2.0", "result": {"version": "0.13.x-fake"}, "id": 7}
    batch = [{"jsonrpc": "2.0", "method": "version", "id": 1},
             {"jsonrpc": "2.0", "method": "send", "id": 2, "params": {"message": "hi"}}]
    r = httpx.post(dep.url("/api/v1/rpc"), json=batch)
    assert [item["id"] for item in r.json()] == [1, 2]


def test_sse_stream_complete_in_order_with_fields_intact(dep: Deployment) -> None:
    with httpx.stream("GET", dep.url("/sse?count=300&interval_ms=5&multiline=1&event=tick"),
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        body = b"".join(r.iter_raw())
    events = [e for e in events_of(body) if e.data is not None]
    assert [e.id for e in events] == [str(i) for i in range(1, 301)]
    assert all(e.event == "tick" for e in events)
    first = events[0].data
    assert first is not None and first.count("\n") == 2  # three data lines joined by LF
    payload = json.loads(first.replace("\n", ""))
    assert payload["seq"] == 1


def test_upstream_sse_with_crlf_and_comments_is_normalised(dep: Deployment) -> None:
    r = httpx.get(dep.url("/sse?count=5&interval_ms=1&crlf=1&comment=1"), timeout=10)
    assert b"\r" not in r.content
    assert [e.id for e in events_of(r.content) if e.data] == ["1", "2", "3", "4", "5"]


def test_last_event_id_is_forwarded(dep: Deployment) -> None:
    r = httpx.get(dep.url("/sse?count=10&interval_ms=1"), headers={"Last-Event-ID": "7"},
                  timeout=10)
    assert [e.id for e in events_of(r.content) if e.data] == ["8", "9", "10"]


async def test_twenty_concurrent_streams_all_complete(dep: Deployment) -> None:
    results: dict[int, list[str | None]] = {}

    async def one(client: httpx.AsyncClient, n: int) -> None:
        async with client.stream("GET", dep.url("/sse?count=50&interval_ms=5")) as r:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
        results[n] = [e.id for e in events_of(body) if e.data]

    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, client, n)
    assert len(results) == 20
    assert all(ids == [str(i) for i in range(1, 51)] for ids in results.values())


def test_stalled_reader_does_not_delay_others_and_memory_stays_bounded(
    dep: Deployment,
) -> None:
    assert dep.agent is not None and dep.server is not None
    agent_before = rss_kib(dep.agent.pid)
    server_before = rss_kib(dep.server.pid)
    # A local client asks for 200 MB and then never reads a byte.
    stalled = socket.create_connection(("127.0.0.1", dep.tool_ports["signal-cli"]))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /bytes?n=200000000&chunk=65536 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        # Wait until the stalled response has filled the pipes (its headers arrive).
        assert stalled.recv(16)
        start = time.monotonic()
        r = httpx.get(dep.url("/sse?count=100&interval_ms=5"), timeout=20)
        elapsed = time.monotonic() - start
        assert [e.id for e in events_of(r.content) if e.data] == [str(i) for i in range(1, 101)]
        # 100 events at 5 ms take about 0.5 s; a blocked multiplexer would hit the timeout.
        assert elapsed < 15
        # Nothing buffers the stalled 200 MB: each side holds about one window.
        assert rss_kib(dep.agent.pid) - agent_before < 40_000
        assert rss_kib(dep.server.pid) - server_before < 40_000
    finally:
        stalled.close()


def test_client_disconnect_cancels_upstream_at_once(dep: Deployment) -> None:
    before = httpx.get(dep.upstream_url + "/stats").json()["cancelled_streams"]
    with httpx.stream("GET", dep.url("/sse-forever?interval_ms=50"), timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(dep.upstream_url + "/stats").json()["cancelled_streams"] > before:
            return
        time.sleep(0.02)
    pytest.fail("the upstream stream was not cancelled after the local client left")


def test_idle_sse_stream_gets_keepalive_comments(dep: Deployment) -> None:
    # The upstream sends event 1 at once, then nothing for 3 s.
    with httpx.stream("GET", dep.url("/sse?count=2&interval_ms=3000"), timeout=10) as r:
        chunks = r.iter_raw()
        assert b"id: 1" in next(chunks)
        assert next(chunks).startswith(b": keepalive")


def test_keep_alive_serves_several_requests_on_one_connection(dep: Deployment) -> None:
    sock = socket.create_connection(("127.0.0.1", dep.tool_ports["signal-cli"]), timeout=5)
    conn = h11.Connection(h11.CLIENT)
    try:
        for n in range(3):
            body = json.dumps({"jsonrpc": "2.0", "method": "version", "id": n}).encode()
            sock.sendall(conn.send(h11.Request(method="POST", target="/api/v1/rpc", headers=[
                ("Host", "x"), ("Content-Type", "application/json"),
                ("Content-Length", str(len(body)))])))
            sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            got = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    got += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert json.loads(got)["id"] == n
            conn.start_next_cycle()
    finally:
        sock.close()


def test_hop_by_hop_headers_are_not_forwarded(dep: Deployment) -> None:
    r = httpx.get(dep.url("/echo/x?y=1"), headers={
        "Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "X-Kept": "yes"})
    seen = {name.lower(): value for name, value in r.json()["headers"]}
    assert r.json()["path"] == "/echo/x?y=1"
    assert seen["x-kept"] == "yes"
    assert "keep-alive" not in seen and "te" not in seen and "x-private" not in seen


def test_large_body_arrives_intact(dep: Deployment) -> None:
    r = httpx.get(dep.url("/bytes?n=5000000&chunk=65536"), timeout=30)
    direct = httpx.get(dep.upstream_url + "/bytes?n=5000000&chunk=65536", timeout=30)
    assert r.status_code == 200
    assert r.content == direct.content


def test_unknown_tool_route_and_upstream_status_pass_through(dep: Deployment) -> None:
    r = httpx.get(dep.url("/status/418"))
    assert r.status_code == 418


def test_client_that_never_finishes_headers_is_closed(tmp_path: Path) -> None:
    with deployment(tmp_path, agent_args=["--header-timeout", "0.5"]) as d:
        slow = socket.create_connection(("127.0.0.1", d.tool_ports["signal-cli"]), timeout=10)
        slow.sendall(b"GET /api/v1/check HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
        # Meanwhile everyone else is served.
        assert httpx.get(d.url("/api/v1/check")).status_code == 200
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        slow.close()


def test_pipelined_requests_on_one_connection_are_answered_in_order(dep: Deployment) -> None:
    """Three requests in one write: the agent's connection reader keeps what comes after
    the first while it is being answered, and each gets its own answer, in order."""
    port = dep.tool_ports["signal-cli"]
    wire = b"".join(f"GET /echo?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in (1, 2, 3))
    answers: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire)
        leftover = b""
        for n in (1, 2, 3):
            client = h11.Connection(h11.CLIENT)  # one per answer: h11 does not pipeline
            client.send(h11.Request(method="GET", target=f"/echo?n={n}", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
            if leftover:  # (b"" would tell h11 the connection closed)
                client.receive_data(leftover)
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            answers.append(int(json.loads(body)["path"].split("n=")[1]))
            leftover = client.trailing_data[0]
    assert answers == [1, 2, 3]
