"""The shim against a scripted fake agent: every failure code maps to its exit status."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import CliRequest, Message, RequestFailed
from helpers.procs import script


class FakeAgent:
    """Accepts one shim, records its request, answers with ``reply`` bytes, hangs up."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.reply = reply
        self.request: Message | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            decoder = FrameDecoder()
            while self.request is None:
                decoder.feed(conn.recv(65536))
                self.request = decoder.next_message()
            conn.sendall(self.reply)


@pytest.fixture
def shim_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "gh").symlink_to(script("carapace-shim"))
    yield tmp_path


def run_against(shim_dir: Path, reply: bytes) -> tuple[subprocess.CompletedProcess[bytes],
                                                       FakeAgent]:
    path = shim_dir / "agent.sock"
    agent = FakeAgent(path, reply)
    r = subprocess.run([str(shim_dir / "gh"), "pr", "list"], input=b"", capture_output=True,
                       timeout=20, env={"CARAPACE_AGENT_SOCKET": str(path), "PATH": "/bin"})
    agent.thread.join(5)
    return r, agent


@pytest.mark.parametrize(("code", "status", "exit_code"), [
    ("denied", 403, 77),
    ("unknown_tool", 404, 77),
    ("rate_limited", 429, 75),
    ("bad_request", 400, 64),
    ("upstream_unavailable", 502, 69),
    ("upstream_timeout", 504, 124),
    ("too_many_requests", 503, 75),
    ("shutting_down", 503, 69),
    ("internal", 500, 70),
    ("some_future_code", 503, 69),  # unknown code: the HTTP status decides
    ("another_future_code", 418, 70),
])
def test_failure_codes_map_to_exit_statuses(shim_dir: Path, code: str, status: int,
                                            exit_code: int) -> None:
    reply = encode(RequestFailed(id=1, status=status, code=code, message=f"it went {code}",
                                 retry_after=7 if code == "rate_limited" else None))
    r, agent = run_against(shim_dir, reply)
    assert r.returncode == exit_code
    line = r.stderr.decode()
    assert line.startswith(f"carapace: gh: it went {code}") and line.count("\n") == 1
    if code == "rate_limited":
        assert "retry in 7 s" in line
    req = agent.request
    assert isinstance(req, CliRequest)
    assert (req.tool, req.argv, req.tty) == ("gh", (b"pr", b"list"), (False, False, False))
    assert (b"CARAPACE_AGENT_SOCKET", str(shim_dir / "agent.sock").encode()) in req.env


def test_agent_hanging_up_without_an_answer_exits_69(shim_dir: Path) -> None:
    r, _ = run_against(shim_dir, b"")
    assert r.returncode == 69
    assert b"closed the connection before the command finished" in r.stderr


def test_garbage_from_the_agent_exits_70(shim_dir: Path) -> None:
    r, _ = run_against(shim_dir, b"\x00\x00\x00\x02\xc1\xc1")
    assert r.returncode == 70
    assert b"does not understand" in r.stderr
