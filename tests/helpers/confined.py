"""What a test needs so that a confined tool can run one of its scripts.

CLI tools and MCP servers run under bubblewrap with a private ``/tmp``. A clone
of this repository, and the venv in it, may well sit under ``/tmp`` (CI's does),
where a confined tool sees nothing. A stdlib-only script still runs there when
it is copied outside ``/tmp`` and started with the interpreter the venv points
at, which is installed elsewhere.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REAL_PYTHON = os.path.realpath(sys.executable)
"""The interpreter behind this venv (stdlib only: the venv's packages may be hidden)."""

_copies: Path | None = None


def visible_copy(script: Path) -> Path:
    """``script`` copied into a directory under /var/tmp, removed when the tests end."""
    global _copies
    if _copies is None:
        _copies = Path(tempfile.mkdtemp(prefix="carapace-test-tools-", dir="/var/tmp"))
        _copies.chmod(0o755)
        atexit.register(shutil.rmtree, _copies, True)
    dest = _copies / script.name
    if not dest.exists():
        shutil.copy2(script, dest)
    return dest
