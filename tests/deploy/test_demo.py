"""make demo from a checkout: starts fast, and a first-time reader gets the three
answers it promises — what crossed the tunnel, what was denied and why, how fast."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_tells_what_crossed_what_was_denied_and_how_fast() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carapace.debug.demo", "--seconds", "1.5"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.count("✓ allowed") == 3 and out.count("✗ denied") == 4, out
    # Why: the rule from the audit log, for a deny of each kind.
    for rule in ("jsonrpc_deny_methods[0]", "allowed path", "argv_deny_patterns[0]"):
        assert rule in out, rule
    # Proof from the service's own counters that denied calls never got there.
    assert out.count("never reached signal-cli") == 3 and "never ran on the host" in out
    assert "What crossed the tunnel" in out and "CLI (date)" in out
    assert "Verdict:" in out
