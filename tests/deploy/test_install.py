"""Install with deploy/install-host.sh and deploy/install-vm.sh into temporary roots
(no root needed), then run what they installed the way systemd would: the
rendered unit's ExecStart= with its EnvironmentFile=, the installed console
scripts, a shim from the VM's BINDIR. An HTTP call crosses --expose, a CLI call
crosses the shim, and the installed carapace-debug sees both.

The two installs are real (a venv each, pip install of this checkout), so this
module takes about half a minute.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.deployment import wait_until_tunnel_up
from helpers.procs import (
    CapturedProcess,
    free_port,
    running,
    start_process,
    stop_process,
    wait_for_port,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALL_TIMEOUT = 240


def systemd_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_setting(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines()
            if line.startswith(f"{key}=")]


def exec_start(unit: Path, env: dict[str, str]) -> list[str]:
    """ExecStart= with $VAR (split into words) and ${VAR} expanded, as systemd does."""
    (line,) = unit_setting(unit, "ExecStart")
    argv: list[str] = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def unit_environment(root: Path, unit: Path) -> dict[str, str]:
    """What the service process would get: Environment= and EnvironmentFile= values,
    with the unit's RuntimeDirectory= created (systemd's job)."""
    env: dict[str, str] = {}
    for item in unit_setting(unit, "Environment"):
        key, _, value = item.partition("=")
        env[key] = value
    for path in unit_setting(unit, "EnvironmentFile"):
        env.update(systemd_env_file(Path(path.lstrip("-"))))
    for name in unit_setting(unit, "RuntimeDirectory"):
        (root / "run" / name).mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(root)  # the unit's HOME is /var/lib/carapace, not ours to use here
    return env


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["sh", str(DEPLOY / script), *args], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT,
                          env={**os.environ, "CARAPACE_PYTHON": sys.executable})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@dataclass
class Installed:
    host: Path
    vm: Path
    server_port: int
    debug_port: int
    upstream_port: int
    expose_port: int
    host_log: str
    vm_log: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("deploy")
    host, vm = tmp / "host", tmp / "vm"
    server_port, debug_port = free_port(), free_port()
    upstream_port, expose_port = free_port(), free_port()
    policy = tmp / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        tools:
          signal-cli:
            type: http
            upstream: "http://127.0.0.1:{upstream_port}"
            allow_paths: ["POST /api/v1/rpc", "GET /api/v1/events", "GET /api/v1/check"]
            jsonrpc_allow_methods: [version, send]
            timeout_secs: 10
          echo:
            type: cli
            binary: /bin/echo
            argv_allow_patterns: ["hello *"]
            timeout_secs: 10
        """))
    had_build_dir = (REPO / "build").exists()
    host_run = run_script("install-host.sh", "--root", str(host), "--agent", "vm1",
                          "--listen", f"127.0.0.1:{server_port}", "--policy", str(policy))
    vm_run = run_script("install-vm.sh", "--root", str(vm),
                        "--server", f"127.0.0.1:{server_port}",
                        "--token-file", str(host / "etc/carapace/agents/vm1.token"),
                        "--expose", f"signal-cli=127.0.0.1:{expose_port}", "--shim", "echo")
    assert (REPO / "build").exists() == had_build_dir, "the install wrote into the checkout"
    # The one edit an operator makes here: the debug listener on a free port.
    env_file = host / "etc/carapace/server.env"
    env_file.write_text(env_file.read_text().replace(
        "CARAPACE_DEBUG_LISTEN=127.0.0.1:8766", f"CARAPACE_DEBUG_LISTEN=127.0.0.1:{debug_port}"))
    return Installed(host, vm, server_port, debug_port, upstream_port, expose_port,
                     host_run.stdout, vm_run.stdout)


def start_unit(root: Path, name: str) -> CapturedProcess:
    unit = root / "etc/systemd/system" / f"{name}.service"
    env = unit_environment(root, unit)
    argv = exec_start(unit, env)
    assert argv[0].startswith(str(root)), argv  # the installed binary, not the dev venv's
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARAPACE_")}
    return start_process(argv, {**clean, **env})


