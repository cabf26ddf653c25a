"""CLI tools are confined on the host, and every secret the server holds is masked.

Real processes: a ``carapace-server`` whose policy allows ``/bin/sh -c ...``
(the most permissive tool there is), an agent, and the agent's shim. The
tool tries what a hostile VM would have it try: read the token file, the
policy and the audit log, overwrite the audit log, see or signal the server
process, share /tmp with the host, and print other agents' tokens. The
server's files live under /var/tmp (not /tmp, which the sandbox replaces
anyway), so the hiding itself is what is tested.

Needs a working bubblewrap (``apt-get install bubblewrap``; ``make test``
installs it as root): without it these tests skip and say why.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers.confined import REAL_PYTHON
from helpers.procs import (
    CapturedProcess,
    free_port,
    run_debug,
    script,
    start_process,
    stop_process,
    wait_until,
)

REDACTED = "[REDACTED]"  # carapace.server.masking.REDACTED_TEXT


def _bwrap_problem() -> str | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    done = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                           "--unshare-user", "--unshare-pid", "true"], capture_output=True,
                          timeout=20)
    if done.returncode:
        return f"bwrap cannot create namespaces here: {done.stderr.decode()[-300:]}"
    return None


BWRAP_PROBLEM = _bwrap_problem()
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=str(BWRAP_PROBLEM))


@dataclass
class Host:
    """One server + agent; the server's files under ``base`` (outside /tmp)."""

    base: Path
    tmp: Path
    server: CapturedProcess
    agent: CapturedProcess
    tokens: dict[str, str]
    debug_token: str
    token_file: Path
    policy_file: Path
    audit_log: Path
    work: Path
    debug: str
    bin: Path
    socket: Path

    def sh(self, script_text: str, *, cwd: Path | None = None, tool: str = "sh",
           input: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(self.bin / tool), "-c", script_text], input=input,
                              capture_output=True, timeout=timeout, cwd=cwd or self.tmp,
                              env={"CARAPACE_AGENT_SOCKET": str(self.socket),
                                   "PATH": "/usr/bin:/bin"})

    def debug_json(self, *args: str) -> dict[str, object]:
        done = run_debug(*args, "--debug", self.debug, "--json",
                         env={"CARAPACE_DEBUG_TOKEN_FILE": str(self.base / "etc" / "debug.token")})
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert isinstance(doc, dict)
        return doc


def base_policy(work: Path, extra: str = "", settings: str = "") -> str:
    return settings + textwrap.dedent(f"""\
        tools:
          sh:
            type: cli
            binary: /bin/sh
            argv_allow_patterns: ["-c *"]
            timeout_secs: 20
          shwork:
            type: cli
            binary: /bin/sh
            argv_allow_patterns: ["-c *"]
            cwd_allowed: ["{work}"]
          shquick:
            type: cli
            binary: /bin/sh
            argv_allow_patterns: ["-c *"]
            timeout_secs: 1
          envdump:
            type: cli
            binary: /usr/bin/env
            argv_allow_patterns: [""]
        """) + extra


