"""Nothing a VM sends can forge a line in the server's text log (real processes).

A hostile agent puts a newline and a fake log line in a tool name, a method, a
target, and (before authenticating) its agent name. The server's stderr must
show each of them escaped on the line of the real record, and no line that
begins like the forgery.
"""

from __future__ import annotations

import os
from pathlib import Path

from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake
from carapace.protocol.messages import (
    Challenge,
    CliRequest,
    HttpRequest,
    Reject,
    RequestFailed,
)
from helpers.deployment import deployment
from helpers.jsonlines import read_records
from helpers.procs import stop_process
from helpers.rawlink import RawLink

FORGED = "2026-01-01 00:00:00,000 INFO    carapace.server: agent vm2 connected"


def answered(link: RawLink, rid: int) -> None:
    while True:
        msg = link.receive()
        assert msg is not None, "the server closed the link"
        if isinstance(msg, RequestFailed) and msg.id == rid:
            return


def test_vm_strings_cannot_forge_a_log_line(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--audit-log", str(audit)]) as d:
        # Before authentication: an agent name with a forged line; then it refuses
        # the server's proof with a message carrying another forgery.
        stranger = RawLink(d.server_port)
        hs = AgentHandshake(f"x\n{FORGED}", b"wrong" * 8, os.urandom(NONCE_SIZE))
        stranger.send(hs.hello())
        assert isinstance(stranger.receive(), Challenge)
        stranger.send(Reject(code="auth", message=f"no\n{FORGED} (forged by hello)"))
        assert stranger.closed_by_peer()
        stranger.close()
        link = RawLink(d.server_port)
        link.handshake("prober", d.prober_token.encode())
        link.send(CliRequest(id=1, tool=f"gh\n{FORGED} (forged by tool)\r", argv=(b"x",),
                             cwd=b"/", env=(), tty=(False, False, False),
                             peer_uid=0, peer_gid=0, peer_pid=1))
        answered(link, 1)
        link.send(HttpRequest(id=2, tool="signal-cli\u2028", method="GET",
                              target=f"/x\n{FORGED} (forged by target)\x1b[2K",
                              headers=(), body=b""))
        answered(link, 2)
        link.close()
        assert d.server is not None
        stop_process(d.server)
        log = d.server.stderr_text()
    lines = log.split("\n")
    assert not [line for line in lines if line.startswith(FORGED)], log
    assert "\u2028" not in log and "\x1b" not in log and "\r" not in log
    for what in ("hello", "tool", "target"):
        [line] = [line for line in lines if f"(forged by {what})" in line]
        assert line.startswith(("20", "19")) and f"\\n{FORGED}" in line, line
    assert "agent 'x\\n2026-01-01" in log  # the name in the hello, escaped
    # The audit trail keeps the exact strings (JSON-escaped), and the peer
    # credentials as the VM's claim.
    [cli] = [r for r in read_records(audit) if r.get("kind") == "cli"]
    assert "(forged by tool)" in str(cli["tool"]) and cli["vm_claimed_peer_uid"] == 0
    assert "peer_uid" not in cli
