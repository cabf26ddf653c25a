"""The log formatters: nothing in a message can start a line of its own."""

from __future__ import annotations

import json
import logging
import sys

from carapace.protocol.messages import CliRequest
from carapace.protocol.summary import summarize
from carapace.runtime.logs import MAX_MESSAGE, JsonFormatter, TextFormatter, escape

FORGED = "2026-01-01 00:00:00,000 INFO    carapace.server: agent vm2 connected"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad\n{FORGED}")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("carapace.server", logging.INFO, __file__, 1, msg, args, exc_info)


def test_every_non_printable_character_is_escaped() -> None:
    assert escape("plain 'text' é 😀 C:\\dir") == "plain 'text' é 😀 C:\\dir"
    assert escape("a\nb\rc\td\x00e\x1b[2Kf\x7fg\x85h\u2028i\u202ej") == (
        "a\\nb\\rc\\td\\x00e\\x1b[2Kf\\x7fg\\x85h\\u2028i\\u202ej")


def test_a_forged_line_in_an_argument_stays_on_the_records_line() -> None:
    line = TextFormatter().format(record("denied cli tool %s for agent %s", f"gh\n{FORGED}", "vm1"))
    assert "\n" not in line and f"gh\\n{FORGED}" in line
    assert line.split(" ", 3)[2] == "INFO"


def test_traceback_lines_are_indented_and_escaped() -> None:
    text = TextFormatter().format(record("request failed", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("request failed") and rest
    assert all(line.startswith("  | ") for line in rest)
    assert not any(line.startswith(FORGED) for line in text.split("\n"))


def test_messages_are_bounded_in_both_formats() -> None:
    huge = record("tool %s", "x" * (MAX_MESSAGE * 10))
    text = TextFormatter().format(huge)
    assert len(text) < MAX_MESSAGE + 200 and "more characters not logged" in text
    doc = json.loads(JsonFormatter().format(huge))
    assert len(doc["message"]) < MAX_MESSAGE + 100


def test_json_log_stays_structured() -> None:
    doc = json.loads(JsonFormatter().format(record("tool %s", f"gh\n{FORGED}")))
    assert doc["message"] == f"tool gh\n{FORGED}"  # exact, in one JSON line


def test_sniff_names_the_peer_credentials_as_the_vms_claim() -> None:
    msg = CliRequest(id=1, tool="op", argv=(), cwd=b"/", env=(), tty=(False,) * 3,
                     peer_uid=0, peer_gid=0, peer_pid=1)
    out = summarize(msg)
    assert (out["vm_claimed_peer_uid"], out["vm_claimed_peer_gid"],
            out["vm_claimed_peer_pid"]) == (0, 0, 1)
    assert not any(k.startswith("peer_") for k in out)
