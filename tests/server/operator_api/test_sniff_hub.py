"""The server's sniff hub in-process: bounded queues that drop, never block, and say so."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace
from typing import Any

import httpx

from carapace.protocol.messages import Data, End, HttpRequest, Ping
from carapace.protocol.summary import SummaryFilter
from carapace.server.metrics import ServerMetrics
from carapace.server.operator_api import SniffHub, is_loopback
from helpers.deployment import Deployment
from helpers.operator import get_json
from helpers.procs import poll


class FakeSession:
    def __init__(self, agent: str) -> None:
        self.agent = agent


class FakePolicy:
    tools: dict[str, Any] = {"signal-cli": object()}

    def secrets(self) -> list[bytes]:
        return [b"the-policy-secret-42"]


def make_hub(queue_size: int) -> tuple[SniffHub, ServerMetrics]:
    policy = FakePolicy()
    server: Any = SimpleNamespace(
        policy=policy, sessions={}, frame_observers=[],
        secrets=lambda: [b"agent-token-0123456789", *policy.secrets()])
    metrics = ServerMetrics(server)
    return SniffHub(server, metrics, queue_size=queue_size), metrics


def decode(chunk: bytes) -> tuple[str | None, dict[str, Any]]:
    event = None
    data = ""
    for line in chunk.decode().splitlines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
    return event, json.loads(data)


async def test_full_queue_drops_and_reports_the_drops() -> None:
    hub, metrics = make_hub(queue_size=4)
    session: Any = FakeSession("vm")
    sub = hub.subscribe(SummaryFilter())
    start = time.monotonic()
    for _ in range(100):
        hub.observe(session, "out", Data(id=1, data=b"x" * 100))
    assert time.monotonic() - start < 1.0
    assert sub.dropped == 96 and metrics.sniff_dropped == 96
    got = [decode(sub.receive.receive_nowait()) for _ in range(4)]
    assert all(event is None and rec["type"] == "data" for event, rec in got)
    hub.observe(session, "out", End(id=1))  # room again: first the drop report, then the frame
    event, rec = decode(sub.receive.receive_nowait())
    assert event == "dropped" and rec["type"] == "dropped" and rec["dropped"] == 96
    event, rec = decode(sub.receive.receive_nowait())
    assert rec["type"] == "end"
    hub.unsubscribe(sub)
    assert metrics.sniff_subscribers == 0


async def test_filters_tool_tracking_and_redaction() -> None:
    hub, _ = make_hub(queue_size=100)
    session: Any = FakeSession("vm")
    only_end = hub.subscribe(SummaryFilter(types=frozenset({"end"}), tool="signal-cli"))
    everything = hub.subscribe(SummaryFilter())
    hub.observe(session, "in", HttpRequest(
        id=3, tool="signal-cli", method="POST", target="/x",
        headers=((b"X-Note", b"agent-token-0123456789"),),
        body=b"the-policy-secret-42 is here"))
    hub.observe(session, "out", Ping(nonce=1))
    hub.observe(session, "out", End(id=3))
    _, rec = decode(only_end.receive.receive_nowait())
    assert (rec["type"], rec["tool"], rec["agent"], rec["id"]) == ("end", "signal-cli", "vm", 3)
    texts = [everything.receive.receive_nowait().decode() for _ in range(3)]
    assert "agent-token" not in "".join(texts) and "the-policy-secret" not in "".join(texts)
    assert "[REDACTED] is here" in texts[0]


async def test_observer_never_raises() -> None:
    hub, _ = make_hub(queue_size=10)
    sub = hub.subscribe(SummaryFilter())
    hub.observe(object(), "in", End(id=1))  # type: ignore[arg-type]  # not weakref-able
    assert sub.dropped == 0


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_a_stalled_sniff_client_does_not_slow_the_tunnel(dep: Deployment) -> None:
    """A client that subscribes and never reads: the stream runs at full speed anyway."""
    before = get_json(dep, "/debug/health")["sniff"]["dropped"]
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", dep.debug_port or 0))
    try:
        stalled.sendall(b"GET /debug/sniff HTTP/1.1\r\nHost: x\r\n\r\n")
        poll(lambda: get_json(dep, "/debug/health")["sniff"]["subscribers"] >= 1,
             what="the stalled subscriber")
        start = time.monotonic()
        # One event per millisecond: one frame each, however fast the tunnel batches a
        # burst, so the records overflow the stalled subscriber's queue for sure.
        r = httpx.get(dep.url("/sse?count=3000&interval_ms=1&size=200"), timeout=30)
        took = time.monotonic() - start
        assert r.text.count("data:") == 3000
        health = get_json(dep, "/debug/health")
        assert health["sniff"]["dropped"] > before, health["sniff"]
        assert took < 15, took
    finally:
        stalled.close()
    poll(lambda: get_json(dep, "/debug/health")["sniff"]["subscribers"] == 0,
         what="the stalled subscriber to be gone")
    assert dep.server is not None and dep.server.poll() is None  # and the server is fine
