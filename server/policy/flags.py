"""Flags in an argument list, read the way the tools' own option parsers read them.

A deny pattern over the joined line sees ``--reveal`` but not ``--reveal=true``,
and ``* --web*`` misses ``-w``. The tools behind Carapace parse options with
getopt_long, Go's pflag (gh, op), kong (gog) or argparse: between them a flag
``--name`` is given as ``--name``, ``--name=VALUE`` or with one dash
(``-name``, Go's standard flag package), and a short flag ``-w`` alone, in a
cluster (``-qw``, ``-wq``) or with its value attached (``-oFILE``). ``--``
ends the options: after it ``--web`` is an operand, as getopt has it.

Abbreviations are not expanded: getopt_long and argparse read ``--rev`` as
``--reveal`` when no other flag starts so, but which flags a tool has is not
known here, and ``--body`` (a real gh flag) would then pose as
``--body-file``. pflag and kong, the parsers of gh, op and gog, refuse
abbreviations; for a tool whose parser takes them, use ``argv_allow_flags``,
which names flags exactly and so refuses every abbreviation.

Where parsers disagree, the reading that finds a flag wins, so a denied flag
is found in every spelling some parser accepts. The cost is that an argument
that only looks like a denied flag is denied too (``--title -w`` denies, as
``-w`` might be a flag to a parser that does not know ``--title`` takes a
value; write ``--title=-w``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

FLAG_RE: Final = re.compile(r"-[A-Za-z0-9?]\Z|--[A-Za-z0-9][A-Za-z0-9._-]*\Z")
"""How a flag is written in a policy: ``-w`` (one character) or ``--name``."""

END_OF_OPTIONS: Final = "--"


def _long_name(arg: str) -> str | None:
    """The name of a ``--name`` or ``--name=value`` argument, or None if it is not one."""
    if not arg.startswith("--") or arg == END_OF_OPTIONS:
        return None
    return arg[2:].split("=", 1)[0]


def _options(args: Sequence[str]) -> Iterable[tuple[int, str]]:
    """(position, argument) of each argument that may be an option: those before ``--``."""
    for i, arg in enumerate(args):
        if arg == END_OF_OPTIONS:
            return
        if arg.startswith("-") and arg != "-":
            yield i, arg


def denied_flag(args: Sequence[str], flags: Sequence[str]) -> tuple[int, str] | None:
    """The first (argument index, policy flag) that ``args`` give in any spelling, or None."""
    longs = {f[2:] for f in flags if f.startswith("--")}
    shorts = {f[1] for f in flags if not f.startswith("--")}
    for i, arg in _options(args):
        name = _long_name(arg)
        if name is not None:
            if name in longs:
                return i, f"--{name}"
            continue
        single = arg[1:].split("=", 1)[0]
        if single in longs:  # Go's flag package: -name is --name
            return i, f"--{single}"
        for ch in arg[1:]:
            if ch in shorts:
                return i, f"-{ch}"
    return None


def unlisted_flag(args: Sequence[str], flags: Sequence[str]) -> tuple[int, str] | None:
    """The first (argument index, flag) where ``args`` give a flag not in ``flags``, or None.

    The flag is returned without its value (``--name``, ``-x``): a value may be a secret.

    Long flags must be named exactly (``--name`` or ``--name=value``); in a
    short cluster every character must be a listed short flag, so ``-Rowner/x``
    is refused (write ``-R owner/x``).
    """
    longs = {f[2:] for f in flags if f.startswith("--")}
    shorts = {f[1] for f in flags if not f.startswith("--")}
    for i, arg in _options(args):
        name = _long_name(arg)
        if name is not None:
            if name not in longs:
                return i, f"--{name}"
            continue
        for ch in arg[1:]:
            if ch not in shorts:
                return i, f"-{ch}"
    return None
