"""A hostile VM cannot make the server hold unbounded memory, before or after it authenticates.

Each test starts a real server and agent, attacks the server's agent port
with a raw link, and checks three things: the attacker is cut off (or held
back by credit), the server's resident memory stays bounded (its peak,
VmHWM, from /proc), and the well-behaved agent is still served.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from carapace.protocol.framing import encode
from carapace.protocol.messages import (
    Ack,
    Cancel,
    CliRequest,
    Credit,
    Data,
    HttpRequest,
    Ping,
)
from helpers.deployment import Deployment, deployment, free_port, rpc, start_agent
from helpers.jsonlines import read_records
from helpers.procs import poll, stop_process
from helpers.rawlink import RawLink

MIB = 1024 * 1024

POLICY = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    timeout_secs: 5
  sleeper:
    type: cli
    binary: /bin/sleep
    argv_allow_patterns: ["*"]
    timeout_secs: 30
"""


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def served(d: Deployment) -> None:
    r = rpc(d, "version")
    assert r.status_code == 200, r.text
    assert d.server is not None and d.server.poll() is None


def limit_records(d: Deployment, limit: str) -> list[dict[str, object]]:
    audit = d.tmp / "audit.jsonl"
    return [r for r in read_records(audit)
            if r.get("event") == "limit" and r.get("limit") == limit]


def metric(d: Deployment, name: str, **labels: str) -> float:
    r = httpx.get(f"http://127.0.0.1:{d.debug_port}/metrics", timeout=5)
    total = 0.0
    for line in r.text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def hostile(tmp_path: Path, *server_args: str) -> Iterator[Deployment]:
    """A fresh deployment (so peak memory is this test's) with an audit log and metrics."""
    debug_port = free_port()
    with deployment(tmp_path, policy=POLICY, server_args=[
            "--audit-log", str(tmp_path / "audit.jsonl"),
            "--debug-listen", f"127.0.0.1:{debug_port}", *server_args]) as d:
        d.debug_port = debug_port
        yield d


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the server from another loopback address (another 'host')."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (whatever it said before); never blocks."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_huge_hello_is_refused_from_its_length_prefix(tmp_path: Path) -> None:
    with hostile(tmp_path, "--handshake-timeout", "20") as d:
        # A hello whose versions list has 16 M entries: a valid msgpack map of ~16 MiB.
        count = 16 * MIB - 64
        payload = (b"\x85\xa1t\xa5hello\xa8versions\xdd" + struct.pack(">I", count)
                   + b"\x01" * count)
        link = RawLink(d.server_port, timeout=3)
        start = time.monotonic()
        link.send_raw(struct.pack(">I", len(payload)) + payload[:64 * 1024])
        # Closed without waiting for (or decoding) the rest, long before the handshake timeout.
        assert link.closed_by_peer()
        assert time.monotonic() - start < 2
        assert metric(d, "carapace_unauthenticated_refused_total", reason="handshake_frame") == 1
        served(d)


def test_unauthenticated_connections_are_capped(tmp_path: Path) -> None:
    with hostile(tmp_path, "--handshake-timeout", "20", "--max-unauthenticated", "8",
                 "--max-unauthenticated-per-address", "3") as d:
        port = d.server_port
        flood = [connect_from("127.0.0.2", port) for _ in range(30)]
        # Three are held (waiting for a hello); the rest are closed at once.
        poll(lambda: sum(closed_by_server(s) for s in flood) >= 27, 5,
             "the connections over the per-address cap to be closed")
        assert sum(closed_by_server(s) for s in flood) == 27
        # Another agent, from another address, still gets in and is served.
        (d.tmp / "prober-token").write_text(f"prober:{d.prober_token}\n")
        first_agent_ports, d.tool_ports = d.tool_ports, {"signal-cli": free_port()}
        prober = start_agent(d, token_file=d.tmp / "prober-token")
        try:
            poll(lambda: rpc(d, "version").status_code == 200, 10, "the second agent to connect")
        finally:
            stop_process(prober)
            d.tool_ports = first_agent_ports
        # The overall cap: more addresses fill it; past it everyone is turned away.
        more = [connect_from(f"127.0.0.{n}", port) for n in (3, 4) for _ in range(3)]
        late = [connect_from("127.0.0.9", port) for _ in range(3)]
        poll(lambda: all(closed_by_server(s) for s in late), 5, "connections over the overall cap")
        assert sum(closed_by_server(s) for s in more) <= 1  # 3 + 5 of 8 held
        assert metric(d, "carapace_unauthenticated_refused_total", reason="per_address") >= 27
        assert metric(d, "carapace_unauthenticated_refused_total", reason="total") >= 3
        # One log line per burst, not one per connection.
        assert d.server is not None
        assert d.server.stderr_text().count("unauthenticated connections") <= 3
        for s in flood + more + late:
            s.close()
        served(d)


def test_ping_flood_with_pongs_unread_cuts_the_attacker_off(tmp_path: Path) -> None:
    with hostile(tmp_path, "--max-link-queue", str(4 * MIB)) as d:
        assert d.server is not None
        before = peak_rss_kib(d.server.pid)
        link = RawLink(d.server_port)
        link.handshake("prober", d.prober_token.encode())
        link.sock.settimeout(10)  # on a loaded machine the server may take a while to read
        burst = b"".join(encode(Ping(nonce=n)) for n in range(4096))
        deadline = time.monotonic() + 15
        cut_off = False
        while time.monotonic() < deadline:
            try:
                link.sock.sendall(burst)
            except OSError as exc:
                assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
                cut_off = True
                break
        assert cut_off, "the server kept answering pings nobody reads"
        grown = peak_rss_kib(d.server.pid) - before
        assert grown < 100 * 1024, f"server grew by {grown} KiB"
        # Cut at the ping budget, long before the link queue's bound could fill.
        records = poll(lambda: [r for r in limit_records(d, "protocol")
                                if "pings a second" in str(r.get("detail", ""))],
                       5, "a protocol limit record naming the ping flood")
        assert records
        assert metric(d, "carapace_limit_hits_total", limit="link_queue") == 0
        served(d)


