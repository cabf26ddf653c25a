"""CLI decisions: argv patterns, the working directory, the environment a tool runs with."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Callable, Sequence
from typing import Final

from .decision import CliDecision, Decision, _cli_deny, _lookup, _rule
from .flags import denied_flag, unlisted_flag
from .limits import DEFAULT_LIMITS, ParseLimits, cli_limit_denial
from .model import BASE_ENV, DEFAULT_CWD, CliTool, Policy
from .quoting import _show

_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
"""Unicode category Cc (C0, DEL and C1; the set is fixed by the standard) but TAB:
one regex scan, ~50 times faster than asking ``unicodedata`` about each character."""


def argv_matches(args: Sequence[str], pattern: str) -> bool:
    """Whether decoded arguments match one argv pattern (semantics in the package docstring).

    An empty argv is the empty line, so ``"*"`` and ``""`` match it.
    """
    line = shlex.join(args)
    if fnmatch.fnmatchcase(line, pattern):
        return True
    return pattern.endswith(" *") and fnmatch.fnmatchcase(line, pattern[:-2])


def _host_realpath(path: bytes) -> bytes:
    """Resolve symlinks on the host; raises OSError if the path does not exist."""
    return os.path.realpath(path, strict=True)


def _within(path: bytes, root: bytes) -> bool:
    """Component-wise containment: /home/a/x is within /home/a, /home/ab is not."""
    if root == b"/":
        return path.startswith(b"/")
    root = root.rstrip(b"/")
    return path == root or path.startswith(root + b"/")


def decide_cli(
    policy: Policy,
    agent: str,
    tool: str,
    argv: list[bytes],
    cwd: bytes,
    env: list[tuple[bytes, bytes]],
    *,
    realpath: Callable[[bytes], bytes] = _host_realpath,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> CliDecision:
    """Decide one CLI request from the VM and, if allowed, build what to exec.

    ``argv`` is the arguments after the tool name; ``env`` the VM's
    environment (only ``env_passthrough`` names are taken from it); ``cwd``
    the VM's directory (used only with ``cwd_allowed``). ``realpath``
    resolves a directory on the host and raises OSError if it does not
    exist; tests inject their own. ``limits`` are the server-wide parse
    limits (the tool's own ``limits`` override them); a request over one is
    refused before its arguments are decoded. Never raises; denies by default.
    """
    found = _lookup(policy, agent, tool, CliTool)
    if isinstance(found, Decision):
        return _cli_deny(found.reason, found.rule, found.code)
    assert isinstance(found, CliTool)
    over = cli_limit_denial(found, limits.for_tool(found), argv, env)
    if over is not None:
        return over
    args = _decoded_args(argv)
    if isinstance(args, CliDecision):
        return args

    for k, pattern in enumerate(found.argv_deny_patterns):
        if argv_matches(args, pattern):
            return _cli_deny("the arguments match a deny pattern",
                             _rule(tool, "argv_deny_patterns", k, pattern))
    flag_denial = _flag_denial(found, tool, args)
    if flag_denial is not None:
        return flag_denial
    for k, pattern in enumerate(found.argv_allow_patterns):
        if argv_matches(args, pattern):
            rule = _rule(tool, "argv_allow_patterns", k, pattern)
            break
    else:
        return _cli_deny("the arguments match no allow pattern",
                         f"default deny: no tools.{tool}.argv_allow_patterns entry matches")

    place = _working_directory(found, tool, cwd, realpath)
    if isinstance(place, CliDecision):
        return place
    run_cwd, cwd_note = place
    run_env = _environment(found, tool, env)
    if isinstance(run_env, CliDecision):
        return run_env

    binary = found.binary
    return CliDecision(
        allow=True,
        reason=f"the arguments match an allow pattern; {cwd_note}",
        rule=rule,
        binary=binary,
        argv=[binary.encode("utf-8"), *argv],
        env=run_env,
        cwd=run_cwd,
        approval=_approval_rule(found, tool, args),
    )


def _approval_rule(found: CliTool, tool: str, args: list[str]) -> str:
    """The ``approve_patterns`` entry an allowed argv matches (it then waits), or ``""``."""
    for k, pattern in enumerate(found.approve_patterns):
        if argv_matches(args, pattern):
            return _rule(tool, "approve_patterns", k, pattern)
    return ""


def _flag_denial(found: CliTool, tool: str, args: list[str]) -> CliDecision | None:
    """The deny for a flag that ``argv_deny_flags`` names or ``argv_allow_flags`` omits."""
    hit = denied_flag(args, found.argv_deny_flags)
    if hit is not None:
        i, flag = hit
        k = found.argv_deny_flags.index(flag)
        return _cli_deny(f"argument {i + 1} gives the denied flag {flag}",
                         _rule(tool, "argv_deny_flags", k, flag))
    if found.argv_allow_flags is not None:
        unlisted = unlisted_flag(args, found.argv_allow_flags)
        if unlisted is not None:
            i, flag = unlisted
            return _cli_deny(f"argument {i + 1} gives the flag {_show(flag)}, "
                             "which argv_allow_flags does not list",
                             f"default deny: no tools.{tool}.argv_allow_flags entry names it")
    return None


def _decoded_args(argv: list[bytes]) -> list[str] | CliDecision:
    """The VM's arguments as text, or the deny for the first one that is not clean UTF-8."""
    if not isinstance(argv, list | tuple):
        return _cli_deny("argv is malformed", "default deny: malformed request", "bad_request")
    args: list[str] = []
    for i, raw in enumerate(argv, start=1):
        if not isinstance(raw, bytes):
            return _cli_deny(f"argument {i} is not bytes", "default deny: malformed request",
                             "bad_request")
        try:
            arg = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _cli_deny(f"argument {i} is not valid UTF-8",
                             "default deny: arguments must be UTF-8", "bad_request")
        bad = _CONTROL.search(arg)
        if bad is not None:
            return _cli_deny(
                f"argument {i} contains a control character (U+{ord(bad.group()):04X})",
                "default deny: arguments must not contain control characters",
                "bad_request",
            )
        args.append(arg)
    return args


def _working_directory(
    found: CliTool, tool: str, cwd: bytes, realpath: Callable[[bytes], bytes]
) -> tuple[bytes, str] | CliDecision:
    """Where the process runs and a note for the reason, or the deny if ``cwd`` is not allowed."""
    if found.cwd_allowed is None:
        return DEFAULT_CWD, "runs in /"
    cpath = f"tools.{tool}.cwd_allowed"
    if not isinstance(cwd, bytes) or not cwd.startswith(b"/") or b"\0" in cwd:
        return _cli_deny("the working directory must be an absolute path",
                         f"default deny: {cpath} needs an absolute cwd", "bad_request")
    try:
        resolved = realpath(cwd)
    except (OSError, ValueError):
        return _cli_deny("the working directory does not exist on the host",
                         f"default deny: {cpath} requires an existing directory")
    for k, allowed in enumerate(found.cwd_allowed):
        try:
            root = realpath(allowed.encode("utf-8"))
        except (OSError, ValueError):
            continue
        if _within(resolved, root):
            return resolved, f"cwd is within {cpath}[{k}]"
    shown = _show(resolved.decode("utf-8", "replace"))
    return _cli_deny(f"the working directory {shown} is outside cwd_allowed",
                     f"default deny: the resolved cwd is under no {cpath} entry")


def _environment(
    found: CliTool, tool: str, env: list[tuple[bytes, bytes]]
) -> dict[bytes, bytes] | CliDecision:
    """The whole environment of the process (base, passthrough, inject), or a deny."""
    run_env: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in BASE_ENV.items()}
    if not isinstance(env, list | tuple):
        return _cli_deny("the environment is malformed", "default deny: malformed request",
                         "bad_request")
    wanted = {name.encode("ascii") for name in found.env_passthrough}
    for i, item in enumerate(env):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or not isinstance(item[1], bytes)
        ):
            return _cli_deny(f"environment entry {i} is malformed",
                             "default deny: malformed request", "bad_request")
        name, value = item
        if name in wanted:
            if b"\0" in value:
                return _cli_deny(
                    f"environment variable {name.decode('ascii')} contains a NUL byte",
                    f"default deny: tools.{tool}.env_passthrough values must not contain NUL",
                    "bad_request",
                )
            run_env[name] = value
    for name_s, value_s in found.env_inject.items():
        run_env[name_s.encode("utf-8")] = value_s.encode("utf-8")
    return run_env
