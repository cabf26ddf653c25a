"""Backpressure end to end: a reader that stops holds the writer back, without sleeps or growth."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import CliDeployment, pid_gone, read_pids, wait_until

MiB = 1024 * 1024
BOUND = 8 * MiB
"""Most a stalled stream may have in flight: pipes, socket buffers and ~one window per hop."""


def wait_for_stall(progress: Callable[[], int], timeout: float = 20.0,
                   quiet: float = 1.0) -> int:
    """Poll ``progress`` until it has not grown for ``quiet`` seconds; return its value."""
    deadline = time.monotonic() + timeout
    last, since = progress(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still moving after {timeout} s ({last} bytes)"
        time.sleep(0.05)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_unread_shim_stdout_holds_the_host_process_back(cli: CliDeployment,
                                                        tmp_path: Path) -> None:
    progress_file = tmp_path / "progress"
    total = 32 * MiB
    proc = cli.popen("flood", str(progress_file), str(total), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    assert proc.stdout is not None

    def progress() -> int:
        try:
            return int(progress_file.read_text() or 0)
        except FileNotFoundError:
            return 0

    wait_until(lambda: progress() > 0 or proc.poll() is not None, 15,
               "the host process to start writing")
    assert proc.poll() is None, proc.communicate()[1].decode() + cli.pipe_tail()
    stalled_at = wait_for_stall(progress)
    assert stalled_at < BOUND, f"host process wrote {stalled_at} bytes nobody read"
    # One stalled stream holds back only itself.
    assert cli.run("echo", "unaffected").stdout == b"unaffected\n"
    received = 0
    while chunk := proc.stdout.read(MiB):
        received += len(chunk)
    assert proc.wait(timeout=30) == 0
    assert received == total == progress()


def test_unread_host_stdin_holds_the_shim_stdin_back(cli: CliDeployment,
                                                     tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    proc = cli.popen("sleeper", str(pidfile), stdin=subprocess.PIPE,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    pids = read_pids(pidfile)  # the host process runs and never reads its stdin
    fd = proc.stdin.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    chunk = b"z" * 65536
    sent = 0
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, f"stdin still accepted after {sent} bytes"
        try:
            sent += os.write(fd, chunk)
            continue
        except BlockingIOError:
            pass
        _, writable, _ = select.select([], [fd], [], 1.0)
        if not writable:
            break  # nothing drained for a whole second: held back
    assert sent < BOUND, f"{sent} bytes of stdin were taken while the host read none"
    # Ctrl-C now: the shim's stdin copy is stuck behind the credit, the signal still acts.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    for pid in pids:
        wait_until(lambda p=pid: pid_gone(p), 10, f"host pid {pid} to be gone")
