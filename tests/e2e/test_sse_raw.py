"""Event blocks that need no rewriting travel as bytes (``sse_raw``) end to end: the client
gets every event intact and in order, and the metrics and the audit count them exactly."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, deployment
from helpers.jsonlines import read_records
from helpers.procs import free_port, poll


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("raw")
    debug_port = free_port()
    audit = tmp / "audit.jsonl"
    with deployment(tmp, server_args=["--debug-listen", f"127.0.0.1:{debug_port}",
                                      "--audit-log", str(audit)]) as d:
        d.debug_port = debug_port
        d.extra["audit_log"] = audit
        yield d


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(d: Deployment) -> Metrics:
    r = httpx.get(f"http://127.0.0.1:{d.debug_port}/metrics", timeout=5)
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def frames(m: Metrics, kind: str) -> float:
    return m.get(("carapace_frames_total", (("direction", "out"), ("type", kind))), 0.0)


def events_of(body: bytes) -> list[Event]:
    parser = SseParser()
    return [i for i in [*parser.feed(body), *parser.close()] if isinstance(i, Event)]


def completions(audit: Path) -> list[dict[str, object]]:
    """The completion records of the event streams (``GET /sse``), oldest first."""
    records = read_records(audit)
    ids = {r["request_id"] for r in records
           if r["event"] == "decision" and r.get("path") == "/sse"}
    return [r for r in records if r["event"] == "completion" and r["request_id"] in ids]


@pytest.mark.parametrize("variant", ["", "&crlf=1", "&multiline=1&event=tick"])
def test_events_travel_as_bytes_and_are_counted_exactly(dep: Deployment, variant: str) -> None:
    before = metrics(dep)
    audited = len(completions(dep.extra["audit_log"]))  # type: ignore[arg-type]
    path = f"/sse?count=30&interval_ms=1&comment=1{variant}"
    r = httpx.get(dep.url(path), timeout=20)
    assert r.status_code == 200 and b"\r" not in r.content
    events = events_of(r.content)
    assert [e.id for e in events] == [str(i) for i in range(1, 31)]
    assert all(e.data and e.data.startswith("{") for e in events)
    if "event=tick" in variant:
        assert all(e.event == "tick" for e in events)
    after = metrics(dep)
    counted = after[("carapace_sse_events_total", ())] - before.get(
        ("carapace_sse_events_total", ()), 0.0)
    assert counted == 30
    assert frames(after, "sse_raw") > frames(before, "sse_raw")
    assert frames(after, "sse_event") == frames(before, "sse_event")
    assert frames(after, "sse_events") == frames(before, "sse_events")
    audit: Path = dep.extra["audit_log"]  # type: ignore[assignment]
    done = poll(lambda: completions(audit)[audited:], 10, "the completion record")
    assert [r["events"] for r in done] == [30]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_the_local_framing_is_what_the_client_speaks(dep: Deployment, version: str) -> None:
    """Events are chunk-framed by the agent itself for an HTTP/1.1 client (h11 checks the
    framing here) and sent close-delimited to an HTTP/1.0 one."""
    port = dep.tool_ports["signal-cli"]
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /sse?count=20&interval_ms=1 HTTP/{version}\r\n"
                     "Host: x\r\n\r\n".encode())
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                chunked = (b"transfer-encoding", b"chunked") in list(event.headers)
                assert chunked == (version == "1.1")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert [e.id for e in events_of(body)] == [str(i) for i in range(1, 21)]


def test_a_client_that_reads_slowly_still_gets_every_event_whole_and_in_order(
        dep: Deployment) -> None:
    """Events are written to the client straight from the link reader while the relay
    waits; a client that reads in small pieces fills its socket, so writes are cut short
    and the relay task finishes them: nothing is lost, doubled or reordered."""
    port = dep.tool_ports["signal-cli"]
    count = 2000
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(f"GET /sse-flood?count={count}&size=300 HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(1024))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert [e.id for e in events_of(bytes(body))] == [str(i) for i in range(1, count + 1)]
