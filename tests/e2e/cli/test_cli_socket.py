"""The agent's shim socket: private by default, never clobbers, never doubles up."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from helpers.procs import CapturedProcess, free_port, stop_process

from .conftest import CliDeployment, start_agent, wait_until


def test_socket_is_0660_or_stricter_in_a_private_directory(cli: CliDeployment) -> None:
    st = os.stat(cli.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & ~0o660 == 0, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(cli.socket.parent).st_mode) == 0o700  # the agent created it


def _lonely_agent(cli: CliDeployment, path: Path) -> CapturedProcess:
    """An extra agent with no server: a second link as agent "default" would replace the
    fixture's own session."""
    return start_agent(path, free_port(), cli.token_file)


def _agent_refuses(cli: CliDeployment, path: Path, words: str) -> None:
    agent = _lonely_agent(cli, path)
    try:
        assert agent.wait(timeout=20) != 0
        assert words in agent.stderr_text(), agent.output()
    finally:
        stop_process(agent)


def test_agent_refuses_to_replace_a_file_that_is_not_a_socket(cli: CliDeployment,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("precious")
    _agent_refuses(cli, path, "is not a socket")
    assert path.read_text() == "precious"


def test_second_agent_on_a_live_socket_refuses(cli: CliDeployment) -> None:
    _agent_refuses(cli, cli.socket, "another agent is already serving")
    assert cli.run("echo", "ok").stdout == b"ok\n"


def test_stale_socket_is_replaced(cli: CliDeployment, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # left behind, as by an agent that was SIGKILLed
    agent = _lonely_agent(cli, path)
    try:
        wait_until(lambda: "tool shims served" in agent.stderr_text() or agent.poll() is not None,
                   15, "the agent to serve the socket")
        assert agent.poll() is None, agent.output()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # live again: the stale file was replaced
        probe.close()
    finally:
        stop_process(agent)
