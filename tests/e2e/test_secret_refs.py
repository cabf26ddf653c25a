"""Secrets by reference, end to end: real upstream, server, agent and shim processes.

The policy holds no secret: an HTTP tool's ``Authorization`` comes from a
``{file:}``, a CLI tool's variables from ``{env:}``, ``{command:}`` and
``{credential:}`` (the server is started with ``CREDENTIALS_DIRECTORY`` as
systemd would). The host service and the host binary receive the real values;
the VM sees them masked. A reload picks up a rotated secret, and a reload whose
reference fails keeps the old policy and says which key and reference failed,
never a value. ``carapace-debug policy check`` runs no command unless asked.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import string
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from helpers.deployment import Deployment, deployment, free_port
from helpers.procs import poll, run_debug, script, start_process


def token() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))


ENV_SECRET = token()
CMD_SECRET = token()
CRED_SECRET = token()
HEADER_SECRET = token()
ROTATED_SECRET = token()
ENV_VAR = "CARAPACE_TEST_REF_SECRET"

# The {command:} reference: prints the secret kept in a file, touches a marker if
# given one, waits for a "go" file while a "hold" file exists, and, while a "fail"
# file exists, fails the way a password manager might: a partial secret on stdout,
# the secret again on stderr.
COMMAND = """\
import pathlib, sys, time
here = pathlib.Path(sys.argv[1])
if len(sys.argv) > 2:
    pathlib.Path(sys.argv[2]).touch()
if (here / "hold").exists():  # a slow password manager: wait for the test's go
    (here / "started").touch()
    deadline = time.monotonic() + 30
    while not (here / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
value = (here / "cmd-value").read_text()
if (here / "fail").exists():
    print("partial", value)
    print("[ERROR] vault is locked; cached:", value, file=sys.stderr)
    sys.exit(3)
print(value)
"""

# The tool script lives under pytest's /tmp, which a confined tool cannot see (its /tmp
# is private); these tests are about secret references, not confinement.
POLICY = """\
settings:
  sandbox: none
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
  host:
    type: http
    upstream: "http://127.0.0.1:HOSTPORT"
    headers_inject:
      Authorization: {file: HEADER_FILE}
  envtool:
    type: cli
    binary: ENVTOOL
    argv_allow_patterns: [""]
    env_inject:
      FROM_ENV_TOKEN: {env: CARAPACE_TEST_REF_SECRET}
      FROM_COMMAND_TOKEN: {command: [PYTHON, COMMAND, HERE]}
      FROM_CREDENTIAL_TOKEN: {credential: cred-token}
      PLAIN: written-in-the-file
"""


class _Host(BaseHTTPRequestHandler):
    """A host service that records the headers it got and echoes them back."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        _Host.seen.append(headers)
        body = json.dumps(headers).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def write_policy(tmp: Path, host_port: int, *, env_var: str = ENV_VAR,
                 marker: Path | None = None) -> str:
    """The policy text for files under ``tmp`` (writing the command, the tool and secrets)."""
    (tmp / "command.py").write_text(COMMAND)
    (tmp / "cmd-value").write_text(CMD_SECRET)
    envtool = tmp / "envtool"
    envtool.write_text(f"#!/bin/sh\nenv > {tmp / 'tool-env'}\nenv\n")
    envtool.chmod(0o755)
    header = tmp / "header-secret"
    header.write_text(f"Bearer {HEADER_SECRET}\n")
    header.chmod(0o600)
    creds = tmp / "credentials"
    creds.mkdir(mode=0o700, exist_ok=True)
    (creds / "cred-token").write_text(CRED_SECRET)
    (creds / "cred-token").chmod(0o400)
    here = f"{tmp}, {marker}" if marker else str(tmp)
    return (POLICY.replace("HOSTPORT", str(host_port)).replace("HEADER_FILE", str(header))
            .replace("ENVTOOL", str(envtool)).replace("PYTHON", sys.executable)
            .replace("COMMAND, HERE", f"{tmp / 'command.py'}, {here}")
            .replace(ENV_VAR, env_var))


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("secret-refs")
    policy = write_policy(tmp, host.server_address[1])
    sock, pid_file, debug_port = tmp / "agent.sock", tmp / "server.pid", free_port()
    try:
        with pytest.MonkeyPatch.context() as env:
            # The server's own environment, as a systemd unit with LoadCredential= gives it
            # (the processes started below inherit it).
            env.setenv(ENV_VAR, ENV_SECRET)
            env.setenv("CREDENTIALS_DIRECTORY", str(tmp / "credentials"))
            with deployment(tmp, policy=policy, tools=("signal-cli", "host"),
                            server_args=["--pid-file", str(pid_file),
                                         "--debug-listen", f"127.0.0.1:{debug_port}"],
                            agent_args=["--cli-socket", str(sock)]) as d:
                env.delenv(ENV_VAR)
                env.delenv("CREDENTIALS_DIRECTORY")
                done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                                       str(tmp / "bin"), "envtool"], capture_output=True,
                                      text=True, timeout=30)
                assert done.returncode == 0, done.stderr
                d.extra.update(sock=sock, pid_file=pid_file, debug_port=debug_port)
                yield d
                assert d.server is not None and d.agent is not None
                logs = d.server.stderr_text() + d.agent.stderr_text()
                for value in (ENV_SECRET, CMD_SECRET, CRED_SECRET, HEADER_SECRET,
                              ROTATED_SECRET):
                    assert value not in logs
    finally:
        host.shutdown()