@contextlib.contextmanager
def host(tmp: Path, policy_text: Callable[[Path], str], *,
         tools: tuple[str, ...] = ("sh", "shwork", "shquick", "envdump")) -> Iterator[Host]:
    """Start a server (files under /var/tmp) and an agent ``alice``; ``bob`` has a token too."""
    base = Path(tempfile.mkdtemp(prefix="carapace-confine-", dir="/var/tmp"))
    try:
        (base / "etc").mkdir()
        (base / "log").mkdir()
        work = base / "work"
        work.mkdir()
        tokens = {name: secrets.token_urlsafe(32) for name in ("alice", "bob")}
        token_file = base / "etc" / "tokens"
        token_file.write_text("".join(f"{n}:{t}\n" for n, t in tokens.items()))
        token_file.chmod(0o600)
        debug_token = secrets.token_urlsafe(32)
        (base / "etc" / "debug.token").write_text(debug_token + "\n")
        (base / "etc" / "debug.token").chmod(0o600)
        policy_file = base / "etc" / "policy.yaml"
        policy_file.write_text(policy_text(work))
        audit_log = base / "log" / "audit.jsonl"
        port, debug_port = free_port(), free_port()
        server = start_process([
            script("carapace-server"), "--listen", f"127.0.0.1:{port}", "--policy",
            str(policy_file), "--token-file", str(token_file), "--audit-log", str(audit_log),
            "--debug-listen", f"127.0.0.1:{debug_port}", "--debug-token-file",
            str(base / "etc" / "debug.token"), "--log-level", "debug"])
        agent_token = tmp / "alice.token"  # the VM's own file: not the server's business
        agent_token.write_text(f"alice:{tokens['alice']}\n")
        agent_token.chmod(0o600)
        sock = tmp / "run" / "agent.sock"
        agent = start_process([script("carapace-agent"), "--server", f"127.0.0.1:{port}",
                               "--token-file", str(agent_token), "--cli-socket", str(sock)])
        try:
            for proc, what in ((server, "listening on"),
                               (agent, "connected to the Carapace server")):
                wait_until(lambda p=proc, w=what: w in p.stderr_text() or p.poll() is not None,
                           15, what)
                assert proc.poll() is None, proc.output()
            done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                                   str(tmp / "bin"), *tools], capture_output=True, timeout=30)
            assert done.returncode == 0, done.stderr
            yield Host(base, tmp, server, agent, tokens, debug_token, token_file, policy_file,
                       audit_log, work, f"127.0.0.1:{debug_port}", tmp / "bin", sock)
        finally:
            for proc in (agent, server):
                stop_process(proc)
                print(proc.output())
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """The default policy: no sandbox keys at all, so confinement is what ``auto`` gives."""
    with host(tmp_path_factory.mktemp("confined"), base_policy) as h:
        yield h


# ------------------------------------------------------------------ the server's own files


@needs_bwrap
def test_tool_cannot_read_the_token_file_policy_or_audit_log(confined: Host) -> None:
    confined.sh("true")  # so the audit log has a record in it
    for path in (confined.token_file, confined.policy_file, confined.audit_log,
                 confined.base / "etc" / "debug.token"):
        done = confined.sh(f"cat {path}")
        assert done.returncode != 0, (path, done.stdout)
        assert done.stdout == b""
    for token in confined.tokens.values():
        assert token.encode() not in confined.sh(f"cat {confined.token_file}").stdout
    listing = confined.sh(f"ls -A {confined.audit_log.parent}")
    assert listing.stdout == b""  # the whole audit directory is an empty cover


@needs_bwrap
def test_tool_cannot_write_the_audit_log(confined: Host) -> None:
    confined.sh("true")
    before = confined.audit_log.read_bytes()
    done = confined.sh(f"echo forged >> {confined.audit_log}; "
                       f": > {confined.audit_log}; echo forged > {confined.audit_log}.1")
    assert done.returncode != 0
    after = confined.audit_log.read_bytes()
    assert after.startswith(before)  # nothing truncated; every line is still a record
    assert all(json.loads(line) for line in after.splitlines())
    assert not Path(f"{confined.audit_log}.1").exists()


@needs_bwrap
def test_tool_cannot_see_or_signal_the_server(confined: Host) -> None:
    pid = confined.server.pid
    hups = confined.server.stderr_text().count("SIGHUP")
    done = confined.sh(f"kill -0 {pid} && echo SIGNALLED; cat /proc/{pid}/environ && "
                       f"echo READ; kill -HUP {pid} && echo HUPPED; ls /proc")
    assert b"SIGNALLED" not in done.stdout and b"READ" not in done.stdout
    assert b"HUPPED" not in done.stdout
    visible = {int(n) for n in done.stdout.split() if n.isdigit()}
    assert pid not in visible and max(visible) < 10, visible  # its own PID namespace
    assert confined.server.poll() is None
    assert confined.server.stderr_text().count("SIGHUP") == hups


@needs_bwrap
def test_tmp_is_private(confined: Host, tmp_path: Path) -> None:
    marker = tmp_path / "host-secret"
    marker.write_text("host only\n")
    dropped = f"/tmp/carapace-dropped-{secrets.token_hex(8)}"
    done = confined.sh(f"cat {marker}; ls /tmp; echo from-tool > {dropped} && echo WROTE")
    assert b"host only" not in done.stdout
    assert b"WROTE" in done.stdout  # /tmp is writable, but private
    assert not Path(dropped).exists()
    again = confined.sh(f"cat {dropped}")
    assert again.returncode != 0  # and new for every run


