"""make demo when nobody watches it: without a terminal it stops by itself and prints its
summary; stopped by a signal (SIGTERM from ``timeout``, SIGHUP from a closed terminal) it
stops every process it started; and it shows one call waiting for a person's approval."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.procs import poll

DEMO = [sys.executable, "-m", "carapace.debug.demo"]
ENV = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_without_a_terminal_the_demo_stops_by_itself_and_shows_an_approval() -> None:
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=90, env=ENV,
                          stdin=subprocess.DEVNULL)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Verdict:" in out and "What crossed the tunnel" in out
    assert "⏳ waiting for approval" in out and "signal-cli has not seen it" in out
    assert "✓ approved" in out and "outcome approved by demo" in out


@pytest.mark.parametrize(("signum", "after"), [
    (signal.SIGTERM, "1b ·"),                     # during the live events (trio runs)
    (signal.SIGHUP, "carapace-agent connected"),  # during the calls of step 1
])
def test_a_signal_stops_the_demo_and_every_process_it_started(
        tmp_path: Path, signum: int, after: str) -> None:
    out_path = tmp_path / "out"
    with out_path.open("w") as out:
        demo = subprocess.Popen([*DEMO, "--duration", "60"], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV, stdin=subprocess.DEVNULL)
    try:
        poll(lambda: after in out_path.read_text() or demo.poll() is not None, 60,
             f"the demo to print {after!r}")
        assert demo.poll() is None, out_path.read_text()
        children = poll(lambda: (lambda c: c if len(c) >= 3 else None)(_children(demo.pid)),
                        10, "the demo's upstream, server and agent")
        demo.send_signal(signum)
        assert demo.wait(timeout=30) == 128 + signum, out_path.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    left = [pid for pid in children if _alive(pid)]
    for pid in left:  # leave nothing behind, also when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the demo stopped: {left}\n{out_path.read_text()}"
