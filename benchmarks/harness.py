"""Processes for the benchmarks: the test upstream, an OpenSSH forward, a Carapace pair.

Everything listens on 127.0.0.1, logs to files in the run's temporary
directory, and is stopped (SIGTERM, then SIGKILL) by pid on the way out.
Waits are polls with deadlines.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"


class HarnessError(Exception):
    pass


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free a moment ago, never one given out before in this run (the kernel
    offers just-released ports again, and two listeners would then collide)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """One child process with its output in ``logdir/name.log``."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = logdir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise HarnessError(f"{self.name} exited ({self.popen.returncode}) before "
                                   f"port {port} opened:\n{self.tail()}")
            if port_open(port):
                return
            time.sleep(0.03)
        raise HarnessError(f"{self.name}: port {port} not open within {timeout:.0f} s\n"
                           f"{self.tail()}")

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise HarnessError(f"{name} is not installed (run `make bench`, which installs it)")
    return found


# ----------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize in KiB, from /proc/PID/status."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize"):
            out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status(pid).get("VmRSS", 0)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (sshd forks one child or two per connection)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- upstream


class Upstream:
    """``python -m carapace.debug.upstream`` on a free port."""

    def __init__(self, logdir: Path, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.proc = Proc("upstream", [sys.executable, "-m", "carapace.debug.upstream",
                                      "--port", str(self.port), *extra], logdir)
        self.proc.wait_port(self.port)

    def stop(self) -> None:
        self.proc.stop()


# ----------------------------------------------------------------------------- Carapace


@dataclass
class Carapace:
    """``carapace-server`` and ``carapace-agent`` exposing the upstream as tool ``bench``."""

    logdir: Path
    upstream_port: int
    server_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    tag: str = "carapace"
    server: Proc | None = None
    agent: Proc | None = None
    port: int = 0

    def start(self) -> Carapace:
        token = secrets.token_urlsafe(32)
        d = self.logdir
        (d / "token").write_text(f"default:{token}\n")
        (d / "token").chmod(0o600)
        policy = d / "policy.yaml"
        policy.write_text(textwrap.dedent(f"""\
            tools:
              bench:
                type: http
                upstream: "http://{HOST}:{self.upstream_port}"
                timeout_secs: 60
            """))
        server_port = free_port()
        self.port = free_port()
        self.server = Proc(f"{self.tag}-server", [
            script("carapace-server"), "--listen", f"{HOST}:{server_port}",
            "--policy", str(policy), "--token-file", str(d / "token"), *self.server_args,
        ], d)
        self.server.wait_port(server_port)
        self.agent = Proc(f"{self.tag}-agent", [
            script("carapace-agent"), "--server", f"{HOST}:{server_port}",
            "--token-file", str(d / "token"), "--expose", f"bench={HOST}:{self.port}",
            *self.agent_args,
        ], d)
        self.agent.wait_port(self.port)
        deadline = time.monotonic() + 20
        last = ""
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://{HOST}:{self.port}/api/v1/check", timeout=3)
                if r.status_code == 200:
                    return self
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"the Carapace tunnel did not come up: {last}\n"
                           f"{self.agent.tail() if self.agent else ''}")

    def pids(self) -> dict[str, int]:
        out = {}
        if self.agent is not None:
            out["agent"] = self.agent.pid
        if self.server is not None:
            out["server"] = self.server.pid
        return out

    def stop(self) -> None:
        for proc in (self.agent, self.server):
            if proc is not None:
                proc.stop()


