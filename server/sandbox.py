"""Host-side confinement of CLI tools: what a tool process can see and reach.

A CLI tool runs on the host, so without confinement it has the server's
user and view of the disk: it could read the token file (every agent's
token), the policy (every injected secret), the TLS key, and overwrite the
audit log. With bubblewrap (``bwrap``, Debian's ``bubblewrap``; user, mount,
PID and IPC namespaces, no root needed where unprivileged user namespaces
are allowed) every tool process:

- sees the host read-only (``--ro-bind / /``), with a fresh ``/dev`` and a
  private ``/tmp``;
- never sees the server's own files (:attr:`Sandbox.hidden`: the policy
  file, the token file, the TLS key, the debug token file, the audit log's
  directory): an empty read-only tmpfs covers a directory, ``/dev/null``
  covers a file;
- runs in its own PID namespace, so it can neither read
  ``/proc/<server>/environ`` nor signal the server;
- has no new privileges (bwrap sets ``PR_SET_NO_NEW_PRIVS``) and dies with
  the server (``--die-with-parent``);
- gets what its policy ``sandbox`` section adds: ``writable_paths`` bound
  read-write, ``hide_paths`` covered, ``network: none`` (own network
  namespace), ``rlimits`` (applied by util-linux ``prlimit`` just before the
  tool runs, so bwrap itself is not limited).

Signals. The runner signals the whole process group (SIGTERM on timeout,
the VM's Ctrl-C). bwrap is in that group but does not forward signals: had
it the default action it would die at once and take the tool with it, so a
tool's own SIGINT handler would never finish. So bwrap starts with the
forwarded signals ignored (``env --ignore-signal``) and the tool starts with
them reset to the default (``env --default-signal``, inside the sandbox):
the group's signal reaches the tool as if bwrap were not there, and bwrap
exits when the tool does. The namespace's init ignores signals from outside
by kernel rule; SIGKILL reaches every process. bwrap passes the tool's exit
status through unchanged; a tool killed by signal N makes bwrap exit 128+N
(what a shell reports, and what the shim exits with either way), so the
audit record then has the code but no separate ``signal``.

The working directory. The policy checks ``cwd_allowed`` against the
directory's real path; using that *path* later would let a symlink swapped
into it in between move the process elsewhere. So the runner opens the
checked path once (``O_PATH | O_DIRECTORY | O_NOFOLLOW``), confirms through
``/proc/self/fd`` that the object it opened is still at the checked path
(a component swapped before the open shows there), and from then on uses
only that open directory: bwrap mounts it (``--ro-bind-fd``/``--bind-fd``)
at the checked path inside the sandbox and ``--chdir``s there; without
bwrap the child changes into ``/proc/self/fd/N`` (the same open directory)
before it execs. What was checked is what is used.

``settings.sandbox`` chooses: ``auto`` (default) uses bwrap when it works
here and otherwise runs tools unconfined, saying so loudly (a WARNING at
start and on reload, ``carapace-debug health``, the ``carapace_sandbox_mode``
metric); ``bwrap`` refuses to start (or to reload) without a working bwrap;
``none`` turns confinement off.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .policy import CliDecision, CliTool, McpTool, ToolSandbox

log = logging.getLogger("carapace.server")

SANDBOX_MODES: Final = ("bwrap", "none")
"""What is in force (``settings.sandbox: auto`` becomes one of these)."""

FORWARDED_SIGNAL_NAMES: Final = "INT,TERM,HUP,QUIT"
"""The signals the runner sends to a tool's group (cli_runner.FORWARDED_SIGNALS and
SIGTERM for timeouts): bwrap ignores them, the tool gets them at their default."""

PROBE_TIMEOUT: Final = 10.0
"""Seconds the start-up check of bwrap may take (it runs ``true`` in a sandbox)."""

_MB: Final = 1024 * 1024


class SandboxError(Exception):
    """The sandbox the policy asks for cannot be had here; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxStatus:
    """What confinement is in force, and why: for the log, health and metrics."""

    setting: str
    """``settings.sandbox`` of the policy in force."""
    mode: str
    """``bwrap`` or ``none``."""
    reason: str
    """Why this mode (for ``none``: why bwrap is not used)."""


