"""Agent tokens: parsed once at the edge into a name → token map.

A token file holds either one bare token (agent ``default``) or one
``NAME:TOKEN`` line per agent; blank lines and ``#`` comments are skipped.
The server may also be pointed at a directory, where every regular file is
one agent named after the file. Errors name the file and line, never the
token itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_AGENT = "default"
MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TokenFileError(Exception):
    pass


def parse_token_line(line: str, where: str) -> tuple[str, bytes]:
    """One ``NAME:TOKEN`` or bare ``TOKEN`` line → (name, token)."""
    line = line.strip()
    name, sep, token = line.partition(":")
    if not sep:
        name, token = DEFAULT_AGENT, line
    name, token = name.strip(), token.strip()
    if not _NAME.match(name):
        raise TokenFileError(
            f"{where}: agent name {name[:40]!r} is not valid "
            "(letters, digits, '.', '_', '-'; at most 128)"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenFileError(
            f"{where}: the token for agent {name!r} is shorter than {MIN_TOKEN_LENGTH} "
            "characters; generate one with: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )
    return name, token.encode()


def _lines(text: str) -> list[tuple[int, str]]:
    return [
        (n, line)
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def load_server_tokens(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """All agents the server accepts, from a token file or a directory of them."""
    p = Path(path)
    tokens: dict[str, bytes] = {}
    try:
        if p.is_dir():
            for child in sorted(p.iterdir()):
                if not child.is_file() or child.name.startswith("."):
                    continue
                lines = _lines(child.read_text())
                if len(lines) != 1:
                    raise TokenFileError(f"{child}: expected exactly one token line")
                n, line = lines[0]
                _name, token = parse_token_line(line, f"{child}:{n}")
                tokens[child.name] = token
        else:
            for n, line in _lines(p.read_text()):
                name, token = parse_token_line(line, f"{p}:{n}")
                if name in tokens:
                    raise TokenFileError(f"{p}:{n}: agent {name!r} is listed twice")
                tokens[name] = token
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {p}: {exc.strerror or exc}") from None
    if not tokens:
        raise TokenFileError(f"{p}: no tokens found; put one token (or NAME:TOKEN lines) in it")
    return tokens


def load_agent_token(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """The agent's own (name, token) from its token file."""
    p = Path(path)
    try:
        lines = _lines(p.read_text())
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {p}: {exc.strerror or exc}") from None
    if len(lines) != 1:
        raise TokenFileError(
            f"{p}: expected exactly one line (TOKEN or NAME:TOKEN), found {len(lines)}"
        )
    n, line = lines[0]
    return parse_token_line(line, f"{p}:{n}")
