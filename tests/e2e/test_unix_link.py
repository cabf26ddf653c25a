"""The agent link over a unix socket (a VM or container with no network) and over vsock.

Real processes: the test upstream, ``carapace-server --listen unix:…`` and a
``carapace-agent --server unix:…`` whose link runs through a unix forwarder
the tests can cut. HTTP, SSE, tool shims, resumption, TLS, and what the
operator sees all work as over TCP, and say which transport they came by.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import wait_until_tunnel_up
from helpers.forwarder import UnixForwarder
from helpers.procs import (
    CapturedProcess,
    free_port,
    run_debug,
    running,
    script,
    start_process,
    stop_process,
    wait_for_port,
    wait_until,
)
from helpers.rawlink import RawLink

TOKEN = "unix-link-token-0123456789abcdef"
PROBER_TOKEN = "unix-link-prober-0123456789abcdef"


@dataclass
class UnixDeployment:
    dir: Path
    server: CapturedProcess
    agent: CapturedProcess
    forwarder: UnixForwarder
    tool_port: int
    debug: str
    audit: Path

    @property
    def server_socket(self) -> str:
        return str(self.dir / "server.sock")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.tool_port}{path}"

    def shim(self, tool: str, *args: str, stdin: bytes = b""
             ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(self.dir / "bin" / tool), *args], input=stdin,
                              capture_output=True, timeout=30,
                              env={**os.environ,
                                   "CARAPACE_AGENT_SOCKET": str(self.dir / "cli.sock")})


def short_dir() -> Path:
    """A directory whose path leaves room for socket names (107 bytes at most)."""
    return Path(tempfile.mkdtemp(prefix="cpu-", dir="/tmp"))


def write_files(d: Path, upstream_port: int) -> None:
    (d / "tokens").write_text(f"default:{TOKEN}\nprober:{PROBER_TOKEN}\n")
    (d / "agent-token").write_text(f"default:{TOKEN}\n")
    for name in ("tokens", "agent-token"):
        (d / name).chmod(0o600)
    (d / "policy.yaml").write_text(textwrap.dedent(f"""\
        tools:
          signal-cli:
            type: http
            upstream: "http://127.0.0.1:{upstream_port}"
          echo:
            type: cli
            binary: /bin/echo
            argv_allow_patterns: ["*"]
          cat:
            type: cli
            binary: /bin/cat
            argv_allow_patterns: [""]
        """))


def start_server(d: Path, *args: str, env: dict[str, str] | None = None) -> CapturedProcess:
    return start_process([script("carapace-server"), "--policy", str(d / "policy.yaml"),
                          "--token-file", str(d / "tokens"), *args], env)


def wait_listening(server: CapturedProcess, what: str) -> None:
    wait_until(lambda: f"listening on {what}" in server.stderr_text() or
               server.poll() is not None, 15, f"the server to listen on {what}")
    assert server.poll() is None, server.output()


@pytest.fixture(scope="module")
def dep() -> Iterator[UnixDeployment]:
    d = short_dir()
    upstream_port, tool_port, debug_port = free_port(), free_port(), free_port()
    write_files(d, upstream_port)
    with running([sys.executable, "-m", "carapace.debug.upstream", "--port",
                  str(upstream_port)], port=upstream_port):
        server = start_server(d, "--listen", f"unix:{d}/server.sock",
                              "--debug-listen", f"127.0.0.1:{debug_port}",
                              "--audit-log", str(d / "audit.jsonl"))
        forwarder = agent = None
        try:
            wait_listening(server, f"unix:{d}/server.sock")
            forwarder = UnixForwarder(str(d / "fwd.sock"), str(d / "server.sock"))
            agent = start_process([
                script("carapace-agent"), "--server", f"unix:{d}/fwd.sock",
                "--token-file", str(d / "agent-token"), "--link-wait", "10",
                "--expose", f"signal-cli=127.0.0.1:{tool_port}",
                "--cli-socket", str(d / "cli.sock")])
            wait_for_port("127.0.0.1", tool_port, 15, proc=agent)
            wait_until_tunnel_up(f"http://127.0.0.1:{tool_port}/api/v1/check")
            shims = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                                    str(d / "bin"), "echo", "cat"], capture_output=True,
                                   text=True, timeout=30)
            assert shims.returncode == 0, shims.stderr
            yield UnixDeployment(d, server, agent, forwarder, tool_port,
                                 f"127.0.0.1:{debug_port}", d / "audit.jsonl")
        finally:
            for proc in (agent, server):
                if proc is not None:
                    stop_process(proc)
                    print(proc.output())
            if forwarder is not None:
                forwarder.close()
            shutil.rmtree(d, ignore_errors=True)


def read_events(url: str, out: list[Event], done: threading.Event,
                connections: list[int]) -> None:
    parser = SseParser()
    try:
        with httpx.stream("GET", url, timeout=60) as r:
            for chunk in r.iter_raw():
                out.extend(e for e in parser.feed(chunk) if isinstance(e, Event))
            out.extend(e for e in parser.close() if isinstance(e, Event))
        connections.append(1)
    finally:
        done.set()


def event_ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events if e.data is not None and e.id]


# -- the whole path over a unix link ----------------------------------------------------

def test_http_and_sse_cross_a_unix_link(dep: UnixDeployment) -> None:
    check = httpx.get(dep.url("/api/v1/check"), timeout=10)
    assert check.status_code == 200, check.text
    rpc = httpx.post(dep.url("/api/v1/rpc"), timeout=10,
                     json={"jsonrpc": "2.0", "method": "version", "id": 1})
    assert rpc.status_code == 200 and rpc.json()["id"] == 1
    events: list[Event] = []
    done = threading.Event()
    read_events(dep.url("/sse?count=20&interval_ms=1"), events, done, [])
    assert event_ids(events) == list(range(1, 21))


def test_tool_shims_run_over_a_unix_link(dep: UnixDeployment) -> None:
    echo = dep.shim("echo", "hello", "over", "unix")
    assert (echo.returncode, echo.stdout) == (0, b"hello over unix\n"), echo.stderr
    cat = dep.shim("cat", stdin=b"stdin crosses too\n" * 1000)
    assert (cat.returncode, cat.stdout) == (0, b"stdin crosses too\n" * 1000), cat.stderr


def test_sse_resumes_after_the_unix_link_is_cut(dep: UnixDeployment) -> None:
    resumed_before = dep.agent.stderr_text().count("resumed the session")
    lost_before = dep.agent.stderr_text().count("tunnel link lost")
    events: list[Event] = []
    done = threading.Event()
    connections: list[int] = []
    reader = threading.Thread(target=read_events, args=(
        dep.url("/sse?count=300&interval_ms=5"), events, done, connections))
    reader.start()
    wait_until(lambda: len(events) >= 50, 30, "the first 50 events")
    with dep.forwarder.outage():
        wait_until(lambda: dep.agent.stderr_text().count("tunnel link lost") > lost_before,
                   15, "the agent to notice the cut")
    assert done.wait(60), dep.agent.output()
    reader.join(5)
    assert event_ids(events) == list(range(1, 301))
    assert connections == [1], "the local client had to reconnect"
    assert dep.agent.stderr_text().count("resumed the session") > resumed_before, \
        dep.agent.output()


def test_connections_metrics_logs_and_audit_name_the_unix_transport(
        dep: UnixDeployment) -> None:
    shown = run_debug("connections", "--debug", dep.debug, "--json")
    assert shown.returncode == 0, shown.stderr
    (agent,) = [a for a in json.loads(shown.stdout)["agents"] if a["name"] == "default"]
    # The forwarder (this test process) is the agent's peer on the server's socket.
    assert agent["address"] == f"unix:{dep.server_socket} pid={os.getpid()} uid={os.getuid()}"
    assert agent["transport"] == "unix"
    metrics = httpx.get(f"http://{dep.debug}/metrics", timeout=10).text
    assert 'carapace_transport_connections_total{transport="unix"}' in metrics
    assert 'transport="tcp"' not in metrics
    assert f"agent default connected from unix:{dep.server_socket}" in dep.server.stderr_text()
    assert f"at unix:{dep.dir}/fwd.sock as agent default" in dep.agent.stderr_text()
    # A hostile peer on the socket: the limit record says where it came from.
    raw = RawLink(0, unix_path=dep.server_socket)
    try:
        raw.handshake("prober", PROBER_TOKEN.encode())
        raw.send_raw(b"\x00\x00\x00\x03abc")  # not msgpack: a protocol error
        assert raw.closed_by_peer()
    finally:
        raw.close()

    def protocol_record() -> dict[str, object] | None:
        for line in dep.audit.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "limit" and record.get("agent") == "prober":
                return record  # type: ignore[no-any-return]
        return None

    wait_until(protocol_record, 10, "the protocol limit record")
    record = protocol_record()
    assert record is not None
    assert record["peer"] == f"unix:{dep.server_socket} pid={os.getpid()} uid={os.getuid()}"


# -- the unix listener itself -----------------------------------------------------------

def test_unix_listener_mode_stale_file_and_removal_on_exit() -> None:
    d = short_dir()
    try:
        write_files(d, free_port())
        path = d / "server.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))  # a crashed server's socket: nobody listens on it
        stale.close()
        port = free_port()
        # CARAPACE_LISTEN takes several addresses, separated by spaces.
        server = start_server(d, "--unix-socket-mode", "0600", env={
            "CARAPACE_LISTEN": f"127.0.0.1:{port} unix:{path}"})
        try:
            wait_listening(server, f"unix:{path}")
            wait_listening(server, f"tcp:127.0.0.1:{port}")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            # A second server must not take the live socket over.
            second = start_server(d, "--listen", f"unix:{path}")
            assert second.wait(15) == 1, second.output()
            assert "another process is already serving" in second.stderr_text()
            stop_process(second)
            server.send_signal(signal.SIGTERM)
            assert server.wait(15) == 0, server.output()
            assert not path.exists(), "the socket file outlived the server"
        finally:
            stop_process(server)
            print(server.output())
        path.write_text("not a socket")
        refused = start_server(d, "--listen", f"unix:{path}")
        assert refused.wait(15) == 1, refused.output()
        assert f"cannot listen on unix:{path}: {path} exists and is not a socket" \
            in refused.stderr_text()
        assert path.read_text() == "not a socket"
        stop_process(refused)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bad_addresses_are_usage_errors() -> None:
    server = subprocess.run([script("carapace-server"), "--listen", "vsock:x",
                             "--token-file", "/dev/null"], capture_output=True, text=True,
                            timeout=30)
    assert server.returncode == 2 and "vsock:PORT" in server.stderr
    agent = subprocess.run([script("carapace-agent"), "--server", "vsock:5000",
                            "--token-file", "/dev/null", "--cli-socket", "/tmp/x"],
                           capture_output=True, text=True, timeout=30)
    assert agent.returncode == 2 and "vsock:CID:PORT (CID 2 is the host)" in agent.stderr


# -- TLS on a unix link -----------------------------------------------------------------

def test_tls_and_token_handshake_over_a_unix_link() -> None:
    d = short_dir()
    try:
        upstream_port, tool_port = free_port(), free_port()
        write_files(d, upstream_port)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        ca.issue_cert("carapace.internal").private_key_and_cert_chain_pem.write_to_path(
            str(d / "server.pem"))
        agent_args = [script("carapace-agent"), "--server", f"unix:{d}/server.sock",
                      "--token-file", str(d / "agent-token"), "--tls-ca", str(d / "ca.pem"),
                      "--expose", f"signal-cli=127.0.0.1:{tool_port}"]
        nameless = subprocess.run(agent_args, capture_output=True, text=True, timeout=30)
        assert nameless.returncode == 2
        assert "give --tls-server-name NAME" in nameless.stderr
        with running([sys.executable, "-m", "carapace.debug.upstream", "--port",
                       str(upstream_port)], port=upstream_port):
            server = start_server(d, "--listen", f"unix:{d}/server.sock",
                                  "--tls-cert", str(d / "server.pem"),
                                  "--tls-key", str(d / "server.pem"))
            try:
                wait_listening(server, f"unix:{d}/server.sock")
                with running([*agent_args, "--tls-server-name", "carapace.internal"],
                             port=tool_port) as agent:
                    wait_until_tunnel_up(f"http://127.0.0.1:{tool_port}/api/v1/check")
                    assert "connected to the Carapace server" in agent.stderr_text()
            finally:
                stop_process(server)
                print(server.output())
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- vsock ------------------------------------------------------------------------------

def vsock_missing() -> str | None:
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no socket.AF_VSOCK"
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"this kernel offers no AF_VSOCK sockets ({exc.strerror})"
    return None


def vsock_loopback_missing() -> str | None:
    """Without the loopback transport a connection to CID 1 would go to the hypervisor:
    never try it, look for the module."""
    missing = vsock_missing()
    if missing is None and not Path("/sys/module/vsock_loopback").exists():
        missing = ("the kernel has no vsock loopback transport (CONFIG_VSOCKETS_LOOPBACK; "
                   "try 'modprobe vsock_loopback')")
    return missing


@pytest.mark.skipif(vsock_missing() is not None, reason=vsock_missing() or "")
def test_server_listens_on_vsock() -> None:
    d = short_dir()
    try:
        write_files(d, free_port())
        # Port 4294967295 (VMADDR_PORT_ANY): the kernel picks a free one and the log names it.
        server = start_server(d, "--listen", "vsock:4294967295")
        try:
            wait_listening(server, "vsock:")
            assert "listening on vsock:4294967295" not in server.stderr_text()
        finally:
            stop_process(server)
            print(server.output())
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(vsock_loopback_missing() is not None,
                    reason=vsock_loopback_missing() or "")
def test_http_over_a_real_vsock_link() -> None:
    d = short_dir()
    try:
        upstream_port, tool_port = free_port(), free_port()
        write_files(d, upstream_port)
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
            probe.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            port = probe.getsockname()[1]
        with running([sys.executable, "-m", "carapace.debug.upstream", "--port",
                       str(upstream_port)], port=upstream_port):
            server = start_server(d, "--listen", f"vsock:{port}")
            try:
                wait_listening(server, f"vsock:{port}")
                with running([script("carapace-agent"), "--server", f"vsock:1:{port}",
                              "--token-file", str(d / "agent-token"),
                              "--expose", f"signal-cli=127.0.0.1:{tool_port}"],
                             port=tool_port):
                    wait_until_tunnel_up(f"http://127.0.0.1:{tool_port}/api/v1/check")
                assert "connected from vsock:" in server.stderr_text()
            finally:
                stop_process(server)
                print(server.output())
    finally:
        shutil.rmtree(d, ignore_errors=True)
