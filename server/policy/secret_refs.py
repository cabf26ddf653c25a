"""Secret references: the values of ``{file:}``, ``{credential:}``, ``{env:}`` and ``{command:}``.

The loader only parses a reference into a :class:`~.model.SecretRef`; nothing
is read or run there, so ``carapace-debug policy check`` can show a policy
without touching a secret. The daemon resolves every reference when it starts
and at each reload, ``policy check --resolve`` when asked. The resolver is
given all it reads from the world (the environment, the credentials directory
and a command runner), so tests inject them and the rest of the package never
looks at ``os.environ``.

A resolved value is a secret whatever its name: it is checked like a value
written in the file (``settings.min_secret_length``, a header's printable
ASCII), masked in tool output and never logged. An error names the key path
and the reference (file path, credential name, variable name, or a command's
``argv[0]``), never a value.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from .load import _Loader
from .model import (
    DEFAULT_SECRET_COMMAND_TIMEOUT,
    CliTool,
    HttpTool,
    Policy,
    PolicyError,
    SecretRef,
    Tool,
    inject_parts,
)

__all__ = [
    "MAX_SECRET_BYTES",
    "CommandResult",
    "CommandRunner",
    "SecretRefError",
    "SecretResolver",
    "UnresolvedSecret",
    "resolve_policy",
    "run_command",
]

MAX_SECRET_BYTES: Final = 64 * 1024
"""Largest value a reference may give. Real tokens and keys are a few KiB at most;
anything bigger is the wrong file (or a command printing a page of help)."""

_STDERR_SHOWN: Final = 160
"""Characters of a failed command's first stderr line that an error shows."""

_MASKED_WORD: Final = 6
"""Words this long or longer that a failed command printed on stdout are masked in
its stderr line; shorter ones are ordinary words, not secrets."""

_KILL_WAIT: Final = 2.0
"""Seconds to wait for a killed command to be reaped."""

_STDERR_KEPT: Final = 4096
"""Bytes of a command's stderr kept: enough for its first line."""


class SecretRefError(Exception):
    """A reference cannot give its value. The message never contains a value."""


class UnresolvedSecret(PolicyError):
    """The policy cannot be used because ``ref`` (at key ``path``) gave no usable value."""

    def __init__(self, message: str, path: str, source: str, ref: SecretRef) -> None:
        super().__init__(message, path, source)
        self.ref = ref


@dataclass(frozen=True)
class CommandResult:
    """What a ``{command:}`` did: ``returncode`` None means it timed out and was killed."""

    returncode: int | None
    stdout: bytes
    stderr: bytes


CommandRunner = Callable[[Sequence[str], float, Mapping[str, str]], CommandResult]
"""Runs ``(argv, timeout_secs, environment)``; raises OSError if it cannot start."""


def run_command(argv: Sequence[str], timeout: float, env: Mapping[str, str]) -> CommandResult:
    """Run ``argv`` without a shell, stdin closed, in a process group of its own.

    On timeout the whole group is killed, so a password manager's helper
    processes go with it. Output is kept only up to what could be used (more
    than :data:`MAX_SECRET_BYTES` of stdout also stops the command): a command
    that floods, such as ``cat /dev/urandom``, cannot fill the server's memory.
    """
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(env), start_new_session=True, close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    limits = {proc.stdout.fileno(): (out, MAX_SECRET_BYTES + 1),
              proc.stderr.fileno(): (err, _STDERR_KEPT)}
    try:
        with selectors.DefaultSelector() as selector:
            for pipe in (proc.stdout, proc.stderr):
                selector.register(pipe, selectors.EVENT_READ)
            while selector.get_map() and len(out) <= MAX_SECRET_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(proc.args, timeout)
                for key, _events in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    buf, limit = limits[key.fd]
                    buf += chunk[:max(0, limit - len(buf))]
        if len(out) > MAX_SECRET_BYTES:
            _kill_group(proc)
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return CommandResult(None, b"", b"")
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return CommandResult(returncode, bytes(out), bytes(err))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's whole process group, and reap the command."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_WAIT)


def _mask(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "[REDACTED]")
    return text