@pytest.fixture(scope="module")
def services(installed: Installed) -> Iterator[Installed]:
    with running([sys.executable, "-m", "carapace.debug.upstream",
                  "--port", str(installed.upstream_port)], port=installed.upstream_port):
        server = start_unit(installed.host, "carapace-server")
        try:
            wait_for_port("127.0.0.1", installed.server_port, 20, proc=server)
            agent = start_unit(installed.vm, "carapace-agent")
            try:
                wait_for_port("127.0.0.1", installed.expose_port, 20, proc=agent)
                wait_until_tunnel_up(f"http://127.0.0.1:{installed.expose_port}/api/v1/check")
                yield installed
            finally:
                stop_process(agent)
                print(agent.output())
        finally:
            stop_process(server)
            print(server.output())


def test_installed_server_agent_and_shim_work_end_to_end(services: Installed) -> None:
    vm, host = services.vm, services.host
    # HTTP through --expose (from agent.env's CARAPACE_AGENT_ARGS).
    base = f"http://127.0.0.1:{services.expose_port}"
    r = httpx.post(f"{base}/api/v1/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "version"},
                   timeout=10)
    assert r.status_code == 200 and "result" in r.json(), r.text
    assert httpx.get(f"{base}/api/v1/admin", timeout=10).status_code == 403

    # A CLI call through the installed shim, with the socket from profile.d.
    profile = (vm / "etc/profile.d/carapace.sh").read_text()
    socket_path = re.search(r"CARAPACE_AGENT_SOCKET=(\S+)", profile).group(1)  # type: ignore[union-attr]
    shim = vm / "usr/local/bin/echo"
    assert shim.is_symlink() and os.readlink(shim).endswith("current/bin/carapace-shim")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARAPACE_")}
    done = subprocess.run([str(shim), "hello", "from the VM"], capture_output=True, text=True,
                          timeout=20, env={**env, "CARAPACE_AGENT_SOCKET": socket_path})
    assert (done.returncode, done.stdout) == (0, "hello from the VM\n"), done.stderr
    denied = subprocess.run([str(shim), "goodbye"], capture_output=True, text=True,
                            timeout=20, env={**env, "CARAPACE_AGENT_SOCKET": socket_path})
    assert denied.returncode == 77, denied.stderr

    # The installed operator tools see it: health over the debug listener, the audit log.
    debug = str(host / "usr/local/bin/carapace-debug")
    health = subprocess.run([debug, "health", "--json", "--debug",
                             f"127.0.0.1:{services.debug_port}"],
                            capture_output=True, text=True, timeout=20)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "ok"
    audit = subprocess.run([debug, "audit", "--json", "--tool", "echo", "--file",
                            str(host / "var/log/carapace/audit.jsonl")],
                           capture_output=True, text=True, timeout=20)
    assert audit.returncode == 0, audit.stderr
    rows = json.loads(audit.stdout)["records"]
    assert sorted(row["decision"] for row in rows) == ["allow", "deny"], rows

    # carapace-server reload (CARAPACE_PID_FILE from server.env) reports acceptance.
    env_file = systemd_env_file(host / "etc/carapace/server.env")
    reload = subprocess.run([str(host / "usr/local/bin/carapace-server"), "reload"],
                            capture_output=True, text=True, timeout=20,
                            env={**env, "CARAPACE_PID_FILE": env_file["CARAPACE_PID_FILE"]})
    assert reload.returncode == 0, reload.stdout + reload.stderr


RUST_VERIFICATION = (
    "carapace-debug sse-test --count 10 --interval-ms 100",
    "carapace-debug sniff --filter SseEvent",
    "carapace-debug health",
    "carapace-debug connections --watch 2",
    "carapace-debug audit --since 5m --limit 20",
)
"""The Rust Carapace's "verify after deployment" commands, exactly as its notes write them."""