def run_tool(d: Deployment) -> dict[str, str]:
    """Run the envtool shim as the VM would; the environment it printed, as the VM sees it."""
    done = subprocess.run([str(d.tmp / "bin" / "envtool")], capture_output=True, timeout=30,
                          env={"PATH": os.environ["PATH"],
                               "CARAPACE_AGENT_SOCKET": str(d.extra["sock"])})
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines())


def host_env(d: Deployment) -> dict[str, str]:
    """The environment the binary really got on the host."""
    text = (d.tmp / "tool-env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def hup(d: Deployment) -> dict[str, object]:
    """SIGHUP the server; its reload status once it has written a new one."""
    assert d.server is not None
    status_file = Path(f"{d.extra['pid_file']}.reload")
    before = status_file.read_text() if status_file.exists() else ""
    d.server.send_signal(signal.SIGHUP)
    poll(lambda: status_file.exists() and status_file.read_text() != before, 15,
         "the reload status")
    status: dict[str, object] = json.loads(status_file.read_text())
    return status


def through_host(d: Deployment) -> tuple[str, str]:
    """(what the VM saw, what the host service got) as Authorization of one request."""
    r = httpx.get(d.url("/anything", "host"), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["authorization"], _Host.seen[-1]["authorization"]


def test_header_from_a_file_reaches_the_upstream_and_is_masked_for_the_vm(
        dep: Deployment) -> None:
    seen_by_vm, got = through_host(dep)
    assert got == f"Bearer {HEADER_SECRET}"  # one trailing newline dropped, nothing else
    assert seen_by_vm == "[REDACTED]"


def test_env_command_and_credential_values_reach_the_tool_masked_for_the_vm(
        dep: Deployment) -> None:
    seen = run_tool(dep)
    real = host_env(dep)
    assert real["FROM_ENV_TOKEN"] == ENV_SECRET
    assert real["FROM_COMMAND_TOKEN"] == CMD_SECRET
    assert real["FROM_CREDENTIAL_TOKEN"] == CRED_SECRET
    assert real["PLAIN"] == "written-in-the-file"
    assert ENV_VAR not in real and "CREDENTIALS_DIRECTORY" not in real
    for name in ("FROM_ENV_TOKEN", "FROM_COMMAND_TOKEN", "FROM_CREDENTIAL_TOKEN"):
        assert seen[name] == "[REDACTED]"
    assert seen["PLAIN"] == "written-in-the-file"


def test_a_reload_resolves_again_and_picks_up_a_rotated_secret(dep: Deployment) -> None:
    header = dep.tmp / "header-secret"
    header.write_text(f"Bearer {ROTATED_SECRET}\n")
    try:
        status = hup(dep)
        assert status["ok"] is True, status
        assert through_host(dep) == ("[REDACTED]", f"Bearer {ROTATED_SECRET}")
    finally:
        header.write_text(f"Bearer {HEADER_SECRET}\n")
        assert hup(dep)["ok"] is True
    assert through_host(dep) == ("[REDACTED]", f"Bearer {HEADER_SECRET}")


def metric(d: Deployment, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{d.extra['debug_port']}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_a_reload_whose_command_fails_keeps_the_old_policy_and_names_the_key(
        dep: Deployment) -> None:
    failures = 'carapace_secret_ref_failures_total{kind="command"}'
    before = metric(dep, failures)
    (dep.tmp / "fail").touch()
    try:
        status = hup(dep)
    finally:
        (dep.tmp / "fail").unlink()
    assert status["ok"] is False
    message = str(status["message"])
    assert "reload rejected, the previous policy and tokens stay in force" in message
    assert "tools.envtool.env_inject.FROM_COMMAND_TOKEN" in message
    assert f'{{command: ["{sys.executable}" ...]}}' in message
    assert "exited with status 3: [ERROR] vault is locked; cached: [REDACTED]" in message
    assert CMD_SECRET not in message and "partial" not in message
    assert str(dep.tmp / "command.py") not in message  # a command's arguments stay hidden
    assert metric(dep, failures) == before + 1
    assert dep.server is not None and dep.server.poll() is None
    run_tool(dep)  # the old policy still serves, with the old values
    assert host_env(dep)["FROM_COMMAND_TOKEN"] == CMD_SECRET


def test_a_slow_command_at_reload_does_not_hold_up_requests(dep: Deployment) -> None:
    """The references are resolved in a worker thread: while the command runs, the
    server goes on serving (if it did not, this request would wait for the command's
    10 s timeout and fail)."""
    assert dep.server is not None
    status_file = Path(f"{dep.extra['pid_file']}.reload")

    def status_text() -> str:
        return status_file.read_text() if status_file.exists() else ""

    before = status_text()
    (dep.tmp / "hold").touch()
    try:
        dep.server.send_signal(signal.SIGHUP)
        poll(lambda: (dep.tmp / "started").exists(), 10, "the command to start")
        r = httpx.get(dep.url("/api/v1/check"), timeout=5)
        assert r.status_code == 200
        assert through_host(dep) == ("[REDACTED]", f"Bearer {HEADER_SECRET}")
        assert status_text() == before  # the reload is still waiting
    finally:
        (dep.tmp / "go").touch()
        (dep.tmp / "hold").unlink()
    poll(lambda: status_text() != before, 15, "the reload status")
    assert json.loads(status_file.read_text())["ok"] is True
    (dep.tmp / "go").unlink()
    (dep.tmp / "started").unlink()


def test_a_reload_with_a_world_readable_secret_file_is_refused(dep: Deployment) -> None:
    header = dep.tmp / "header-secret"
    header.chmod(0o644)
    try:
        status = hup(dep)
    finally:
        header.chmod(0o600)
    assert status["ok"] is False
    message = str(status["message"])
    assert "tools.host.headers_inject.Authorization" in message
    assert f"chmod o-r {header}" in message and HEADER_SECRET not in message
    assert through_host(dep) == ("[REDACTED]", f"Bearer {HEADER_SECRET}")
    assert hup(dep)["ok"] is True


def test_the_server_does_not_start_when_a_reference_fails(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(write_policy(tmp_path, 9, env_var="CARAPACE_TEST_NEVER_SET")
                      .replace("{upstream_port}", "9"))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token()}\n")
    tokens.chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
    proc = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{free_port()}",
                          "--policy", str(policy), "--token-file", str(tokens)], env)
    assert proc.wait(timeout=30) == 2
    err = proc.stderr_text()
    assert 'tools.envtool.env_inject.FROM_ENV_TOKEN: cannot resolve {env: ' \
           '"CARAPACE_TEST_NEVER_SET"}: the variable is not set' in err
    for value in (CMD_SECRET, CRED_SECRET, HEADER_SECRET):
        assert value not in err + proc.stdout_text()


def test_policy_check_runs_no_command_unless_asked_to_resolve(tmp_path: Path) -> None:
    marker = tmp_path / "the-command-ran"
    policy = tmp_path / "policy.yaml"
    policy.write_text(write_policy(tmp_path, 9, marker=marker).replace("{upstream_port}", "9"))
    plain = run_debug("policy", "check", str(policy), "--tool", "envtool")
    assert plain.returncode == 0, plain.stderr
    assert not marker.exists()
    assert "tools.envtool.env_inject.FROM_COMMAND_TOKEN" in plain.stdout
    assert "not resolved" in plain.stdout
    as_json = run_debug("policy", "check", str(policy), "--tool", "envtool", "--json")
    assert json.loads(as_json.stdout)["unresolved_refs"][
        "tools.envtool.env_inject.FROM_CREDENTIAL_TOKEN"] == '{credential: "cred-token"}'
    assert not marker.exists()

    server_env = {ENV_VAR: ENV_SECRET, "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
    resolved = run_debug("policy", "check", str(policy), "--tool", "envtool", "--resolve",
                         env=server_env)
    assert resolved.returncode == 0, resolved.stderr
    assert marker.exists()
    assert "not resolved" not in resolved.stdout
    assert "FROM_COMMAND_TOKEN" in resolved.stdout  # the env names, never the values
    for value in (ENV_SECRET, CMD_SECRET, CRED_SECRET):
        assert value not in resolved.stdout + resolved.stderr

    failing = run_debug("policy", "check", str(policy), "--tool", "envtool", "--resolve",
                        env={"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")})
    assert failing.returncode == 2
    assert "tools.envtool.env_inject.FROM_ENV_TOKEN" in failing.stderr
    assert "not set in the server's environment" in failing.stderr
