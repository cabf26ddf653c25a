"""A running server + agent with a CLI socket, and shims installed by ``carapace-agent shims``.

One deployment serves the whole folder (starting processes is the slow part);
tests that need their own agent start one with :func:`start_agent`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.procs import (
    CapturedProcess,
    free_port,
    script,
    start_process,
    stop_process,
    wait_until,
)

HERE = Path(__file__).resolve().parent
HOSTPROC = HERE / "hostproc.py"

TOOLS = ("cat", "false", "echo", "sh", "ticker", "selfkill", "sleeper", "slow", "flood",
         "envcheck", "missing", "nosuchtool")
"""Shims the fixture installs (``nosuchtool`` is deliberately not in the policy)."""

SECRET_NAME = "CARAPACE_TEST_TOKEN"

CLI_SANDBOX = os.environ.get("CARAPACE_TEST_CLI_SANDBOX", "none")
"""``settings.sandbox`` of this folder's servers. ``none`` by default: tests here check host
pids (a confined tool has its own PID namespace) and run wrappers under /tmp (private to a
confined tool); tests/e2e/test_confinement.py runs confined tools. With
CARAPACE_TEST_CLI_SANDBOX=bwrap the folder runs confined, the pytest temp dir writable."""


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def read_pids(path: Path) -> list[int]:
    wait_until(path.exists, 15, f"{path} to be written by the host process")
    return [int(p) for p in path.read_text().split()]


@dataclass
class CliDeployment:
    tmp: Path
    bin: Path
    socket: Path
    server: CapturedProcess
    agent: CapturedProcess
    server_port: int
    token_file: Path
    secret: str

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "CARAPACE_AGENT_SOCKET": str(self.socket), **extra}

    def shim(self, tool: str) -> str:
        return str(self.bin / tool)

    def run(self, tool: str, *args: str | bytes, input: bytes = b"", timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.shim(tool), *args], input=input, capture_output=True,
                              timeout=timeout, env=env or self.env())

    def popen(self, tool: str, *args: str | bytes, **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("env", self.env())
        return subprocess.Popen([self.shim(tool), *args], **kwargs)  # type: ignore[call-overload, no-any-return]

    def pipe_tail(self) -> str:
        return f"\n--- server:\n{self.server.stderr_text()[-3000:]}\n--- agent:\n" \
               f"{self.agent.stderr_text()[-3000:]}"


def _wrapper(directory: Path, mode: str) -> Path:
    """An executable that runs one hostproc mode (policy binaries take no fixed arguments)."""
    path = directory / mode
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {HOSTPROC} {mode} "$@"\n')
    path.chmod(0o755)
    return path


def policy_yaml(wrappers: Path, secret: str) -> str:
    w = {m: _wrapper(wrappers, m) for m in ("ticker", "selfkill", "pidsleep", "flood",
                                            "envcheck")}
    text = textwrap.dedent(f"""\
        settings: {{sandbox: {CLI_SANDBOX}}}
        tools:
          cat:
            type: cli
            binary: /bin/cat
            argv_allow_patterns: ["", "*"]
            argv_deny_patterns: ["forbidden*"]
            timeout_secs: 60
          "false":
            type: cli
            binary: /bin/false
            argv_allow_patterns: [""]
          echo:
            type: cli
            binary: /bin/echo
            argv_allow_patterns: ["*"]
          sh:
            type: cli
            binary: /bin/sh
            argv_allow_patterns: ["-c *"]
            timeout_secs: 60
          ticker:
            type: cli
            binary: {w["ticker"]}
            argv_allow_patterns: ["*"]
          selfkill:
            type: cli
            binary: {w["selfkill"]}
            argv_allow_patterns: ["*"]
          sleeper:
            type: cli
            binary: {w["pidsleep"]}
            argv_allow_patterns: ["*"]
            timeout_secs: 60
          slow:
            type: cli
            binary: {w["pidsleep"]}
            argv_allow_patterns: ["*"]
            timeout_secs: 1
          flood:
            type: cli
            binary: {w["flood"]}
            argv_allow_patterns: ["*"]
            timeout_secs: 60
          envcheck:
            type: cli
            binary: {w["envcheck"]}
            argv_allow_patterns: ["*"]
            env_inject:
              {SECRET_NAME}: "{secret}"
          missing:
            type: cli
            binary: /nonexistent/carapace-test-tool
            argv_allow_patterns: ["", "*"]
        """)
    if CLI_SANDBOX != "none":
        shared = wrappers.parent.parent  # the pytest temp dir: wrappers and tests' files
        text = text.replace("    type: cli\n",
                            f"    type: cli\n    sandbox: {{writable_paths: [\"{shared}\"]}}\n")
    return text


def start_agent(socket_path: Path, server_port: int, token_file: Path,
                extra: Sequence[str] = ()) -> CapturedProcess:
    return start_process([script("carapace-agent"), "--server", f"127.0.0.1:{server_port}",
                          "--token-file", str(token_file), "--cli-socket", str(socket_path),
                          *extra])


def install_shims(directory: Path, tools: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([script("carapace-agent"), "shims", "install", "--dir", str(directory),
                           *tools], capture_output=True, text=True, timeout=30)


def secret_sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliDeployment]:
    tmp = tmp_path_factory.mktemp("cli")
    wrappers = tmp / "host-bin"
    wrappers.mkdir()
    secret = "s3cr3t-" + secrets.token_hex(16)
    policy = tmp / "policy.yaml"
    policy.write_text(policy_yaml(wrappers, secret))
    token_file = tmp / "token"
    token_file.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token_file.chmod(0o600)
    port = free_port()
    socket_path = tmp / "run" / "agent.sock"  # "run" does not exist: the agent makes it 0700
    server = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                            "--policy", str(policy), "--token-file", str(token_file),
                            "--log-level", "debug"])
    agent = start_agent(socket_path, port, token_file)
    try:
        for proc, what in ((server, "listening on"), (agent, "connected to the Carapace server")):
            wait_until(lambda p=proc, w=what: w in p.stderr_text() or p.poll() is not None,
                       15, what)
            assert proc.poll() is None, proc.output()
        shims = install_shims(tmp / "bin", TOOLS)
        assert shims.returncode == 0, shims.stderr
        yield CliDeployment(tmp=tmp, bin=tmp / "bin", socket=socket_path, server=server,
                            agent=agent, server_port=port, token_file=token_file, secret=secret)
    finally:
        for proc in (agent, server):
            stop_process(proc)
            print(proc.output())