def _decode(data: bytes, what: str) -> str:
    if len(data) > MAX_SECRET_BYTES:
        raise SecretRefError(f"{what} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretRefError(f"{what} is not UTF-8 text") from None


def _strip_newline(text: str) -> str:
    """One trailing newline off (``echo TOKEN > file`` writes one), nothing else."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


class SecretResolver:
    """Turns references into values, reading only what it was given.

    ``environ`` is the server's own environment (for ``{env:}`` and as the
    environment of ``{command:}``), ``credentials_dir`` is systemd's
    ``$CREDENTIALS_DIRECTORY`` (None when the server was not given one) and
    ``run`` runs a command (:func:`run_command`) for at most its reference's
    ``timeout_secs``, else ``command_timeout``.
    """

    def __init__(self, environ: Mapping[str, str], credentials_dir: str | None = None,
                 run: CommandRunner = run_command,
                 command_timeout: float = DEFAULT_SECRET_COMMAND_TIMEOUT) -> None:
        self.environ = environ
        self.credentials_dir = credentials_dir
        self.run = run
        self.command_timeout = command_timeout

    @classmethod
    def from_environment(cls, environ: Mapping[str, str],
                         command_timeout: float = DEFAULT_SECRET_COMMAND_TIMEOUT
                         ) -> SecretResolver:
        """The resolver of a process started with ``environ`` (systemd sets the credentials
        directory there)."""
        return cls(environ, environ.get("CREDENTIALS_DIRECTORY") or None,
                   command_timeout=command_timeout)

    def value(self, ref: SecretRef, mask: Iterable[str] = ()) -> str:
        """The value ``ref`` gives; ``mask`` lists secrets an error must not show."""
        if ref.kind == "file":
            return _strip_newline(self._read(ref.target, "the file"))
        if ref.kind == "credential":
            if not self.credentials_dir:
                raise SecretRefError(
                    "$CREDENTIALS_DIRECTORY is not set: start the server from a systemd unit "
                    f"with LoadCredential={ref.target}:... (or LoadCredentialEncrypted=)")
            path = os.path.join(self.credentials_dir, ref.target)
            return _strip_newline(self._read(path, "the credential"))
        if ref.kind == "env":
            found = self.environ.get(ref.target)
            if found is None:
                raise SecretRefError("the variable is not set in the server's environment")
            return found
        return self._command(ref, mask)

    def _read(self, path: str, what: str) -> str:
        # Opened before it is checked, and checked by descriptor, so the file
        # judged is the file read; O_NONBLOCK so a FIFO cannot hang the load.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SecretRefError(f"cannot open {what}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SecretRefError(f"{what} is not a regular file")
            if st.st_mode & stat.S_IROTH:
                raise SecretRefError(
                    f"{what} is readable by every user of the host (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); run 'chmod o-r {path}'")
            data = b""
            while len(data) <= MAX_SECRET_BYTES:
                chunk = os.read(fd, MAX_SECRET_BYTES + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise SecretRefError(f"cannot read {what}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return _decode(data, what)

    def _command(self, ref: SecretRef, mask: Iterable[str]) -> str:
        program = ref.argv[0]
        timeout = ref.timeout_secs or self.command_timeout
        try:
            done = self.run(ref.argv, timeout, self.environ)
        except OSError as exc:
            raise SecretRefError(f"cannot run {program!r}: {exc.strerror or exc}") from None
        if done.returncode is None:
            raise SecretRefError(
                f"{program!r} did not finish within {timeout:g} s and was killed "
                "(raise timeout_secs in the reference if it needs longer)")
        if len(done.stdout) > MAX_SECRET_BYTES:
            raise SecretRefError(f"{program!r} printed more than {MAX_SECRET_BYTES} bytes "
                                 "(and was stopped)")
        if done.returncode != 0:
            # A failing command's stderr is written for people and usually says why
            # (not signed in, no such item); but it may echo a secret. So only its
            # first line is shown, cut short, with every secret known here masked:
            # the policy's own, those resolved so far, and anything the command
            # printed on stdout. stdout itself is never shown.
            stdout = done.stdout.decode("utf-8", "replace")
            printed = [stdout.strip(), *(line.strip() for line in stdout.splitlines()),
                       *(word for word in stdout.split() if len(word) >= _MASKED_WORD)]
            first = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
            shown = _mask(first[0], [*mask, *printed]) if first else ""
            why = f": {shown[:_STDERR_SHOWN]}" if shown else " (and wrote nothing on stderr)"
            raise SecretRefError(f"{program!r} exited with status {done.returncode}{why}")
        text = _decode(done.stdout, f"the output of {program!r}").strip()
        if not text:
            raise SecretRefError(f"{program!r} printed nothing on stdout")
        return text


def resolve_policy(policy: Policy, resolver: SecretResolver,
                   known_secrets: Iterable[bytes] = ()) -> Policy:
    """A copy of ``policy`` with the value of every reference in place, each checked
    like a value written in the file; PolicyError names the key path and the reference.

    ``known_secrets`` (the policy in force, when reloading) are masked in errors too.
    """
    if not policy.secret_refs():
        return policy
    loader = _Loader(policy.source)
    loader.min_secret_length = policy.settings.min_secret_length
    mask = [s.decode("utf-8", "replace") for s in (*known_secrets, *policy.secrets())]
    tools: dict[str, Tool] = {}
    for name, tool in policy.tools.items():
        key, values, refs = inject_parts(tool)
        resolved = dict(values)
        for item, ref in refs.items():
            path = f"tools.{name}.{key}.{item}"
            try:
                value = resolver.value(ref, mask)
            except SecretRefError as exc:
                raise UnresolvedSecret(
                    f"{policy.source}: {path}: cannot resolve {ref}: {exc}. The policy was "
                    "not loaded.", path, policy.source, ref) from None
            try:
                if key == "env_inject":
                    loader.env_value(item, value, path, by_ref=True)
                else:
                    loader.header_value(value, path)
            except PolicyError as exc:
                raise UnresolvedSecret(f"{exc} (the value comes from {ref})", path,
                                       policy.source, ref) from None
            resolved[item] = value
            mask.append(value)
        frozen = MappingProxyType(resolved)
        tools[name] = _with_injected(tool, key, frozen)
    return replace(policy, tools=MappingProxyType(tools))


def _with_injected(tool: Tool, key: str, values: Mapping[str, str]) -> Tool:
    """``tool`` with its ``env_inject`` or ``headers_inject`` (``key``) resolved."""
    if isinstance(tool, CliTool):
        return replace(tool, env_inject=values)
    if isinstance(tool, HttpTool):
        return replace(tool, headers_inject=values)
    if key == "env_inject":
        return replace(tool, env_inject=values)
    return replace(tool, headers_inject=values)
