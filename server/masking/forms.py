"""Secrets and the encoded forms of each that the scrubber matches."""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, quote_plus

REDACTED: Final = b"[REDACTED]"
REDACTED_TEXT: Final = "[REDACTED]"

MIN_FORM_LENGTH: Final = 6
"""Encoded forms shorter than this are not matched (they would hit ordinary text)."""

WRAP_MIN_LINE: Final = 60
"""A line break may split a base64 form only after this many base64 characters on its line."""

SSE_SPLIT_MIN: Final = 4
"""An SSE event is held back only if its data ends with at least this many characters of a form."""

NEEDLE_MERGE_MIN: Final = 20
"""Two needles sharing a substring this long are searched as that one substring."""

_LINES: Final = re.compile(rb"[\r\n]+")
_AUTH: Final = re.compile(rb"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*) +(\S(?:.*\S)?)\Z", re.DOTALL)
_AUTH_SCHEMES: Final = frozenset({b"bearer", b"basic", b"token", b"bot", b"apikey", b"key",
                                  b"digest", b"negotiate", b"ntlm", b"sso-key"})
"""Authorization schemes whose credentials are also masked on their own."""
_URL_HEX: Final = re.compile(r"%[0-9A-F]{2}")
_JSON_HEX: Final = re.compile(r"\\u[0-9a-f]{4}")

# --------------------------------------------------------------------------
# Secrets and their encoded forms


def expand_secrets(values: Iterable[bytes], min_length: int = 8) -> list[bytes]:
    """The byte strings to mask for ``values``: each secret, line by line, plus derived parts.

    A value spanning several lines is masked line by line (lines shorter than
    ``min_length`` are dropped). From an authorization value ``SCHEME
    CREDENTIALS`` (Bearer, Basic, Token, Bot, ApiKey, Key, Digest, Negotiate,
    NTLM, sso-key) the credentials are added, and for ``Basic`` the decoded
    ``user:password`` and the password, when at least ``min_length`` long.
    Longest first.
    """
    out: set[bytes] = set()
    for value in values:
        for line in _LINES.split(value):
            if len(line) >= min_length:
                out.add(line)
        found = _AUTH.match(value)
        if (found is None or b"\n" in value or b"\r" in value
                or found.group(1).lower() not in _AUTH_SCHEMES):
            continue
        credentials = found.group(2)
        if len(credentials) >= min_length:
            out.add(credentials)
        if found.group(1).lower() == b"basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                continue
            if b"\n" in decoded or b"\r" in decoded:
                continue
            if len(decoded) >= min_length:
                out.add(decoded)
            _user, colon, password = decoded.partition(b":")
            if colon and len(password) >= min_length:
                out.add(password)
    return sorted(out, key=lambda s: (-len(s), s))


def _b64_forms(secret: bytes) -> set[bytes]:
    """Base64 of ``secret`` alone and inside a larger stream, both alphabets."""
    out: set[bytes] = set()
    n = len(secret)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(secret)
        out.add(whole)
        out.add(whole.rstrip(b"="))
        for shift in range(3):
            # With ``shift`` unknown bytes before the secret and unknown bytes after
            # it, output character i covers input bits 6i..6i+5: keep those that lie
            # wholly inside the secret.
            first = -(-8 * shift // 6)
            last = (8 * (shift + n) - 6) // 6
            out.add(encode(bytes(shift) + secret + bytes(2))[first:last + 1])
    return out


def _text_forms(text: str) -> set[bytes]:
    """JSON-escaped and URL-encoded forms of a secret that is valid UTF-8."""
    out: set[str] = set()
    ascii_json = json.dumps(text)[1:-1]
    for escaped in (ascii_json, json.dumps(text, ensure_ascii=False)[1:-1],
                    _JSON_HEX.sub(lambda m: m.group().upper().replace("\\U", "\\u"),
                                  ascii_json)):
        out.add(escaped)
        out.add(escaped.replace("/", "\\/"))
    for encoded in (quote(text, safe=""), quote(text, safe="/"), quote_plus(text, safe=""),
                    quote(text, safe="!'()*")):
        out.add(encoded)
        out.add(_URL_HEX.sub(lambda m: m.group().lower(), encoded))
    return {form.encode("utf-8") for form in out}


def encoded_forms(secret: bytes) -> tuple[list[bytes], list[bytes]]:
    """``(literal, base64)``: every form of ``secret`` the scrubber matches.

    Literal forms (the secret, JSON and URL encodings) match exactly; base64
    forms may also be split by line breaks (see the module docstring). Forms
    shorter than :data:`MIN_FORM_LENGTH` are left out.
    """
    literal = {secret}
    try:
        literal |= _text_forms(secret.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    wrapped = _b64_forms(secret)
    literal -= wrapped
    return ([f for f in sorted(literal) if len(f) >= MIN_FORM_LENGTH],
            [f for f in sorted(wrapped) if len(f) >= MIN_FORM_LENGTH])


def needles(forms: Iterable[bytes]) -> tuple[bytes, ...]:
    """Few substrings such that every form contains at least one of them."""
    found: list[bytes] = []
    for form in sorted(set(forms), key=len):
        if not any(needle in form for needle in found):
            found.append(form)
    while True:
        best = b""
        pair = (0, 0)
        for i, a in enumerate(found):
            for j in range(i + 1, len(found)):
                b = found[j]
                m = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(
                    0, len(a), 0, len(b))
                if m.size > len(best):
                    best, pair = a[m.a:m.a + m.size], (i, j)
        if len(best) < NEEDLE_MERGE_MIN:
            return tuple(found)
        found = [n for k, n in enumerate(found) if k not in pair and best not in n] + [best]


_RARITY: Final = (b"QZJXqzjxKVWYkvwy~^`|%GUBFPHMDLNORTICAES+gbpfmucldrhsnioate"
                  b"9876543210\\=/_-.:@,;'\"*!?#$&()[]{}<> \t")
"""Bytes from rarest to commonest in ordinary tool output (a rough guess; bytes not listed
count as common)."""


def anchors(forms: Iterable[bytes]) -> tuple[int, ...]:
    """A few rare bytes such that every form contains at least one of them."""
    rank = {b: i for i, b in enumerate(_RARITY)}
    chosen: list[int] = []
    for form in sorted(set(forms)):
        if not any(b in form for b in chosen):
            chosen.append(min(form, key=lambda b: rank.get(b, len(_RARITY))))
    return tuple(chosen)