def operator_shell(host: Path, command: str) -> list[str]:
    """``command`` as an operator on the host runs it: in a shell that loaded the installed
    server.env (``set -a; . server.env``), the installed commands first on PATH."""
    env_file = host / "etc/carapace/server.env"
    return ["sh", "-c", f'set -a; . "{env_file}"; set +a; exec {command}']


def operator_env(host: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARAPACE_")}
    return {**clean, "PATH": f"{host / 'usr/local/bin'}:{clean.get('PATH', '/usr/bin:/bin')}",
            "COLUMNS": "200"}


def as_operator(host: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(operator_shell(host, command), capture_output=True, text=True,
                          timeout=60, env=operator_env(host))


def sniffed_events(text: str, tool: str) -> int:
    """Events in sniff's human lines: one per sse_event line, N per 'sse_events N events'
    and per 'sse_raw N events as sent' (whole blocks forwarded unparsed)."""
    lines = [line for line in text.splitlines() if f" {tool} " in line]
    return (sum(1 for line in lines if re.search(r" sse_event +event=", line))
            + sum(int(n) for line in lines for n in re.findall(r" sse_events +(\d+) events", line))
            + sum(int(n) for line in lines
                  for n in re.findall(r" sse_raw +(\d+) events? as sent", line)))


def interrupt(proc: CapturedProcess) -> int:
    """Ctrl-C, as the person at the terminal stops a command that runs until then."""
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=20)


def test_the_rust_verification_commands_work_as_written(services: Installed) -> None:
    host = services.host
    doc = (REPO / "DEPLOYMENT.md").read_text()
    assert all(command in doc for command in RUST_VERIFICATION), "DEPLOYMENT.md must list them"
    which = shutil.which("carapace-debug", path=operator_env(host)["PATH"])
    assert which == str(host / "usr/local/bin/carapace-debug")  # the installed one
    sse, sniff, health, watch, audit = RUST_VERIFICATION
    debug = f"127.0.0.1:{services.debug_port}"

    # "In another terminal": the sniff feed, started first, sees what crosses the tunnel.
    feed = start_process(operator_shell(host, sniff), operator_env(host))
    try:
        wait_until(lambda: debug_health(debug)["sniff"]["subscribers"] >= 1, 20,
                   "the sniff feed to subscribe")
        _check_sse_test_as_written(host, sse, debug)
        events = (f"/api/v1/events --direct http://127.0.0.1:{services.upstream_port}"
                  "/api/v1/events")
        _check_sse_test_through(host, f"{sse} --through http://127.0.0.1:"
                                f"{services.expose_port}{events}")
        # Only the --through run crossed the tunnel: its 10 events, and no others.
        wait_until(lambda: sniffed_events(feed.stdout_text(), "signal-cli") >= 10, 20,
                   "the ten events in the sniff feed")
        assert sniffed_events(feed.stdout_text(), "signal-cli") == 10, feed.output()
    finally:
        code = interrupt(feed) if feed.poll() is None else feed.returncode
        stop_process(feed)
    assert code == 0, feed.output()

    done = as_operator(host, health)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("Server is healthy") and "vm1" in first, done.stdout

    watching = start_process(operator_shell(host, watch), operator_env(host))
    try:
        # Two refreshes: it watches, and each shows the agent as the Rust notes say.
        wait_until(lambda: watching.stdout_text().count("1 connection from agent vm1") >= 2,
                   20, "two refreshes of connections --watch 2")
    finally:
        code = interrupt(watching) if watching.poll() is None else watching.returncode
        stop_process(watching)
    assert code == 0, watching.output()

    done = as_operator(host, audit)
    assert done.returncode == 0, done.stderr
    log = host / "var/log/carapace/audit.jsonl"
    assert f"in {log}" in done.stdout and "(found by CARAPACE_AUDIT_LOG)" in done.stdout
    assert "GET /api/v1/events" in done.stdout and "signal-cli" in done.stdout
    shown, matched = map(int, re.search(r"(\d+) of (\d+) matching", done.stdout).groups())  # type: ignore[union-attr]
    assert 0 < shown <= 20 and shown <= matched


def debug_health(address: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"http://{address}/debug/health", timeout=5).json()
    return doc


def _check_sse_test_as_written(host: Path, command: str, debug: str) -> None:
    done = as_operator(host, command)
    assert done.returncode == 0, done.stdout + done.stderr
    numbers = [int(n) for n in re.findall(r"^\[Event #(\d+)\] .* elapsed [\d.]+ ms", done.stdout,
                                          flags=re.M)]
    assert numbers == list(range(1, 11)), done.stdout
    assert "Generated 10 of 10 events in" in done.stdout
    rate = float(re.search(r"^Rate: ([\d.]+) events/s", done.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert 7 <= rate <= 13, done.stdout
    assert "Not measured: the tunnel" in done.stdout
    assert f"Next: carapace-server at {debug} answers (status ok, agents: vm1)" in done.stdout


def _check_sse_test_through(host: Path, command: str) -> None:
    done = as_operator(host, command)
    assert done.returncode == 0, done.stdout + done.stderr
    added = re.findall(r"^\[Event #\d+\] id=\d+ event=receive .* tunnel added (-?[\d.]+) ms$",
                       done.stdout, flags=re.M)
    assert len(added) == 10, done.stdout
    assert "Received 10 of 10 events" in done.stdout and "Verdict: REAL-TIME" in done.stdout
    forwarded = re.search(r"forwarded (\d+) SSE event\(s\) during the run", done.stdout)
    assert forwarded and int(forwarded.group(1)) >= 10, done.stdout


def test_install_leaves_secrets_private(installed: Installed) -> None:
    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    host, vm = installed.host / "etc/carapace", installed.vm / "etc/carapace"
    assert mode(host) == 0o750 and mode(vm) == 0o750
    for f in (host / "tokens", host / "server.env", host / "policy.yaml", vm / "token",
              vm / "agent.env"):
        assert mode(f) == 0o640, f
    assert mode(host / "agents") == 0o700
    assert mode(host / "agents/vm1.token") == 0o600
    line = (host / "agents/vm1.token").read_text().strip()
    assert line == (vm / "token").read_text().strip()
    name, token = line.split(":")
    assert name == "vm1" and len(token) >= 43  # token_urlsafe(32)
    assert (host / "tokens").read_text().count("vm1:") == 1
    assert token not in installed.host_log + installed.vm_log, "a token was printed"


def test_rendered_units_pass_systemd_analyze_verify(installed: Installed) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    for root, name in ((installed.host, "carapace-server"), (installed.vm, "carapace-agent")):
        unit = root / "etc/systemd/system" / f"{name}.service"
        assert str(root) in unit.read_text()  # rendered with the install's paths
        done = subprocess.run(["systemd-analyze", "verify", str(unit)],
                              capture_output=True, text=True, timeout=60)
        # verify exits 0 even for unknown keys; it warns on stderr. Neither is allowed.
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_reinstall_upgrades_and_keeps_config(installed: Installed) -> None:
    """Re-running the VM script without config options is an upgrade: a new release,
    the same agent.env and token, shims re-pointed; --rollback goes back."""
    vm = installed.vm
    before = {f: (vm / "etc/carapace" / f).read_text() for f in ("agent.env", "token")}
    old = os.readlink(vm / "opt/carapace/current")
    run_script("install-vm.sh", "--root", str(vm))
    new = os.readlink(vm / "opt/carapace/current")
    assert new != old
    assert {f: (vm / "etc/carapace" / f).read_text() for f in before} == before
    assert os.readlink(vm / "usr/local/bin/echo").endswith("current/bin/carapace-shim")
    run_script("install-vm.sh", "--root", str(vm), "--rollback")
    assert os.readlink(vm / "opt/carapace/current") == old
