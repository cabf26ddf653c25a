"""What a VM names cannot drive the operator's terminal (real processes for the audit view).

A hostile agent puts escape sequences (set the window title, clear the screen,
move the cursor) and line breaks in a tool name and a method. The operator's
human views — ``carapace-debug audit``, ``sniff``, ``approvals`` — must show
them escaped: rich passes ESC through to the terminal as it is.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from carapace.debug.approvals import approvals_view
from carapace.debug.sniff import Renderer
from carapace.protocol.messages import CliRequest, HttpRequest, RequestFailed
from carapace.protocol.summary import summarize
from helpers.deployment import deployment
from helpers.jsonlines import read_records
from helpers.procs import poll, run_debug
from helpers.rawlink import RawLink

HOSTILE_TOOL = "gh\x1b]0;pwned\x07\x1b[2J\x1b[H\nfake line"
HOSTILE_METHOD = "GET\x1b[1A\x9b2J"


def answered(link: RawLink, rid: int) -> None:
    while True:
        msg = link.receive()
        assert msg is not None, "the server closed the link"
        if isinstance(msg, RequestFailed) and msg.id == rid:
            return


def no_control(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, repr(text)


def test_audit_view_escapes_what_the_vm_named(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--audit-log", str(audit)]) as d:
        link = RawLink(d.server_port)
        link.handshake("prober", d.prober_token.encode())
        link.send(CliRequest(id=1, tool=HOSTILE_TOOL, argv=(b"x",), cwd=b"/", env=(),
                             tty=(False, False, False)))
        answered(link, 1)
        link.send(HttpRequest(id=2, tool="signal-cli", method=HOSTILE_METHOD,
                              target="/api/v1/rpc", headers=(), body=b""))
        answered(link, 2)
        link.close()
        poll(lambda: len([r for r in read_records(audit) if r.get("event") == "decision"])
             >= 2, 10, "both decision records")
    # the trail keeps what was sent (JSON escapes it on disk) ...
    assert any(r.get("tool") == HOSTILE_TOOL for r in read_records(audit))
    # ... and the operator's table shows it escaped
    shown = run_debug("audit", "--file", str(audit), "--decision", "deny")
    assert shown.returncode == 0, shown.stderr
    no_control(shown.stdout)
    assert "\\x1b]0;pwned" in shown.stdout.replace("\n", "")
    assert "\\x1b[1A" in shown.stdout.replace("\n", "")


def test_sniff_lines_escape_tool_method_and_summary() -> None:
    out = io.StringIO()
    renderer = Renderer(as_json=False, out=out)
    for msg in (CliRequest(id=3, tool=HOSTILE_TOOL, argv=(b"\x1b[2J",), cwd=b"/", env=(),
                           tty=(False, False, False)),
                HttpRequest(id=4, tool=HOSTILE_TOOL, method=HOSTILE_METHOD, target="/x",
                            headers=(), body=b"")):
        record = {"ts": 0, "direction": "in", "agent": "vm1\x1b[31m", **summarize(msg)}
        renderer.frame(record)
    no_control(out.getvalue())
    assert "\\x1b]0;pwned" in out.getvalue()


def test_summaries_escape_the_tool_and_method_themselves() -> None:
    doc = summarize(HttpRequest(id=5, tool=HOSTILE_TOOL, method=HOSTILE_METHOD, target="/",
                                headers=(), body=b""))
    no_control(json.dumps(doc, ensure_ascii=False))
    assert doc["tool"].startswith("gh\\x1b]0;pwned\\x07")


def test_approvals_table_escapes_pending_calls_and_grants() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    item = {"id": 1, "agent": "vm1", "tool": HOSTILE_TOOL, "summary": "echo \x1b[2J",
            "waiting_s": 3.0}
    grant = {"id": "g1", "agent": "vm1", "tool": HOSTILE_TOOL, "summary": "x\x1b]0;t\x07",
             "expires_in_s": 60, "by": "alice\x1b[2J"}
    console.print(approvals_view({"pending": [item], "grants": [grant]}, "127.0.0.1:1"))
    # rich's own styling uses ESC; strip it by rendering without a terminal as well
    plain = io.StringIO()
    Console(file=plain, force_terminal=False, width=200).print(
        approvals_view({"pending": [item], "grants": [grant]}, "127.0.0.1:1"))
    no_control(plain.getvalue())
    assert "\\x1b]0;pwned" in plain.getvalue()