@needs_bwrap
def test_host_is_read_only_outside_writable_paths(confined: Host) -> None:
    done = confined.sh(f"echo x > {confined.work}/new && echo WROTE")
    assert b"WROTE" not in done.stdout
    assert not (confined.work / "new").exists()


# ------------------------------------------------------------------ the working directory


@needs_bwrap
def test_cwd_allowed_runs_in_the_checked_directory(confined: Host) -> None:
    sub = confined.work / "sub"
    sub.mkdir(exist_ok=True)
    done = confined.sh("pwd -P", cwd=sub, tool="shwork")
    assert (done.returncode, done.stdout) == (0, f"{sub}\n".encode()), done.stderr
    outside = confined.sh("pwd -P", cwd=confined.base / "log", tool="shwork")
    assert outside.returncode != 0 and outside.stdout == b""


# ------------------------------------------------------------------ secrets in output


@needs_bwrap
def test_agent_tokens_printed_by_a_tool_reach_the_vm_redacted(confined: Host) -> None:
    alice, bob = confined.tokens["alice"], confined.tokens["bob"]
    dbg = confined.debug_token
    b64 = base64.b64encode(bob.encode()).decode()
    done = confined.sh(f"echo mine {alice}; echo theirs {bob}; echo debug {dbg}; "
                       f"echo {b64} >&2")
    out, err = done.stdout.decode(), done.stderr.decode()
    assert out == f"mine {REDACTED}\ntheirs {REDACTED}\ndebug {REDACTED}\n", out
    assert err == f"{REDACTED}\n", err
    for secret in (alice, bob, dbg):
        assert secret not in out + err


# ------------------------------------------------------------------ process handling