def server_supports(flag: str) -> bool:
    """Whether this carapace-server knows ``flag`` (the code moves; the bench must not break)."""
    try:
        out = subprocess.run([script("carapace-server"), "--help"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired, HarnessError):
        return False
    return flag in out


# ----------------------------------------------------------------------------- OpenSSH


class SshForward:
    """A private sshd on loopback and ``ssh -N -L`` through it to the upstream.

    Throwaway host and user keys (ssh-keygen), a generated sshd_config, the
    current user. :meth:`start` raises :class:`HarnessError` with the reason
    when sshd is missing or will not run; the caller skips the column.
    """

    def __init__(self, tmp: Path, upstream_port: int) -> None:
        self.dir = tmp / "ssh"
        self.upstream_port = upstream_port
        self.sshd: Proc | None = None
        self.ssh: Proc | None = None
        self.port = 0
        self.notes: list[str] = []
        self._login: list[str] = []

    def start(self) -> SshForward:
        if not os.path.exists(SSHD):
            raise HarnessError(f"{SSHD} not found (Debian/Ubuntu: "
                               "apt-get install -y openssh-server openssh-client)")
        for tool in ("ssh", "ssh-keygen"):
            if not shutil.which(tool):
                raise HarnessError(f"{tool} not found (apt-get install -y openssh-client)")
        if os.geteuid() == 0 and not os.path.isdir(PRIVSEP_DIR):
            # sshd running as root insists on its privilege-separation directory,
            # which the ssh service unit normally creates at boot (RuntimeDirectory).
            try:
                os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
                self.notes.append(f"created sshd's runtime directory {PRIVSEP_DIR}")
            except OSError as exc:
                raise HarnessError(f"sshd needs {PRIVSEP_DIR}: {exc}") from None
        d = self.dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "carapace-bench",
                            "-f", str(d / key)], check=True, capture_output=True, timeout=30)
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        user = pwd.getpwuid(os.getuid()).pw_name
        sshd_port = free_port()
        (d / "sshd_config").write_text(textwrap.dedent(f"""\
            Port {sshd_port}
            ListenAddress {HOST}
            HostKey {d / 'host_key'}
            AuthorizedKeysFile {d / 'authorized_keys'}
            PidFile {d / 'sshd.pid'}
            StrictModes no
            UsePAM no
            PermitRootLogin prohibit-password
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            AllowTcpForwarding yes
            AllowUsers {user}
            X11Forwarding no
            PrintMotd no
            LogLevel ERROR
            # bash reads ~/.bashrc when sshd starts it (SHLVL < 2): a remote command
            # would pay for this machine's dotfiles (80 ms of pyenv init here), not ssh's.
            SetEnv SHLVL=1
            """))
        check = subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise HarnessError(f"sshd refuses its config: {(check.stderr or check.stdout).strip()}")
        self.sshd = Proc("sshd", [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], d)
        try:
            self.sshd.wait_port(sshd_port, 15)
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"sshd did not start: {exc}") from None
        self.port = free_port()
        self._login = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                       "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                       "-o", "LogLevel=ERROR", "-o", f"ControlPath={d / 'control'}",
                       "-i", str(d / "user_key"), "-p", str(sshd_port), f"{user}@{HOST}"]
        # The forward's connection is also a ControlMaster: `ssh HOST CMD` rides on it
        # (exec_argv), as Carapace's shims ride on its standing link; no handshake each.
        self.ssh = Proc("ssh", [
            "ssh", "-N", "-L", f"{HOST}:{self.port}:{HOST}:{self.upstream_port}",
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=yes",
            "-o", "ControlPersist=no", *self._login,
        ], d)
        try:
            self.ssh.wait_port(self.port, 20)
            r = httpx.get(f"http://{HOST}:{self.port}/api/v1/check", timeout=10)
            if r.status_code != 200:
                raise HarnessError(f"request through the forward answered {r.status_code}")
        except (HarnessError, httpx.HTTPError) as exc:
            self.stop()
            raise HarnessError(f"ssh -L did not come up: {exc}") from None
        return self

    def version(self) -> str:
        try:
            out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
            return (out.stderr or out.stdout).strip()
        except OSError:
            return "?"

    def exec_argv(self, *command: str) -> list[str]:
        """``ssh HOST COMMAND`` over the forward's connection (ControlMaster): the
        remote-command alternative to a shim, without a key exchange per run."""
        return ["ssh", "-o", "ControlMaster=no", *self._login, *command]

    def add_forward(self, upstream_port: int) -> int:
        """One more ``-L`` on the running connection (``ssh -O forward``): same ssh
        client, same sshd, so CPU accounting stays the same. Its local port."""
        port = free_port()
        out = subprocess.run(
            ["ssh", "-O", "forward", "-L", f"{HOST}:{port}:{HOST}:{upstream_port}",
             *self._login], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise HarnessError((out.stderr or out.stdout).strip() or f"exit {out.returncode}")
        if not port_open(port):
            raise HarnessError(f"forward port {port} is not open")
        return port

    def pids(self) -> dict[str, int]:
        out = {}
        if self.ssh is not None:
            out["ssh"] = self.ssh.pid
        return out

    def sshd_pids(self) -> dict[str, int]:
        """The sshd processes serving the forward (the listener's descendants)."""
        if self.sshd is None:
            return {}
        return {f"sshd.{i}": pid for i, pid in enumerate(children(self.sshd.pid))}

    def all_pids(self) -> dict[str, int]:
        """The ssh client and every sshd process serving it (for CPU and RSS accounting)."""
        return {**self.pids(), **self.sshd_pids()}

    def stop(self) -> None:
        for proc in (self.ssh, self.sshd):
            if proc is not None:
                proc.stop()
        # sshd forks one child per connection; they end with their connection.


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["kernel"] = os.uname().release
    except AttributeError:
        pass
    return info


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=1, sort_keys=False, default=str)
