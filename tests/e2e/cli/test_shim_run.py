"""A tool run through shim → agent → server → exec behaves as if it ran locally."""

from __future__ import annotations

import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers.procs import script

from .conftest import CliDeployment, pid_gone, read_pids, secret_sha, wait_until


def test_stdin_reaches_cat_and_stdout_comes_back(cli: CliDeployment) -> None:
    r = cli.run("cat", input=b"hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello\n", b""), cli.pipe_tail()


def test_50_mb_of_random_bytes_arrive_byte_identical(cli: CliDeployment, tmp_path: Path) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    data = os.urandom(50 * 1024 * 1024)
    src.write_bytes(data)
    with src.open("rb") as fin, dst.open("wb") as fout:
        proc = cli.popen("cat", stdin=fin, stdout=fout, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_first_line_arrives_long_before_the_tool_exits(cli: CliDeployment) -> None:
    proc = cli.popen("ticker", "50", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"tick 0\n"
        assert proc.poll() is None, "the first line came only when the tool had finished"
    finally:
        proc.terminate()  # forwarded as SIGTERM: the host ticker dies and the shim follows
        proc.wait(timeout=10)
    assert proc.returncode == 128 + 15


def test_exit_status_is_passed_through(cli: CliDeployment) -> None:
    assert cli.run("false").returncode == 1
    r = cli.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_tool_killed_by_sigkill_exits_137(cli: CliDeployment) -> None:
    r = cli.run("selfkill", "9")
    assert r.returncode == 137, r.stderr
    assert r.stdout == b"about to die\n"
    assert r.stderr == b""


def test_timeout_stops_the_tool_and_exits_124(cli: CliDeployment, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    r = cli.run("slow", str(pidfile))
    assert r.returncode == 124
    assert b"carapace: slow: timed out after 1 s" in r.stderr
    for pid in read_pids(pidfile):  # the leader and its grandchild
        wait_until(lambda p=pid: pid_gone(p), 10, f"host pid {pid} to be gone")


def test_binary_that_cannot_run_is_a_clear_error(cli: CliDeployment) -> None:
    r = cli.run("missing")
    assert r.returncode == 69
    assert r.stderr.startswith(b"carapace: missing: cannot run /nonexistent/carapace-test-tool:")
    assert b"No such file" in r.stderr


def test_injected_env_reaches_the_tool_and_never_a_log(cli: CliDeployment) -> None:
    r = cli.run("envcheck", "CARAPACE_TEST_TOKEN", secret_sha(cli.secret))
    assert r.returncode == 0, r.stderr
    assert cli.secret not in cli.server.stderr_text()  # the server logs at debug level
    assert cli.secret not in cli.agent.stderr_text()


def test_concurrent_shims_each_get_their_own_answer(cli: CliDeployment) -> None:
    def one(i: int) -> tuple[int, bytes]:
        r = cli.run("echo", f"run-{i}")
        return r.returncode, r.stdout

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [(0, f"run-{i}\n".encode()) for i in range(24)]


def test_running_carapace_shim_itself_prints_usage(cli: CliDeployment) -> None:
    r = subprocess.run([script("carapace-shim")], capture_output=True, env=cli.env(), timeout=10)
    assert r.returncode == 64
    assert b"usage:" in r.stderr and b"shims install" in r.stderr