@needs_bwrap
def test_exit_status_stdin_and_signals_pass_through_the_sandbox(confined: Host) -> None:
    assert confined.sh("exit 42").returncode == 42
    assert confined.sh("kill -TERM $$").returncode == 128 + signal.SIGTERM
    echoed = confined.sh("cat", input=b"through stdin\n")
    assert (echoed.returncode, echoed.stdout) == (0, b"through stdin\n")
    proc = subprocess.Popen(
        [str(confined.bin / "sh"), "-c",
         'trap "echo got-int; exit 3" INT; echo ready; sleep 30 & wait'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=confined.tmp,
        env={"CARAPACE_AGENT_SOCKET": str(confined.socket), "PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert (proc.returncode, out) == (3, b"got-int\n"), err  # the tool's own handler ran


@needs_bwrap
def test_environment_is_the_policys_only(confined: Host) -> None:
    done = subprocess.run([str(confined.bin / "envdump")], capture_output=True, timeout=30,
                          env={"CARAPACE_AGENT_SOCKET": str(confined.socket), "MY": "x"})
    names = {line.split(b"=", 1)[0] for line in done.stdout.splitlines()}
    assert names == {b"PATH", b"LANG", b"LC_ALL"}, done.stdout  # no PWD from bwrap


@needs_bwrap
def test_timeout_stops_a_confined_tool(confined: Host) -> None:
    done = confined.sh("echo start; sleep 30", tool="shquick")
    assert done.returncode == 124 and done.stdout == b"start\n"


# ------------------------------------------------------------------ per-tool keys


def _keys_policy(work: Path) -> str:
    writable = work / "out"
    writable.mkdir(exist_ok=True)
    (work / "hidden.txt").write_text("hide me\n")
    return base_policy(work, extra=textwrap.indent(textwrap.dedent(f"""\
        shkeys:
          type: cli
          binary: /bin/sh
          argv_allow_patterns: ["-c *"]
          sandbox:
            writable_paths: ["{writable}"]
            hide_paths: ["{work}/hidden.txt"]
            network: none
            rlimits: {{cpu_secs: 7, memory_mb: 512, nproc: 4000, fsize_mb: 1}}
        """), "  "))


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with host(tmp_path_factory.mktemp("keyed"), _keys_policy,
              tools=("sh", "shwork", "shquick", "envdump", "shkeys")) as h:
        yield h


@needs_bwrap
def test_writable_and_hidden_paths(keyed: Host) -> None:
    done = keyed.sh(f"echo made > {keyed.work}/out/file && cat {keyed.work}/hidden.txt",
                    tool="shkeys")
    assert (keyed.work / "out" / "file").read_text() == "made\n"
    assert b"hide me" not in done.stdout and done.returncode != 0
    plain = keyed.sh(f"cat {keyed.work}/hidden.txt; echo y > {keyed.work}/out/other")
    assert plain.stdout == b"hide me\n"  # only shkeys hides it, only shkeys may write
    assert not (keyed.work / "out" / "other").exists()


@needs_bwrap
def test_rlimits_apply_to_the_tool(keyed: Host) -> None:
    limits = keyed.sh("cat /proc/self/limits", tool="shkeys").stdout.decode()
    rows = {line[:26].strip(): line[26:].split() for line in limits.splitlines()[1:]}
    assert rows["Max cpu time"][:2] == ["7", "7"]
    assert rows["Max address space"][:2] == [str(512 << 20)] * 2
    assert rows["Max processes"][:2] == ["4000", "4000"]
    assert rows["Max file size"][:2] == [str(1 << 20)] * 2
    big = keyed.sh(f"head -c 2000000 /dev/zero > {keyed.work}/out/big", tool="shkeys")
    assert big.returncode != 0
    assert (keyed.work / "out" / "big").stat().st_size <= 1 << 20


@needs_bwrap
def test_network_none_has_no_network(keyed: Host) -> None:
    port = keyed.debug.rsplit(":", 1)[1]
    probe = (f"{REAL_PYTHON} -c \"import socket; socket.create_connection(('127.0.0.1', "
             f"{port}), timeout=5); print('connected')\"")
    assert keyed.sh(probe).stdout == b"connected\n"  # network: host (the default)
    cut = keyed.sh(probe, tool="shkeys")
    assert cut.stdout == b"" and cut.returncode != 0


@needs_bwrap
def test_health_and_metrics_show_bwrap(confined: Host) -> None:
    health = confined.debug_json("health")
    assert health["sandbox"] == {"setting": "auto", "mode": "bwrap", "reason": "bwrap works"}
    metrics = httpx.get(f"http://{confined.debug}/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {confined.debug_token}"}).text
    assert 'carapace_sandbox_mode{mode="bwrap"} 1.0' in metrics
    assert 'carapace_sandbox_mode{mode="none"} 0.0' in metrics


# ------------------------------------------------------------------ sandbox: none


def test_sandbox_none_is_reported_everywhere(tmp_path: Path) -> None:
    with host(tmp_path, lambda work: base_policy(work, settings="settings: {sandbox: none}\n"),
              tools=("sh",)) as h:
        health = h.debug_json("health")
        assert health["sandbox"] == {"setting": "none", "mode": "none",
                                     "reason": "settings.sandbox is none"}
        text = run_debug("health", "--debug", h.debug, env={
            "CARAPACE_DEBUG_TOKEN_FILE": str(h.base / "etc" / "debug.token")}).stdout
        assert "UNCONFINED" in text
        assert "UNCONFINED" in h.server.stderr_text()  # the WARNING at start
        metrics = httpx.get(f"http://{h.debug}/metrics", timeout=10,
                            headers={"Authorization": f"Bearer {h.debug_token}"}).text
        assert 'carapace_sandbox_mode{mode="none"} 1.0' in metrics
        # Unconfined, the tool reads the token file — but what it prints is still masked.
        leaked = h.sh(f"cat {h.token_file}")
        assert leaked.stdout == f"alice:{REDACTED}\nbob:{REDACTED}\n".encode()


def test_a_token_added_by_reload_is_masked_too(confined: Host) -> None:
    carol = secrets.token_urlsafe(32)
    with confined.token_file.open("a") as f:
        f.write(f"carol:{carol}\n")
    confined.server.send_signal(signal.SIGHUP)
    wait_until(lambda: "3 agent token(s)" in confined.server.stderr_text(), 10, "the reload")
    done = confined.sh(f"echo new {carol}")
    assert done.stdout == f"new {REDACTED}\n".encode(), done.stdout