def test_stdin_flood_to_processes_that_do_not_read_is_cut_off(tmp_path: Path) -> None:
    with hostile(tmp_path, "--agent-memory-limit", str(32 * MIB)) as d:
        assert d.server is not None
        before = peak_rss_kib(d.server.pid)
        link = RawLink(d.server_port)
        welcome = link.handshake("prober", d.prober_token.encode())
        chunk = b"x" * (16 * MIB)
        cut_off = False
        try:
            for rid in range(1, 31):
                link.send(CliRequest(id=rid, tool="sleeper", argv=(b"50",), cwd=b"/", env=(),
                                     tty=(False, False, False)))
                # One frame up to the cap is allowed while the stream has credit...
                link.send(Data(id=rid, data=chunk[: welcome.max_frame - 64]))
        except (BrokenPipeError, ConnectionResetError):
            cut_off = True
        if not cut_off:
            link.sock.settimeout(5)
            cut_off = link.closed_by_peer()
        assert cut_off, "the server kept taking stdin that nobody reads"
        grown = peak_rss_kib(d.server.pid) - before
        assert grown < 200 * 1024, f"server grew by {grown} KiB"
        poll(lambda: limit_records(d, "agent_memory"), 5, "an agent_memory limit record")
        served(d)


def test_stdin_beyond_the_credit_window_is_cut_off(tmp_path: Path) -> None:
    with hostile(tmp_path, "--agent-memory-limit", str(32 * MIB)) as d:
        link = RawLink(d.server_port)
        welcome = link.handshake("prober", d.prober_token.encode())
        link.send(CliRequest(id=1, tool="sleeper", argv=(b"50",), cwd=b"/", env=(),
                             tty=(False, False, False)))
        small = b"y" * 1024
        try:
            # Small frames, far past the window that was granted, with no credit back.
            for _ in range(4 * welcome.window // len(small)):
                link.send(Data(id=1, data=small))
        except (BrokenPipeError, ConnectionResetError):
            pass
        link.sock.settimeout(3)
        assert link.closed_by_peer()
        served(d)


def test_a_request_body_past_the_agent_budget_is_refused_clearly(tmp_path: Path) -> None:
    with hostile(tmp_path, "--agent-memory-limit", str(MIB)) as d:
        r = httpx.post(d.url("/echo"), content=b"z" * (2 * MIB), timeout=10)
        assert r.status_code == 503, r.text
        assert "--agent-memory-limit" in r.json()["message"]
        poll(lambda: limit_records(d, "agent_memory"), 5, "an agent_memory limit record")
        served(d)  # the agent's session goes on


def test_silent_connections_time_out_without_a_line_or_record_each(tmp_path: Path) -> None:
    with hostile(tmp_path, "--handshake-timeout", "0.5") as d:
        silent = [connect_from("127.0.0.5", d.server_port) for _ in range(20)]
        poll(lambda: all(closed_by_server(s) for s in silent), 10, "the handshake timeouts")
        assert metric(d, "carapace_unauthenticated_refused_total",
                      reason="handshake_timeout") == 20
        assert d.server is not None
        assert d.server.stderr_text().count("unauthenticated connections") <= 2
        assert not limit_records(d, "handshake_timeout")
        for s in silent:
            s.close()
        served(d)


def test_data_frames_to_an_http_request_past_its_window_are_cut_off(tmp_path: Path) -> None:
    with hostile(tmp_path) as d:
        assert d.server is not None
        before = peak_rss_kib(d.server.pid)
        link = RawLink(d.server_port)
        welcome = link.handshake("prober", d.prober_token.encode())
        link.send(HttpRequest(id=1, tool="signal-cli", method="GET", target="/hang",
                              headers=(), body=b""))
        chunk = Data(id=1, data=b"d" * 65536)
        try:
            # Nobody reads these (an HTTP request takes no data frames): credit never returns.
            for _ in range(4 * welcome.window // 65536):
                link.send(chunk)
                # ...and credit the agent grants itself, and acks, change nothing.
                link.send(Credit(id=1, amount=1 << 30))
                link.send(Ack(received=0))
        except (BrokenPipeError, ConnectionResetError):
            pass
        link.sock.settimeout(3)
        assert link.closed_by_peer()
        assert peak_rss_kib(d.server.pid) - before < 50 * 1024
        poll(lambda: limit_records(d, "protocol"), 5, "a protocol limit record")
        served(d)


def test_undrained_stdin_shows_in_the_agent_memory_gauge_until_the_request_ends(
        tmp_path: Path) -> None:
    with hostile(tmp_path) as d:
        link = RawLink(d.server_port)
        link.handshake("prober", d.prober_token.encode())
        link.send(CliRequest(id=1, tool="sleeper", argv=(b"50",), cwd=b"/", env=(),
                             tty=(False, False, False)))
        link.send(Data(id=1, data=b"s" * (200 * 1024)))  # within the window; never read

        def held() -> float:
            return metric(d, "carapace_agent_memory_bytes", agent="prober")

        poll(lambda: held() >= 200 * 1024, 5, "the undrained stdin to be counted")
        link.send(Cancel(id=1, reason="done"))
        poll(lambda: held() < 64 * 1024, 5, "the cancelled request's stdin to be released")
        link.close()
        served(d)
