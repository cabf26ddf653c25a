"""Garbage and half-open connections on every port while the real agent keeps working."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import httpx

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import deployment, rss_kib


def attack(port: int, kind: str, rng: random.Random) -> socket.socket | None:
    """One hostile connection; half-open ones are returned so they stay open."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None
    try:
        if kind == "garbage":
            s.sendall(os.urandom(rng.randint(1, 4096)))
            s.close()
            return None
        if kind == "huge-prefix":
            s.sendall(struct.pack(">I", rng.randint(2**24 + 1, 2**32 - 1)) + b"x" * 100)
            s.close()
            return None
        if kind == "partial-http":
            s.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100)
            return s
        return s  # "silent": connect and say nothing
    except OSError:
        s.close()
        return None


def test_hostile_connections_never_disturb_the_real_agent(tmp_path: Path) -> None:
    with deployment(tmp_path, server_args=["--handshake-timeout", "1"],
                    agent_args=["--header-timeout", "1"]) as d:
        assert d.server is not None and d.agent is not None
        ids: list[str] = []
        errors: list[str] = []

        def stream() -> None:
            parser = SseParser()
            try:
                with httpx.stream("GET", d.url("/sse?count=300&interval_ms=10"),
                                  timeout=30) as r:
                    for chunk in r.iter_raw():
                        ids.extend(e.id or "" for e in parser.feed(chunk)
                                   if isinstance(e, Event) and e.data)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

        reader = threading.Thread(target=stream)
        reader.start()
        server_before, agent_before = rss_kib(d.server.pid), rss_kib(d.agent.pid)
        rng = random.Random(1234)
        held: list[socket.socket] = []
        ports = [d.server_port, d.tool_ports["signal-cli"]]
        for n in range(300):
            kind = ("garbage", "huge-prefix", "partial-http", "silent")[n % 4]
            s = attack(ports[n % 2], kind, rng)
            if s is not None:
                held.append(s)
        # Meanwhile ordinary requests are answered.
        r = httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version",
                                                   "id": 1})
        assert r.status_code == 200
        reader.join(30)
        assert not errors, errors
        assert ids == [str(i) for i in range(1, 301)]
        # The timeouts close every half-open connection by themselves.
        deadline = time.monotonic() + 10
        for s in held:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
            finally:
                s.close()
        assert time.monotonic() < deadline, "half-open connections were not closed in time"
        assert d.server.poll() is None and d.agent.poll() is None
        assert rss_kib(d.server.pid) - server_before < 30_000
        assert rss_kib(d.agent.pid) - agent_before < 30_000
