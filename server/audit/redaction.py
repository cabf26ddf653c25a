"""Redaction for the audit trail: by name (a tool's ``redact_patterns``) over a
JSON body, a query string or argv, and of every known secret in a whole record.

The rules are in the package doc ("What is kept out").
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import unquote_plus

REDACTED: Final = "[REDACTED]"
_VERBATIM = re.compile(r'[ !#-\[\]-~]+')
"""Printable ASCII without ``"`` and ``\\``: what JSON writes as itself."""


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def redact_json(value: Any, patterns: Sequence[str]) -> Any:
    """``value`` with the value of every object key matching a pattern replaced, at any depth."""
    if not patterns:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if _name_matches(str(k), patterns) else redact_json(v, patterns)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_json(v, patterns) for v in value]
    return value


def _flag_matches(flag: str, patterns: Sequence[str]) -> bool:
    if not flag.startswith("-"):
        return False
    bare = flag.lstrip("-")
    for p in patterns:
        if fnmatch.fnmatchcase(flag, p):
            return True
        if not p.startswith("-") and bare and fnmatch.fnmatchcase(bare, p):
            return True
    return False


def redact_argv(args: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """argv with the value of every flag named by a pattern replaced.

    ``FLAG VALUE`` → ``FLAG [REDACTED]``; ``FLAG=VALUE`` → ``FLAG=[REDACTED]``.
    Scanning does not stop at ``--``: redacting too much is the safe error.
    """
    out = list(args)
    if not patterns:
        return out
    i = 0
    while i < len(out):
        arg = out[i]
        name, eq, _value = arg.partition("=")
        if eq and _flag_matches(name, patterns):
            out[i] = f"{name}={REDACTED}"
        elif _flag_matches(arg, patterns) and i + 1 < len(out):
            out[i + 1] = REDACTED
            i += 1
        i += 1
    return out


def redact_query(query: str, patterns: Sequence[str]) -> str:
    """A query string with the value of every parameter whose decoded name matches replaced."""
    if not patterns or not query:
        return query
    parts = []
    for item in query.split("&"):
        name = item.partition("=")[0]
        if _name_matches(unquote_plus(name), patterns):
            parts.append(f"{name}={REDACTED}")
        else:
            parts.append(item)
    return "&".join(parts)


class AuditRedactor:
    """Replaces every known secret in the strings of a record with ``[REDACTED]``.

    Not :class:`carapace.server.masking.Scrubber`, which masks secrets in what
    goes back to the VM, as it streams; this one works on whole records.
    Secrets are only ever added (a secret removed from the policy by a reload
    is still a credential someone holds), longest first in one regex. A
    secret made of several words (``Bearer abc…``, ``Basic dXNl…``) also has
    each word of at least ``min_word`` characters redacted on its own, so the
    credential part is caught without its scheme.
    """

    min_word = 8

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self.verbatim_in_json = True
        """Every secret is written as itself inside a JSON string (printable ASCII without
        ``"`` or ``\\``): then a line that does not contain one held none (:meth:`found_in`)."""
        self._regex: re.Pattern[str] | None = None

    def add(self, values: Iterable[str | bytes]) -> None:
        new = set()
        for value in values:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            for part in (text, *(w for w in text.split() if len(w) >= self.min_word)):
                if part and part not in self._secrets:
                    new.add(part)
        if not new:
            return
        self._secrets |= new
        self.verbatim_in_json = all(_VERBATIM.fullmatch(s) for s in self._secrets)
        ordered = sorted(self._secrets, key=lambda s: (-len(s), s))
        self._regex = re.compile("|".join(re.escape(s) for s in ordered))

    def __len__(self) -> int:
        return len(self._secrets)

    def found_in(self, text: str) -> bool:
        """Whether ``text`` (a whole encoded record) contains a secret."""
        return self._regex is not None and self._regex.search(text) is not None

    def text(self, value: str) -> str:
        if self._regex is None:
            return value
        return self._regex.sub(REDACTED, value)

    def redact(self, value: Any) -> Any:
        """A copy of ``value`` (JSON-like) with every string redacted, keys included."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        return value
