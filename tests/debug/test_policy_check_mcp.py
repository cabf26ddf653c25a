"""``carapace-debug policy check --mcp``, and the MCP example policy meaning what it says."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from helpers.procs import script

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policies" / "mcp-github.yaml"


def test_example_policy_loads_and_its_comments_hold() -> None:
    debug = script("carapace-debug")
    lint = subprocess.run([debug, "policy", "lint", str(EXAMPLE)], capture_output=True,
                          text=True, timeout=30)
    assert lint.returncode in (0, 1), lint.stdout + lint.stderr  # 2: does not load
    commented = re.findall(r"^#\s+(carapace-debug policy check .*)$", EXAMPLE.read_text(),
                           flags=re.M)
    assert len(commented) >= 5
    for line in commented:
        denied = bool(re.search(r"#\s*denied", line))
        argv = shlex.split(re.sub(r"\s+#.*$", "", line))
        done = subprocess.run([debug, *argv[1:]], capture_output=True, text=True, timeout=30,
                              cwd=EXAMPLE.parent)
        assert done.returncode == (1 if denied else 0), (line, done.stdout, done.stderr)


def test_mcp_check_usage_errors_and_json() -> None:
    debug = script("carapace-debug")
    base = [debug, "policy", "check", str(EXAMPLE), "--tool", "github"]
    bad = subprocess.run([*base, "--mcp", "tools/call", "--params", "{nope"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not JSON" in bad.stderr
    lonely = subprocess.run([*base, "--params", "{}"], capture_output=True, text=True,
                            timeout=30)
    assert lonely.returncode == 2 and "--params needs --mcp" in lonely.stderr
    other = subprocess.run([debug, "policy", "check", str(EXAMPLE), "--tool", "nope", "--mcp",
                            "tools/call", "--params", '{"name": "get_me"}', "--json"],
                           capture_output=True, text=True, timeout=30)
    assert other.returncode == 1 and '"decision": "deny"' in other.stdout
