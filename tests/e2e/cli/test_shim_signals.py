"""Ctrl-C, a closed pipe and a vanished shim all stop the host process group — no orphans."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from carapace.protocol.framing import encode
from carapace.protocol.messages import CliRequest

from .conftest import CliDeployment, pid_gone, read_pids, wait_until


def _all_gone(pids: list[int]) -> None:
    for pid in pids:
        wait_until(lambda p=pid: pid_gone(p), 10, f"host pid {pid} to be gone")


def test_ctrl_c_stops_the_host_process_and_its_children(cli: CliDeployment,
                                                         tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    proc = cli.popen("sleeper", str(pidfile), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids = read_pids(pidfile)
    assert not any(pid_gone(p) for p in pids)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGINT, err  # Python dies of SIGINT, as locally
    _all_gone(pids)


def test_closed_stdout_pipe_exits_141_and_stops_the_host_process(cli: CliDeployment,
                                                                  tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = cli.popen("sh", "-c", f"echo $$ > {pidfile}; exec yes", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()  # like `| head -1` exiting
    assert proc.wait(timeout=10) == 141
    _all_gone(read_pids(pidfile))


def test_peer_hanging_up_mid_request_stops_the_host_process(cli: CliDeployment,
                                                             tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(cli.socket))
    sock.sendall(encode(CliRequest(id=1, tool="sleeper", argv=(str(pidfile).encode(),),
                                   cwd=b"/", env=(), tty=(False, False, False))))
    pids = read_pids(pidfile)
    sock.close()
    _all_gone(pids)
    assert cli.run("echo", "still serving").stdout == b"still serving\n"


def test_killed_shim_stops_the_host_process(cli: CliDeployment, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    proc = cli.popen("sleeper", str(pidfile), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    pids = read_pids(pidfile)
    proc.kill()
    proc.wait(timeout=10)
    _all_gone(pids)
