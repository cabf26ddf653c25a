"""Injected secrets never reach the VM through a CLI tool's output.

Real processes: a server whose policy injects a 40-character token into
tools that print it — ``env``, a host-side helper that prints it one
character every 10 ms, ``env | base64`` — and an agent with shims. The shim's
stdout and stderr show ``[REDACTED]``, never the token in any encoding.
"""

from __future__ import annotations

import base64
import secrets
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carapace.server.masking import Scrubber
from helpers.procs import CapturedProcess, free_port, script, start_process, stop_process

from .conftest import CLI_SANDBOX, install_shims, start_agent, wait_until

TOOLS = ("printenv", "dribble", "b64sh")


@dataclass
class MaskDeployment:
    bin: Path
    socket: Path
    token: str
    server: CapturedProcess
    agent: CapturedProcess

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(self.bin / tool), *args], capture_output=True, timeout=30,
                              env={"CARAPACE_AGENT_SOCKET": str(self.socket),
                                   "PATH": "/usr/bin:/bin"})

    def assert_clean(self, out: bytes) -> None:
        """No encoding of the token that the scrubber knows is left in ``out``."""
        assert self.token.encode() not in out
        assert Scrubber([self.token.encode()]).scrub(out) == out, out


DRIBBLE = """\
import os, sys, time
stream = sys.stderr if sys.argv[1:] == ["stderr"] else sys.stdout
stream.write("token is ")
for ch in os.environ["CARAPACE_TEST_TOKEN"]:
    stream.write(ch)
    stream.flush()
    time.sleep(0.01)
stream.write(" (that was it)\\n")
"""


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MaskDeployment]:
    tmp = tmp_path_factory.mktemp("masking-cli")
    token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    helper = tmp / "dribble.py"
    helper.write_text(DRIBBLE)
    wrapper = tmp / "dribble"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {helper} "$@"\n')
    wrapper.chmod(0o755)
    inject = f'    env_inject: {{CARAPACE_TEST_TOKEN: "{token}"}}\n'
    if CLI_SANDBOX != "none":  # the helper lives under /tmp, private to a confined tool
        inject += f'    sandbox: {{writable_paths: ["{tmp}"]}}\n'
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"settings: {{sandbox: {CLI_SANDBOX}}}\n"
        "tools:\n"
        "  printenv:\n    type: cli\n    binary: /usr/bin/env\n"
        '    argv_allow_patterns: [""]\n' + inject
        + f"  dribble:\n    type: cli\n    binary: {wrapper}\n"
        '    argv_allow_patterns: ["", "stderr"]\n' + inject
        + "  b64sh:\n    type: cli\n    binary: /bin/sh\n"
        '    argv_allow_patterns: ["-c *"]\n' + inject)
    token_file = tmp / "agent-token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    port = free_port()
    server = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                            "--policy", str(policy), "--token-file", str(token_file)])
    sock = tmp / "run" / "agent.sock"
    agent = start_agent(sock, port, token_file)
    try:
        wait_until(lambda: "connected to the Carapace server" in agent.stderr_text()
                   or agent.poll() is not None or server.poll() is not None, 15,
                   "the agent to connect")
        assert agent.poll() is None and server.poll() is None, server.output() + agent.output()
        assert install_shims(tmp / "bin", TOOLS).returncode == 0
        yield MaskDeployment(tmp / "bin", sock, token, server, agent)
    finally:
        for proc in (agent, server):
            stop_process(proc)
            print(proc.output())
        assert token not in server.stderr_text() + agent.stderr_text()


def test_env_shows_redacted_never_the_token(masked: MaskDeployment) -> None:
    r = masked.run("printenv")
    assert r.returncode == 0, r.stderr
    assert b"CARAPACE_TEST_TOKEN=[REDACTED]\n" in r.stdout
    assert b"PATH=/usr/local/bin:/usr/bin:/bin" in r.stdout  # everything else passes
    masked.assert_clean(r.stdout)


@pytest.mark.parametrize("fd", ["stdout", "stderr"])
def test_a_token_printed_one_character_every_10_ms(masked: MaskDeployment, fd: str) -> None:
    start = time.monotonic()
    r = masked.run("dribble", *(["stderr"] if fd == "stderr" else []))
    assert r.returncode == 0, r.stderr
    out = r.stderr if fd == "stderr" else r.stdout
    assert out == b"token is [REDACTED] (that was it)\n"
    assert time.monotonic() - start >= 0.4  # it really dribbled: 40 writes, 10 ms apart


@pytest.mark.parametrize("command", ["env | base64", "env | base64 -w 64", "env | base64 -w 0",
                                     "printf 'ab'; env | base64", "printf 'abc\\n'; env | base64"])
def test_the_token_base64_encoded(masked: MaskDeployment, command: str) -> None:
    # The token sits at some offset in the environment, so each command (and the
    # printf in front, shifting the alignment) puts it somewhere else in the base64 text.
    r = masked.run("b64sh", "-c", command)
    assert r.returncode == 0, r.stderr
    assert b"[REDACTED]" in r.stdout
    masked.assert_clean(r.stdout)
    # What is left around [REDACTED] decodes to the rest of the environment only.
    text = r.stdout.replace(b"\n", b"")
    start = text.find(b"[REDACTED]")
    head = text[:start]
    head = head[:len(head) - len(head) % 4]
    assert masked.token[:4].encode() not in base64.b64decode(head)
