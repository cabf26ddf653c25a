"""Log set-up shared by both daemons: one readable line per event, or JSON lines.

Log messages carry what a hostile VM sends: tool names, agent names before
authentication, methods, targets, error texts. So that none of it can forge a
line, the text formatter escapes every non-printable character of a message
(a newline, a carriage return, an escape sequence, U+2028, a bidi override)
``repr``-style — ``\\n``, ``\\x1b``, ``\\u2028`` — and indents every line of a
traceback with ``| ``: only the first line of a record starts at column 0 with
its timestamp. This is done once, here, for every log call, rather than at
each call site, so that a new log call cannot forget it. Backslashes are not
doubled (a Windows path stays readable); the JSON formatter needs none of
this, its encoder escapes everything, and ``--log-json`` stays structured.

Every message is also cut to :data:`MAX_MESSAGE` characters: the VM chooses
how long its strings are, and one request must not write megabytes to the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

# One line, always: every non-printable character escaped, as the operator's views show
# VM strings too.
from carapace.protocol.summary import printable as escape

MAX_MESSAGE: Final = 4096
"""Longest message logged, in characters; far above any message of ours with sane
input (a policy error names a key and a line), far below a VM's 16 MiB frame."""
CONTINUATION: Final = "  | "
"""Prefix of every line of a record after its first (tracebacks)."""


def bounded(text: str) -> str:
    """``text`` cut to :data:`MAX_MESSAGE` characters, saying how much was cut."""
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE]}…[{len(text) - MAX_MESSAGE} more characters not logged]"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, the message escaped to one line (module doc)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape(bounded(message))
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        return "\n".join([first, *(CONTINUATION + escape(bounded(line)) for line in rest)])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": bounded(record.getMessage()),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
