"""Run the project's console scripts as real subprocesses in tests.

    from helpers.procs import running, script, free_port

    port = free_port()
    with running([script("carapace-debug"), "sse-test", "serve", "--port", str(port)],
                 port=port) as proc:
        ...  # talk to 127.0.0.1:port

``running`` waits (polling, with a deadline) until the port accepts, and on
the way out terminates the process (then kills it) and prints what it wrote.
pytest shows that output only for a failing test, so it is there exactly when
you need it — also when ``running`` is used inside a fixture.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

__all__ = [
    "CapturedProcess",
    "free_port",
    "poll",
    "run_debug",
    "running",
    "script",
    "start_process",
    "stop_process",
    "wait_for_output",
    "wait_for_port",
    "wait_until",
]


class CapturedProcess(subprocess.Popen[bytes]):
    """A ``Popen`` whose stdout and stderr go to temporary files you can read at any time."""

    stdout_path: Path
    stderr_path: Path
    _files: list[IO[bytes]]

    def stdout_text(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def output(self) -> str:
        """Both streams, labelled, for a failure message."""
        return (
            f"--- {self.args!r} (pid {self.pid}, exit {self.returncode}) stdout:\n"
            f"{self.stdout_text()}\n--- stderr:\n{self.stderr_text()}"
        )


def script(name: str) -> str:
    """Path of a console script installed next to this interpreter (e.g. ``carapace-debug``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(path)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, release it).

    Never one this process was given before: the kernel may offer a port it has
    just released again, and then a deployment's server and agent listeners
    were given the same port (CI once failed on exactly that).
    """
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def start_process(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> CapturedProcess:
    """Start ``argv`` with stdout/stderr captured to temp files.

    ``env`` is added to (and overrides) the current environment;
    ``PYTHONUNBUFFERED=1`` is set so Python children write their lines at once.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    out = tempfile.NamedTemporaryFile(prefix="proc-", suffix=".out", delete=False)
    err = tempfile.NamedTemporaryFile(prefix="proc-", suffix=".err", delete=False)
    try:
        proc = CapturedProcess(
            list(argv), stdin=stdin, stdout=out, stderr=err, env=full_env, cwd=cwd
        )
    except BaseException:
        for f in (out, err):
            f.close()
            os.unlink(f.name)
        raise
    proc.stdout_path = Path(out.name)
    proc.stderr_path = Path(err.name)
    proc._files = [out, err]
    return proc


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def poll(fn: Callable[[], T | None], timeout: float = 10.0, what: str = "condition",
         interval: float = 0.02) -> T:
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
        except AssertionError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last}")
        time.sleep(interval)


def run_debug(*args: str, timeout: float = 20, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run ``carapace-debug ARGS`` to completion and capture its output."""
    return subprocess.run(
        [script("carapace-debug"), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll until ``host:port`` accepts a TCP connection, or raise ``TimeoutError``.

    With ``proc``, fail at once (``RuntimeError``, with its output) if it exits first.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            detail = proc.output() if isinstance(proc, CapturedProcess) else ""
            raise RuntimeError(
                f"process exited with {proc.returncode} before {host}:{port} accepted\n{detail}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept within {timeout} s: {last_error}")
        time.sleep(0.02)


def wait_for_output(
    proc: CapturedProcess, pattern: str, timeout: float = 10.0, *, stream: str = "stdout"
) -> re.Match[str]:
    """Poll ``proc``'s captured stdout (or stderr) until ``pattern`` (a regex) matches."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        text = proc.stdout_text() if stream == "stdout" else proc.stderr_text()
        match = regex.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"process exited before printing {pattern!r}\n{proc.output()}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{pattern!r} not printed within {timeout} s\n{proc.output()}")
        time.sleep(0.02)


def stop_process(proc: CapturedProcess, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; close the capture files."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in proc._files:
        f.close()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[CapturedProcess]:
    """Start ``argv``; with ``port``, wait until it accepts; stop it and print its output on exit.

    Usable directly in a test or as the body of a (yield) fixture. The output
    is printed on every exit; pytest only displays it for failing tests.
    """
    proc = start_process(argv, env, cwd=cwd)
    try:
        if port is not None:
            wait_for_port(host, port, timeout, proc=proc)
        yield proc
    finally:
        stop_process(proc)
        print(proc.output())
        for path in (proc.stdout_path, proc.stderr_path):
            with contextlib.suppress(OSError):
                path.unlink()
