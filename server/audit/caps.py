"""Size caps for audit records: no field and no record grows past its cap, however
large or however escaped what the VM sent (see "Size caps" in the package doc).

Sizes are bytes of the record as written: compact JSON, ASCII only. That is
what fills the disk, and it is not the length of the string: an emoji is one
character and 12 bytes (``\\ud83d\\ude00``), a control character 6.

A value that is cut becomes one string, ``HEAD…[truncated: N bytes, sha256 HEX]``:
the start of the value, then how many bytes the whole value had and their
SHA-256, so a reviewer holding the original (from the VM, a sniff capture)
can check it is the one recorded. For a string, N and HEX are of its UTF-8;
for a list or an object cut as a whole (``argv``, ``body``), of its compact
JSON in UTF-8 (``json.dumps(v, ensure_ascii=False, separators=(",", ":"))``),
and HEAD is the start of that JSON. Values are cut after secrets are
redacted, so no cut can split a secret and leave its first half behind, and
no digest is taken of a secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

MAX_FIELD_BYTES: Final = 2048
"""Longest string (a path, one argument, a cwd, a tool name, an error text) kept whole:
long enough for any real path or flag, short enough that one field cannot crowd out
the rest of its record."""
DEFAULT_MAX_RECORD_BYTES: Final = 16 * 1024
"""Largest record written. A real record is 300-700 bytes; 16 KiB still holds an argv
of 256 short arguments or a modest logged body, and keeps a flood of deny records
(at most ``--audit-deny-limit`` of them, 100 per 10 s) at 160 KiB/s before the byte
budget (``--audit-deny-bytes``) applies (see DEPLOYMENT.md, "Audit retention under a
flood")."""
MIN_RECORD_BYTES: Final = 4096
"""Smallest ``--audit-max-record-bytes`` accepted: every key of every record, each cut
to its marker (about 110 bytes), still fits."""
KEY_LIMITS: Final = {"tool": 256, "method": 64}
"""Tighter caps for fields that name rather than describe: the VM names tools (and a
deny records any name), and a method is a word."""
CONTENT_KEYS: Final = frozenset({"body", "body_text"})
"""Content the operator opted into (``log_body``): only the record cap applies to it."""
FIXED_KEYS: Final = ("ts", "event", "request_id", "agent", "kind", "decision")
"""What makes a record findable: cut as a whole only as the very last resort."""
MARK: Final = "…[truncated: {n} bytes, sha256 {digest}]"
TRUNCATED_KEY: Final = "truncated"
"""Added to a record that had anything cut: the top-level keys whose values were cut."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
"""``json.dumps`` with these arguments, made once (dumps builds an encoder per call)."""
_PLAIN = (int, float, bool, type(None))


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as it is written: a line of compact, ASCII-only JSON.

    ASCII only: U+2028/U+2029/U+0085 would be line breaks to some readers.
    """
    return (_ENCODER.encode(record) + "\n").encode("ascii")


def _encoded_len(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string written ASCII-only (json's C encoder)."""
    return len(json.dumps(text)) - 2


def _marker(full: bytes) -> str:
    return MARK.format(n=len(full), digest=hashlib.sha256(full).hexdigest())


def cut_text(text: str, limit: int, full: bytes | None = None) -> str | None:
    """``text`` cut so that, JSON-encoded (without its quotes), it takes at most
    ``limit`` bytes, marker included; None if it fits as it is.

    ``full``: the bytes the marker describes (default: ``text`` in UTF-8). Each
    character takes at least one byte, so only the first ``limit`` characters are
    ever encoded, and the cut point is found by bisection: a few encodings of at most
    ``limit`` characters each, whatever the VM sent.
    """
    if len(text) * 12 <= limit:
        return None  # the common case: fits even if every character were an emoji
    if len(text) <= limit and _encoded_len(text) <= limit:
        return None
    if full is None:
        full = text.encode("utf-8", "surrogatepass")
    mark = _marker(full)
    room = limit - _encoded_len(mark)
    low, high = 0, min(len(text), max(room, 0))  # the longest head that fits is in here
    head = text[:high]
    if head.isascii() and head.isprintable() and '"' not in head and "\\" not in head:
        low = high  # one byte a character: no need to search
    while low < high:
        mid = (low + high + 1) // 2
        if _encoded_len(text[:mid]) <= room:
            low = mid
        else:
            high = mid - 1
    return text[:low] + mark


def cut_value(value: Any, limit: int) -> str:
    """Any value cut as a whole to a marked string of at most ``limit`` encoded bytes."""
    if isinstance(value, str):
        return cut_text(value, limit) or value
    doc = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    full = doc.encode("utf-8", "surrogatepass")
    return cut_text(doc, limit, full=full) or doc  # None: the JSON fits after all


def cap_fields(value: Any, limit: int = MAX_FIELD_BYTES) -> tuple[Any, bool]:
    """``value`` with every string in it (object keys too) cut to ``limit`` bytes;
    and whether anything was cut."""
    if isinstance(value, str):
        cut = cut_text(value, limit)
        return (value, False) if cut is None else (cut, True)
    if isinstance(value, list | tuple):
        out = [cap_fields(v, limit) for v in value]
        return [v for v, _ in out], any(c for _, c in out)
    if isinstance(value, dict):
        items = [(cap_fields(str(k), limit), cap_fields(v, limit)) for k, v in value.items()]
        return ({k: v for (k, _), (v, _) in items},
                any(ck or cv for (_, ck), (_, cv) in items))
    return value, False


class RecordCap:
    """Fits records into ``max_record_bytes``.

    First every string outside :data:`CONTENT_KEYS` is cut to ``max_field_bytes``;
    if the record is still too large, its largest fields are cut as a whole,
    largest first, each just enough; the keys in :data:`FIXED_KEYS` go last.
    """

    def __init__(self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 max_field_bytes: int = MAX_FIELD_BYTES) -> None:
        if max_record_bytes < MIN_RECORD_BYTES:
            raise ValueError(f"--audit-max-record-bytes must be at least {MIN_RECORD_BYTES}")
        self.max_record_bytes = max_record_bytes
        self.max_field_bytes = min(max_field_bytes, max_record_bytes // 4)

    def encode(self, record: Mapping[str, Any]) -> tuple[bytes, list[str]]:
        """The record's line, cut to fit; and the top-level keys that were cut."""
        capped: dict[str, Any] = {}
        cut_keys: list[str] = []
        for key, value in record.items():
            if key in CONTENT_KEYS:
                capped[key] = value
                continue
            limit = min(KEY_LIMITS.get(key, self.max_field_bytes), self.max_field_bytes)
            kind = type(value)
            if (kind is str and len(value) * 12 <= limit) or kind in _PLAIN:
                capped[key] = value  # fits whatever it holds (cut_text's first test), or a number
                continue
            capped[key], was_cut = cap_fields(value, limit)
            if was_cut:
                cut_keys.append(key)
        data = encode_record(self._marked(capped, cut_keys))
        if len(data) > self.max_record_bytes:
            data = self._fit_whole(record, capped, cut_keys, data)
        return data, cut_keys

    @staticmethod
    def _marked(capped: dict[str, Any], cut_keys: list[str]) -> dict[str, Any]:
        return {**capped, TRUNCATED_KEY: sorted(cut_keys)} if cut_keys else capped

    def _fit_whole(self, record: Mapping[str, Any], capped: dict[str, Any],
                   cut_keys: list[str], data: bytes) -> bytes:
        """Cut whole fields, largest first, until the record fits.

        Each cut takes what the record is over by, counting the ``truncated``
        entry the cut itself adds; a field whose marker would be no shorter
        than its value is left whole, so cutting never grows a record.
        """
        sizes = {k: _value_len(v) for k, v in capped.items()}
        order = sorted((k for k in capped if k not in FIXED_KEYS), key=lambda k: -sizes[k])
        order += [k for k in FIXED_KEYS if k in capped and k not in ("ts", "event")]
        for key in order:
            if len(data) <= self.max_record_bytes:
                break
            keys = cut_keys if key in cut_keys else [*cut_keys, key]
            over = len(encode_record(self._marked(capped, keys))) - self.max_record_bytes
            cut = cut_value(record[key], max(0, sizes[key] - over - 2))  # 2: its quotes
            if _value_len(cut) >= sizes[key]:
                continue
            capped[key], sizes[key] = cut, _value_len(cut)
            cut_keys[:] = keys
            data = encode_record(self._marked(capped, cut_keys))
        if len(data) > self.max_record_bytes:  # cannot happen above MIN_RECORD_BYTES
            whole = encode_record(record)
            data = encode_record({"ts": record.get("ts"), "event": record.get("event"),
                                  TRUNCATED_KEY: ["*"], "record": _marker(whole)})
        return data


def _value_len(value: Any) -> int:
    """Bytes ``value`` takes in a written record (as :func:`encode_record` writes it)."""
    return len(json.dumps(value, separators=(",", ":"), default=str))