@dataclass
class Spawn:
    """How to start one tool: the argv, where, and the one fd it needs (closed after)."""

    argv: list[bytes]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    _fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the directory fd in the server (the child has its own copy)."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _tool_path(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)


def open_checked_directory(path: bytes) -> int:
    """Open the directory the policy checked, and prove it is still at that path.

    Raises OSError (naming the path) if it cannot be opened or if what was
    opened is no longer at ``path`` (a component was swapped since the check).
    """
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    if os.fsencode(actual) != path:
        os.close(fd)
        raise OSError(0, "the directory changed after the policy checked it", path)
    return fd


def _within(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class Sandbox:
    """Builds each tool's command line; knows the server's files to hide and the mode.

    ``hidden`` is given at construction by the daemon (from its configuration:
    policy, tokens, TLS key, debug token, audit log directory).
    """

    def __init__(self, hidden: Sequence[str], *, bwrap: str | None = None) -> None:
        self.hidden = tuple(dict.fromkeys(os.path.abspath(p) for p in hidden if p))
        self.bwrap = bwrap if bwrap is not None else _tool_path("bwrap")
        self.env = _tool_path("env") or "/usr/bin/env"
        self.prlimit = _tool_path("prlimit")
        self.status = SandboxStatus("none", "none", "not configured yet")
        self._probed: str | bool | None = False
        """False: not probed; None: bwrap works; str: why it does not."""

    # -- the mode ----------------------------------------------------------------------
    def probe(self) -> str | None:
        """None if bwrap works here; otherwise why not (a success is remembered, a failure
        is checked again next time: the operator may have fixed it before a reload)."""
        if self._probed is not None:
            self._probed = self._probe()
        return self._probed if isinstance(self._probed, str) else None

    def _probe(self) -> str | None:
        if self.bwrap is None:
            return "bwrap was not found on PATH (install the bubblewrap package)"
        if not os.access(self.bwrap, os.X_OK):
            return f"bwrap could not be run: {self.bwrap} is missing or not executable"
        argv = self._bwrap_argv(ToolSandbox(), None, None, "/", [b"/bin/true"])
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=PROBE_TIMEOUT, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap could not be run: {exc}"
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            return (f"bwrap does not work here: {why[-1] if why else f'exit {done.returncode}'}"
                    " (are unprivileged user namespaces allowed? see DEPLOYMENT.md)")
        return None

    def configure(self, setting: str) -> SandboxStatus:
        """Apply ``settings.sandbox``; raise SandboxError if ``bwrap`` is required but broken."""
        if setting == "none":
            status = SandboxStatus(setting, "none", "settings.sandbox is none")
        else:
            problem = self.probe()
            if problem is None:
                status = SandboxStatus(setting, "bwrap", "bwrap works")
            elif setting == "bwrap":
                raise SandboxError(f"settings.sandbox is bwrap, but {problem}")
            else:
                status = SandboxStatus(setting, "none", problem)
        if status.mode == "none" and status != self.status:
            log.warning("CLI tools run UNCONFINED on this host (%s): a tool can read the "
                        "server's token file, policy and audit log", status.reason)
        elif status.mode == "bwrap" and self.status.mode != "bwrap":
            log.info("CLI tools run confined by bubblewrap (%s)", self.bwrap)
        self.status = status
        return status

    # -- one run -----------------------------------------------------------------------
    def spawn(self, decision: CliDecision, tool: CliTool | McpTool) -> Spawn:
        """The command line for one allowed run. Raises OSError if the cwd cannot be used."""
        fd = None
        if decision.cwd != b"/":
            fd = open_checked_directory(decision.cwd)
        try:
            cwd = decision.cwd.decode("utf-8", "surrogateescape")
            if self.status.mode == "bwrap":
                # Checked here, so a missing binary fails as it does unconfined (with a
                # clear error) rather than as an exit 127 from inside the sandbox.
                if not os.access(decision.argv[0], os.X_OK):
                    code = errno.EACCES if os.path.exists(decision.argv[0]) else errno.ENOENT
                    raise OSError(code, os.strerror(code), decision.binary)
                argv = self._bwrap_argv(tool.sandbox, fd, cwd, "/", decision.argv)
                return Spawn(argv, "/", (fd,) if fd is not None else (),
                             [fd] if fd is not None else [])
            argv = [*self._rlimit_prefix(tool.sandbox), *decision.argv]
            if fd is None:
                return Spawn(argv, "/")
            # The child changes into the open directory before exec, then the fd closes.
            return Spawn(argv, f"/proc/self/fd/{fd}", (), [fd])
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise

    def _rlimit_prefix(self, sandbox: ToolSandbox) -> list[bytes]:
        limits = sandbox.rlimits
        if not limits.any():
            return []
        if self.prlimit is None:
            raise OSError(0, "the tool has sandbox.rlimits but prlimit (util-linux) is "
                          "not installed on the host")
        args = [self.prlimit.encode()]
        for flag, value, scale in (("cpu", limits.cpu_secs, 1), ("as", limits.memory_mb, _MB),
                                   ("nproc", limits.nproc, 1), ("fsize", limits.fsize_mb, _MB)):
            if value is not None:
                args.append(f"--{flag}={value * scale}".encode())
        return [*args, b"--"]

    def _bwrap_argv(self, sandbox: ToolSandbox, cwd_fd: int | None, cwd: str | None,
                    chdir: str, argv: Sequence[bytes]) -> list[bytes]:
        assert self.bwrap is not None
        args: list[str] = [
            self.env, f"--ignore-signal={FORWARDED_SIGNAL_NAMES}", self.bwrap,
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-user", "--unshare-pid", "--unshare-ipc", "--die-with-parent",
            # No --new-session: the tool must stay in the process group the runner
            # signals; it has no controlling terminal to abuse (the runner made a new
            # session for bwrap, so none is attached).
        ]
        if sandbox.network == "none":
            args.append("--unshare-net")
        for path in sandbox.writable_paths:
            args += ["--bind-try", path, path]
        if cwd_fd is not None and cwd is not None:
            kind = "--bind-fd" if _within(cwd, sandbox.writable_paths) else "--ro-bind-fd"
            args += [kind, str(cwd_fd), cwd]
            chdir = cwd
        # Hidden last, so that no writable or cwd bind above can uncover them.
        for path in (*self.hidden, *sandbox.hide_paths):
            args += self._hide(path)
        # bwrap sets PWD after --chdir; the tool's environment stays exactly the policy's.
        args += ["--chdir", chdir, "--", self.env, "-u", "PWD",
                 f"--default-signal={FORWARDED_SIGNAL_NAMES}"]
        return [*(a.encode("utf-8", "surrogateescape") for a in args),
                *self._rlimit_prefix(sandbox), *argv]

    @staticmethod
    def _hide(path: str) -> list[str]:
        """Cover ``path`` (if it exists): an empty read-only dir, or /dev/null for a file."""
        try:
            is_dir = os.path.isdir(path)
            exists = is_dir or os.path.lexists(path)
        except OSError:
            return []
        if not exists:
            return []
        if is_dir:
            return ["--tmpfs", path, "--remount-ro", path]
        return ["--ro-bind", "/dev/null", path]


def server_files(policy_file: str, token_file: str, *, tls_key: str | None = None,
                 debug_token_file: str | None = None,
                 audit_log: str | None = None) -> list[str]:
    """The host paths no tool may see: the server's own secrets and its audit trail.

    The audit log's whole directory is hidden (its rotated files too), unless
    that directory is ``/``, when only the log and its backups' prefix are.
    """
    paths = [policy_file, token_file, tls_key or "", debug_token_file or ""]
    if audit_log:
        directory = os.path.dirname(os.path.abspath(audit_log))
        paths.append(directory if directory != "/" else os.path.abspath(audit_log))
    real = [os.path.realpath(p) for p in paths if p]
    return [p for p in dict.fromkeys([*(os.path.abspath(p) for p in paths if p), *real])]
