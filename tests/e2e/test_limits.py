"""Every limit answers the offender clearly and leaves everyone else served."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx

from carapace.protocol.messages import Reject
from helpers.deployment import Deployment, deployment
from helpers.jsonlines import read_records
from helpers.rawlink import RawLink


def served(d: Deployment) -> None:
    r = httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version", "id": 1})
    assert r.status_code == 200, r.text


def limit_records(audit: Path, limit: str) -> list[dict[str, object]]:
    records = read_records(audit)
    return [r for r in records if r.get("event") == "limit" and r.get("limit") == limit]


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return answer


def test_local_http_header_and_body_limits(tmp_path: Path) -> None:
    with deployment(tmp_path, agent_args=["--max-header-bytes", "4096",
                                          "--max-body-bytes", "10000"]) as d:
        port = d.tool_ports["signal-cli"]
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
        assert raw_request(port, huge).startswith(b"HTTP/1.1 431")
        r = httpx.post(d.url("/echo"), content=b"x" * 20000)
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        served(d)


def test_request_larger_than_the_server_frame_limit_is_refused_locally(tmp_path: Path) -> None:
    with deployment(tmp_path, server_args=["--max-frame", "65536"]) as d:
        r = httpx.post(d.url("/echo"), content=b"x" * 100_000)
        assert r.status_code == 413
        assert "frame limit" in r.json()["message"]
        served(d)  # the link survived: the agent never sent the oversized frame


def test_concurrent_requests_per_agent_limit(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--max-requests-per-agent", "2",
                                           "--audit-log", str(audit)]) as d:
        stop = threading.Event()

        def hold() -> None:
            with httpx.stream("GET", d.url("/sse-forever?interval_ms=50"), timeout=30) as r:
                for _ in r.iter_raw():
                    if stop.is_set():
                        return

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(d.upstream_url + "/stats").json()["open_streams"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(d.url("/api/v1/check"))
        assert r.status_code == 503 and r.json()["error"] == "too_many_requests"
        assert "--max-requests-per-agent" in r.json()["message"]
        stop.set()
        for t in holders:
            t.join(10)
        deadline = time.monotonic() + 10
        while httpx.get(d.url("/api/v1/check")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert d.server is not None
        assert "hit the limit of 2 concurrent requests" in d.server.stderr_text()
        assert limit_records(audit, "max_requests_per_agent")


def test_max_agents_refuses_one_more_agent(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--max-agents", "1", "--audit-log", str(audit)]) as d:
        link = RawLink(d.server_port)
        import os

        from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake

        hs = AgentHandshake("prober", d.prober_token.encode(), os.urandom(NONCE_SIZE))
        link.send(hs.hello())
        challenge = link.receive()
        link.send(hs.on_challenge(challenge))  # type: ignore[arg-type]
        answer = link.receive()
        assert isinstance(answer, Reject) and answer.code == "limit"
        assert "--max-agents" in answer.message
        assert [r["agent"] for r in limit_records(audit, "max_agents")] == ["prober"]
        served(d)


def test_silent_agent_link_is_closed_and_audited(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--idle-timeout", "1.5", "--audit-log", str(audit)],
                    agent_args=["--idle-timeout", "1.5"]) as d:
        link = RawLink(d.server_port, timeout=10)
        link.handshake("prober", d.prober_token.encode())
        # Never answer the server's pings: it must drop the link by itself.
        assert link.closed_by_peer()
        assert [r["agent"] for r in limit_records(audit, "idle_timeout")] == ["prober"]
        served(d)  # the real agent, which does answer, keeps its link
