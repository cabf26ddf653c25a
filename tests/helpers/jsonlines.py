"""Read JSON lines that another process is still appending.

A writer's line can be seen half-written: one ``write`` of a record that
crosses a page boundary reaches the file a page at a time, and a process's
stdout reaches its file in buffer-sized pieces. A reader that polls must take
only the lines that end in a newline, and read the rest on its next poll.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.procs import CapturedProcess

__all__ = ["complete_lines", "json_lines", "read_records"]


def complete_lines(text: str) -> list[str]:
    """The lines of ``text`` that end in a newline, without the one still being written."""
    return text.split("\n")[:-1]


def read_records(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The complete JSON records in ``path`` from byte ``offset`` on (none if it is missing)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def json_lines(proc: CapturedProcess) -> list[dict[str, Any]]:
    """The complete JSON lines a process has printed so far."""
    return [json.loads(line) for line in complete_lines(proc.stdout_text()) if line.strip()]
