"""Bad requests get a clear error and a distinct exit status; everyone else keeps being served."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import Cancel, CliRequest, Data, End, Message, RequestFailed
from helpers.procs import free_port, stop_process

from .conftest import CliDeployment, start_agent, wait_until


def still_serving(cli: CliDeployment) -> None:
    r = cli.run("echo", "still", "serving")
    assert (r.returncode, r.stdout) == (0, b"still serving\n"), r.stderr
    assert cli.agent.poll() is None and cli.server.poll() is None


def raw_exchange(cli: CliDeployment, data: bytes, *, hang_up: bool = False) -> list[Message]:
    """Send raw bytes as a shim would (then stop sending, with ``hang_up``), and collect
    what the agent answers until it closes the connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(cli.socket))
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before we finished; its answer is still readable
    if hang_up:
        sock.shutdown(socket.SHUT_WR)
    decoder = FrameDecoder()
    out: list[Message] = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            sock.close()
            return out
        decoder.feed(chunk)
        out.extend(decoder)


def request(tool: str = "echo", argv: tuple[bytes, ...] = (b"x",), rid: int = 1) -> CliRequest:
    return CliRequest(id=rid, tool=tool, argv=argv, cwd=b"/", env=(), tty=(False,) * 3)


def assert_bad_request(answer: list[Message], words: str) -> None:
    assert len(answer) == 1 and isinstance(answer[0], RequestFailed), answer
    assert answer[0].code == "bad_request"
    assert words in answer[0].message, answer[0].message


def test_denied_by_policy_exits_77_with_the_reason(cli: CliDeployment) -> None:
    r = cli.run("cat", "forbidden-file")
    assert r.returncode == 77
    assert r.stderr.startswith(b"carapace: cat: denied by policy: ")
    assert b"deny pattern" in r.stderr
    assert r.stdout == b""


def test_unknown_tool_exits_77(cli: CliDeployment) -> None:
    r = cli.run("nosuchtool")
    assert r.returncode == 77
    assert r.stderr.startswith(b"carapace: nosuchtool: denied by policy")


def test_non_utf8_argument_is_a_clean_error(cli: CliDeployment) -> None:
    r = cli.run("echo", b"\xff\xfe")
    assert r.returncode == 64
    assert b"argument 1 is not valid UTF-8" in r.stderr
    still_serving(cli)


def test_huge_argv_is_refused_by_the_shim(cli: CliDeployment) -> None:
    args = ["a" * 100_000] * 12  # 1.2 MB: allowed by the OS, over our 1 MiB request cap
    r = cli.run("echo", *args)
    assert r.returncode == 64
    assert b"over Carapace's limit" in r.stderr and b"stdin" in r.stderr
    still_serving(cli)


def test_huge_request_frame_is_refused_by_the_agent(cli: CliDeployment) -> None:
    answer = raw_exchange(cli, encode(request(argv=(b"a" * 2_000_000,))))
    assert_bad_request(answer, "exceeds the 1048576-byte limit")
    still_serving(cli)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    struct.pack(">I", 6) + b"\xc1" * 6,  # a frame whose payload is not msgpack
    struct.pack(">I", 0),
    encode(Data(id=1, data=b"stdin before any request")),
    encode(request(rid=7)),
])
def test_garbage_on_the_socket_gets_bad_request(cli: CliDeployment, garbage: bytes) -> None:
    answer = raw_exchange(cli, garbage)
    assert_bad_request(answer, "")
    still_serving(cli)


def test_garbage_after_a_valid_request_cancels_it(cli: CliDeployment, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    answer = raw_exchange(cli, encode(request("cat")) + os.urandom(64))
    assert answer and isinstance(answer[-1], RequestFailed), answer
    assert answer[-1].code == "bad_request"
    still_serving(cli)
    assert not pidfile.exists()


@pytest.mark.parametrize(("after", "words"), [
    ([End(id=1), Data(id=1, data=b"late")], "after the end of stdin"),
    ([End(id=1), End(id=1)], "after the end of stdin"),
    ([request("cat")], "while stdin is open"),
    ([Cancel(id=1, reason="no")], "unexpected cancel from the shim"),
])
def test_shim_frames_out_of_order_get_bad_request(cli: CliDeployment, after: list[Message],
                                                  words: str) -> None:
    """The shim follows the agent's rules for a request (protocol/README.md, "Request
    states"), without cancel: anything else ends its request with bad_request."""
    answer = raw_exchange(cli, encode(request("cat")) + b"".join(encode(m) for m in after))
    assert answer and isinstance(answer[-1], RequestFailed), answer
    assert answer[-1].code == "bad_request" and words in answer[-1].message, answer[-1]
    still_serving(cli)


def test_truncated_request_then_hang_up(cli: CliDeployment) -> None:
    frame = encode(request())
    assert raw_exchange(cli, frame[: len(frame) // 2], hang_up=True) == []
    still_serving(cli)


def test_agent_not_running_exits_69_and_says_how_to_fix_it(cli: CliDeployment,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.sock"
    r = cli.run("cat", env=cli.env(CARAPACE_AGENT_SOCKET=str(path)))
    assert r.returncode == 69
    text = r.stderr.decode()
    assert "agent is not running" in text and str(path) in text
    assert "CARAPACE_AGENT_SOCKET" in text and "carapace-agent --cli-socket" in text
    # A socket file nobody listens on (a crashed agent) says the same.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()
    r = cli.run("cat", env=cli.env(CARAPACE_AGENT_SOCKET=str(path)))
    assert r.returncode == 69 and b"nothing listens on" in r.stderr


def test_tunnel_down_exits_69_with_a_clear_message(cli: CliDeployment, tmp_path: Path) -> None:
    sock = tmp_path / "lonely.sock"
    agent = start_agent(sock, free_port(), cli.token_file, ["--log-level", "debug"])
    try:
        wait_until(sock.exists, 15, "the lonely agent's socket")
        r = cli.run("cat", input=b"x", env=cli.env(CARAPACE_AGENT_SOCKET=str(sock)))
        assert r.returncode == 69, r.stderr
        assert b"tunnel to the Carapace server is down" in r.stderr
        assert b"retry" in r.stderr
    finally:
        stop_process(agent)
    assert not sock.exists(), "the agent leaves no socket file behind"


def test_shim_frames_after_a_dead_stream_do_not_hurt(cli: CliDeployment) -> None:
    """A request, its answer, then more stdin and signals: ignored, nothing breaks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(cli.socket))
    sock.sendall(encode(request("false", ())))
    decoder = FrameDecoder()
    while not (msgs := list(decoder)):
        decoder.feed(sock.recv(65536))
    assert msgs[0].TYPE == "exit"
    try:
        sock.sendall(encode(Data(id=1, data=b"late")))
    except OSError:
        pass
    sock.close()
    still_serving(cli)


def test_subprocess_usage_of_a_pipe_that_closes_early(cli: CliDeployment) -> None:
    """stdin closed before the tool reads it (``< /dev/null``) is plain EOF."""
    r = subprocess.run([cli.shim("cat")], stdin=subprocess.DEVNULL, capture_output=True,
                       env=cli.env(), timeout=30)
    assert (r.returncode, r.stdout) == (0, b"")
