"""The compiled matcher for one set of secrets, its per-stream states, and the one per policy."""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol

from carapace.protocol.sse import Event

from .forms import (
    REDACTED,
    REDACTED_TEXT,
    SSE_SPLIT_MIN,
    WRAP_MIN_LINE,
    anchors,
    encoded_forms,
    expand_secrets,
    needles,
)

_B64_LINE: Final = rb"[A-Za-z0-9+/=_-]"
_B64_LINE_RUN: Final = re.compile(_B64_LINE + b"{%d}" % WRAP_MIN_LINE)
_GAP: Final = (rb"(?:\n(?<=" + _B64_LINE + b"{%d}\\n)|\\r\\n(?<=" % WRAP_MIN_LINE + _B64_LINE
               + b"{%d}\\r\\n))?" % WRAP_MIN_LINE)
_B64_LINE_BYTES: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
_WORD_SIZE: Final = memoryview(b"\0\0\0\0").cast("I").itemsize
_SAMPLE_BELOW: Final = 4096
"""Buffers shorter than this (after line breaks are removed) are sampled before any find."""
_BREAKS: Final = re.compile(rb"\r\n|\n|\r")
_CONTEXT: Final = WRAP_MIN_LINE + 4
"""Bytes of already-released input a stream keeps to decide the wrap rule at its start."""
_CR: Final = 13
_LF: Final = 10
_FIND_MAX: Final = 6
"""Up to this many needles (one secret has four), varied text is searched with finds."""


def _monotonous(view: bytes, size: int) -> bool:
    """Whether one byte makes up a third of a sample of ``view`` (padding, runs)."""
    sample = view[::max(1, size // 48)]
    return any(sample.count(sample[i:i + 1]) * 3 > len(sample)
               for i in range(0, len(sample), 6))


def _max_match(form: bytes, wrapped: bool) -> int:
    """The longest a match of ``form`` can be in bytes (line breaks included)."""
    if not wrapped or len(form) < 2:
        return len(form)
    return len(form) + 2 * (1 + (len(form) - 2) // WRAP_MIN_LINE)


# --------------------------------------------------------------------------
# The scrubber


class Scrubber:
    """The compiled matcher for one set of secrets; shared by all of a policy's streams.

    ``scrub`` / ``scrub_text`` scrub a complete value; ``stream()`` and
    ``events()`` make the per-stream state for byte streams and SSE events.
    """

    def __init__(self, secrets: Iterable[bytes], *, min_length: int = 8) -> None:
        self.secrets: tuple[bytes, ...] = tuple(expand_secrets(secrets, min_length))
        literal: set[bytes] = set()
        wrapped: set[bytes] = set()
        for secret in self.secrets:
            lit, b64 = encoded_forms(secret)
            literal.update(lit)
            wrapped.update(b64)
        literal -= wrapped
        self.literal_forms: tuple[bytes, ...] = tuple(sorted(literal))
        self.wrapped_forms: tuple[bytes, ...] = tuple(sorted(wrapped))
        forms = [(f, False) for f in literal] + [(f, True) for f in wrapped]
        forms.sort(key=lambda fw: (-len(fw[0]), fw[0]))
        self.active = bool(forms)
        """False when there is nothing to mask: callers skip the scrubber entirely."""
        self.max_match = max((_max_match(f, w) for f, w in forms), default=0)
        self.max_hold = max(self.max_match - 1, 0)
        """The most bytes a stream ever holds back (the longest match, less one)."""
        self.needles = needles(f for f, _ in forms)
        self._forms = forms
        self._first1 = frozenset(f[:1] for f, _ in forms if len(f) > 1)
        self._first2 = frozenset(f[:2] for f, _ in forms if len(f) > 2)
        self._first_bytes = frozenset(f[0] for f, _ in forms)
        self._end_bytes = frozenset(b for f, _ in forms for b in f[:-1])
        """Bytes a partial match can end with (besides line breaks)."""
        self.anchors = anchors(f for f, _ in forms)
        self._grams = frozenset(n[i:i + 4] for n in self.needles for i in range(len(n) - 3))
        self._stride = max(1, min((len(n) for n in self.needles), default=4) - 3)
        # Word sampling: every needle occurrence covers an aligned 4-byte word at a multiple
        # of 4 * _word_step (0: needles too short, use the finds). About 0.04 µs a word, so
        # ~70 µs per 64 KiB, the same whatever the text; a find is ~8 µs per 64 KiB of
        # varied text but several times that on runs of a character the needle contains.
        step = (self._stride // 4) if _WORD_SIZE == 4 else 0
        self._word_step = step if step >= 2 else 0
        self._words = frozenset(int.from_bytes(g, sys.byteorder) for g in self._grams)
        self._nonfinal3 = frozenset(f[i - 3:i] for f, _ in forms for i in range(3, len(f)))
        by_first: dict[int, list[bytes]] = {}
        wrapped_by_first: dict[int, list[bytes]] = {}
        for f, w in forms:
            by_first.setdefault(f[0], []).append(f)
            if w:
                wrapped_by_first.setdefault(f[0], []).append(f)
        self._by_first: Mapping[int, list[bytes]] = by_first
        self._wrapped_by_first: Mapping[int, list[bytes]] = wrapped_by_first
        # Text views for the SSE event rule.
        self._tail_chars = frozenset(
            ch for f, _ in forms for ch in f.decode("utf-8", "replace")[:-1]) | {"\n", "\r"}
        suffixes: dict[str, list[tuple[str, str]]] = {}
        for f, _ in forms:
            try:
                text = f.decode("utf-8")
            except UnicodeDecodeError:
                continue
            for j in range(1, SSE_SPLIT_MIN):
                rest = text[j:]
                if len(rest) >= 3:  # safe: the previous event must end with the start
                    suffixes.setdefault(rest[:3], []).append((text[:j], rest))
        for entries in suffixes.values():
            entries.sort(key=lambda e: -len(e[1]))
        self._suffixes: Mapping[str, list[tuple[str, str]]] = suffixes

    @functools.cached_property
    def _full(self) -> re.Pattern[bytes]:
        """Every form, longest first (compiled on first use: only chunks with a needle
        need it, and compiling takes a while for long secrets)."""
        return re.compile(b"|".join(
            _GAP.join(re.escape(f[i:i + 1]) for i in range(len(f))) if w else re.escape(f)
            for f, w in self._forms) or b"(?!)")

    # -- one-shot ---------------------------------------------------------------

    def scrub(self, data: bytes) -> bytes:
        """``data`` with every match replaced (a complete value: nothing held back)."""
        if not self.active or not data:
            return data
        return self._scan(data, b"", True)[0]

    def scrub_text(self, text: str) -> str:
        """:meth:`scrub` for text (UTF-8)."""
        if not self.active or not text:
            return text
        raw = text.encode("utf-8", "surrogatepass")
        out = self._scan(raw, b"", True)[0]
        return text if out is raw else out.decode("utf-8", "surrogatepass")

    def scrub_headers(self, headers: Iterable[tuple[bytes, bytes]]
                      ) -> tuple[tuple[bytes, bytes], ...]:
        """Header names and values scrubbed (one value is never split across two headers)."""
        return tuple((self.scrub(k), self.scrub(v)) for k, v in headers)

    # -- per stream -------------------------------------------------------------

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)

    def events(self) -> EventScrubber:
        return EventScrubber(self)

    def output_filters(self) -> Callable[[int], StreamScrubber] | None:
        """The per-fd filter factory for ``server/cli_runner.py`` (None: nothing to mask)."""
        if not self.active:
            return None
        return lambda _fd: StreamScrubber(self)

    # -- the matcher ------------------------------------------------------------

    def _scan(self, buf: bytes, ctx: bytes, final: bool) -> tuple[bytes, int]:
        """Scrub ``buf``: (output for ``buf[:h]``, ``h``); ``buf[h:]`` must be held back.

        ``ctx`` is the input released just before ``buf`` (for the wrap rule only).
        With ``final`` nothing more will come, so nothing is held.
        """
        n = len(buf)
        hold = n if final else self._hold(buf, ctx, 0)
        if not self._may_match(buf):
            return (buf if hold == n else buf[:hold]), hold
        data = ctx + buf
        c = len(ctx)
        out: list[bytes] = []
        done = 0
        while True:
            m = self._full.search(data, c + done)
            if m is None or m.start() - c >= hold:
                break
            out.append(buf[done:m.start() - c])
            out.append(REDACTED)
            done = m.end() - c
            if done > hold:
                hold = n if final else self._hold(buf, ctx, done)
        if done < hold:
            out.append(buf[done:hold])
        return b"".join(out), max(hold, done)

    def _may_match(self, buf: bytes) -> bool:
        """False if ``buf`` surely holds no match: it contains no needle.

        First the *anchors* are looked for (``memchr``): a few bytes, rare in
        ordinary output, such that every form contains one; without them there is
        no match. Then line breaks are removed, so that wrapped base64 is seen
        whole, and a short buffer is sampled: every needle occurrence covers
        one of the 4-byte windows at multiples of ``_stride``, so if none of those
        is a 4-gram of a needle, no needle is there (one ``find`` per needle costs
        more than the whole sample on a few hundred bytes). A long buffer is sampled the
        same way by aligned 4-byte words — one pass whatever the number of
        needles, and as fast on padding as on text — unless there are only a few
        needles and the text is varied: then a ``find`` per needle is quicker
        (a find slows down several times on long runs of a character its needle
        contains, like padding). Only when a sample hits are the needles searched.
        """
        for anchor in self.anchors:
            if anchor in buf:
                break
        else:
            return False
        view = buf.replace(b"\n", b"") if _LF in buf else buf
        if _CR in view:
            view = view.replace(b"\r", b"")
        size = len(view)
        if size < _SAMPLE_BELOW:
            if self._grams.isdisjoint([view[i:i + 4] for i in range(0, size - 3, self._stride)]):
                return False
        elif self._word_step and (len(self.needles) > _FIND_MAX or _monotonous(view, size)):
            words = memoryview(view)[:size - size % 4].cast("I")[::self._word_step]
            if self._words.isdisjoint(words):
                return False
        return any(needle in view for needle in self.needles)

    def _hold(self, buf: bytes, ctx: bytes, lo: int) -> int:
        """Where the held-back tail of ``buf`` starts (``len(buf)``: nothing held).

        That is the leftmost position at or after ``lo`` from which the rest of
        ``buf`` is a proper prefix of some match.
        """
        n = len(buf)
        if n <= lo or not self.max_hold:
            return n
        last = buf[-1]
        if last == _LF or last == _CR:
            # A partial match can end in a line break only if a base64 character is
            # right before it (and more, which _tail_start checks).
            brk = n - 2 if last == _LF and n >= 2 and buf[-2] == _CR else n - 1
            if brk - 1 < lo or buf[brk - 1] not in _B64_LINE_BYTES:
                return n
        elif last not in self._end_bytes:
            return n
        width = self.max_hold + _CONTEXT + 2
        if n >= width:
            win, off = buf[n - width:], n - width
        else:
            win = (ctx + buf)[-width:]
            off = n - len(win)
        return self._tail_start(win, max(lo - off, 0, -off)) + off

    def _tail_start(self, win: bytes, lo: int) -> int:
        n = len(win)
        if n <= lo or not self.max_hold:
            return n
        last = win[-1]
        if last == _LF or last == _CR:
            # Only a base64 form can go on after a line break, and only where the wrap rule
            # allows one.
            brk = n - 2 if last == _LF and n >= 2 and win[-2] == _CR else n - 1
            if brk - 1 < lo or not self._wrap_ok(win, brk):
                return n
            return self._slow_tail(win, lo)
        tail = win[-5:]
        if b"\n" in tail or b"\r" in tail:
            return self._slow_tail(win, lo)
        if n - lo >= 3 and win[-3:] in self._nonfinal3:
            return self._slow_tail(win, lo)
        if n - lo >= 2 and win[-2:] in self._first2:
            return n - 2
        if win[-1:] in self._first1:
            return n - 1
        return n

    def _slow_tail(self, win: bytes, lo: int) -> int:
        n = len(win)
        for q in range(max(lo, n - self.max_hold), n):
            if win[q] in self._first_bytes and self._is_partial(win, q):
                return q
        return n

    def _is_partial(self, win: bytes, q: int) -> bool:
        """Whether ``win[q:]`` is a proper prefix of some match."""
        seg = win[q:]
        if b"\n" not in seg and b"\r" not in seg:
            return any(len(seg) < len(f) and f.startswith(seg)
                       for f in self._by_first.get(seg[0], ()))
        parts: list[bytes] = []
        pos = 0
        for brk in _BREAKS.finditer(seg):
            if brk.start() == pos:  # at the start, or right after another break
                return False
            if brk.group() == b"\r" and brk.end() != len(seg):
                return False  # a lone CR is allowed only as the first half of a CRLF to come
            if not self._wrap_ok(win, q + brk.start()):
                return False
            parts.append(seg[pos:brk.start()])
            pos = brk.end()
        parts.append(seg[pos:])
        chars = b"".join(parts)
        return any(len(chars) < len(f) and f.startswith(chars)
                   for f in self._wrapped_by_first.get(seg[0], ()))

    @staticmethod
    def _wrap_ok(data: bytes, pos: int) -> bool:
        """Whether a line break may start at ``pos`` inside a base64 form."""
        return pos >= WRAP_MIN_LINE and _B64_LINE_RUN.fullmatch(
            data, pos - WRAP_MIN_LINE, pos) is not None

    # -- the SSE event rule -------------------------------------------------------

    def _split_tail(self, data: str) -> int:
        """Characters at the end of ``data`` that are a proper prefix of some match."""
        if not data or data[-1] not in self._tail_chars:
            return 0
        win = data[-(self.max_hold + _CONTEXT + 2):].encode("utf-8", "surrogatepass")
        q = self._tail_start(win, 0)
        return len(win[q:].decode("utf-8", "surrogatepass")) if q < len(win) else 0

    def _join(self, first: str, k: int, second: str) -> tuple[str, str] | None:
        """Mask a match that starts in the last ``k`` characters of ``first`` and ends in
        ``second``: the two new data strings, or None if there is none."""
        head = first[:-k]
        ctx = head[-_CONTEXT:].encode("utf-8", "surrogatepass")
        tail = first[-k:].encode("utf-8", "surrogatepass")
        rest = second[:self.max_match].encode("utf-8", "surrogatepass")
        data = ctx + tail + rest
        start, edge = len(ctx), len(ctx) + len(tail)
        for m in self._full.finditer(data, start):
            if m.start() >= edge:
                break
            if m.end() > edge:
                kept = len(tail[:m.start() - start].decode("utf-8", "surrogatepass"))
                cut = len(rest[:m.end() - edge].decode("utf-8", "surrogatepass"))
                return head + first[-k:][:kept] + REDACTED_TEXT, REDACTED_TEXT + second[cut:]
        return None

    def _rest_of_split(self, previous: str, data: str) -> str | None:
        """``data`` with its start masked if it completes a form whose first 1-3
        characters ended ``previous``; None if it does not."""
        for start, rest in self._suffixes.get(data[:3], ()):
            if data.startswith(rest) and previous.endswith(start):
                return REDACTED_TEXT + data[len(rest):]
        return None


class StreamScrubber:
    """One byte stream (a CLI fd, an HTTP body, an SSE stream's bytes): ``feed``, ``flush``.

    ``feed`` returns what can go now and holds back at most
    :attr:`Scrubber.max_hold` bytes; ``flush`` returns the rest at the end.
    The concatenated output equals ``scrubber.scrub`` of the concatenated input,
    however the input was cut. Implements ``server/cli_runner.py``'s ``OutputFilter``.
    """

    __slots__ = ("_ctx", "_held", "_scrubber")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._held = b""
        self._ctx = b""

    @property
    def held(self) -> bytes:
        """The bytes held back right now (a proper prefix of some match)."""
        return self._held

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        buf = self._held + data if self._held else data
        out, hold = self._scrubber._scan(buf, self._ctx, False)
        self._held = buf[hold:]
        if hold >= _CONTEXT:
            self._ctx = buf[hold - _CONTEXT:hold]
        elif hold:
            self._ctx = (self._ctx + buf[:hold])[-_CONTEXT:]
        return out

    def flush(self) -> bytes:
        buf, self._held = self._held, b""
        if not buf:
            return b""
        return self._scrubber._scan(buf, self._ctx, True)[0]


class EventScrubber:
    """The SSE rule for a secret split across two events (see the module docstring).

    Feed it the events parsed from an already byte-scrubbed stream; it returns
    the events to send now, in order (none while it holds one back, two when
    it releases one); ``flush`` at the end of the stream returns the held one.
    """

    __slots__ = ("_held", "_held_k", "_previous", "_scrubber")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._held: Event | None = None
        self._held_k = 0
        self._previous = ""

    @property
    def holding(self) -> bool:
        return self._held is not None

    def feed(self, event: Event) -> list[Event]:
        data = event.data
        s = self._scrubber
        if self._held is None and data and data[-1] not in s._tail_chars and (
                data[:3] not in s._suffixes):
            # The common case, quickly: nothing held, nothing to complete, nothing to hold.
            self._previous = data[-(SSE_SPLIT_MIN - 1):]
            return [event]
        out: list[Event] = []
        held, self._held = self._held, None
        joined = None
        if held is not None and data is not None and held.data is not None:
            joined = s._join(held.data, self._held_k, data)
            if joined is not None:
                held = dataclasses.replace(held, data=joined[0])
                data = joined[1]
                event = dataclasses.replace(event, data=data)
        if joined is None and data and self._previous:
            rest = s._rest_of_split(self._previous, data)
            if rest is not None:
                data = rest
                event = dataclasses.replace(event, data=data)
        if held is not None:
            out.append(held)
        self._previous = data[-(SSE_SPLIT_MIN - 1):] if data else ""
        if data:
            k = s._split_tail(data)
            if k >= SSE_SPLIT_MIN:
                self._held, self._held_k = event, k
                return out
        out.append(event)
        return out

    def flush(self) -> list[Event]:
        held, self._held = self._held, None
        return [held] if held is not None else []


# --------------------------------------------------------------------------
# One scrubber per policy


class _PolicySettings(Protocol):
    @property
    def min_secret_length(self) -> int: ...


class _PolicyLike(Protocol):
    """What :func:`policy_scrubber` needs of ``carapace.server.policy.Policy``."""

    def secrets(self) -> list[bytes]: ...

    @property
    def settings(self) -> _PolicySettings: ...


@functools.lru_cache(maxsize=8)
def _cached(secrets: tuple[bytes, ...], min_length: int) -> Scrubber:
    return Scrubber(secrets, min_length=min_length)


def policy_scrubber(policy: _PolicyLike) -> Scrubber:
    """The scrubber for every secret ``policy`` injects (built once per set of secrets)."""
    return _cached(tuple(policy.secrets()), policy.settings.min_secret_length)


def server_scrubber(policy: _PolicyLike, held: Sequence[bytes]) -> Scrubber:
    """The scrubber for ``policy``'s secrets and ``held``, the secrets of the server itself
    (every agent's token, the debug token, TLS private key material): built once per set."""
    secrets = tuple(dict.fromkeys([*policy.secrets(), *held]))
    return _cached(secrets, policy.settings.min_secret_length)


_PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def private_key_blocks(pem: bytes) -> list[bytes]:
    """The body (base64 lines, headers dropped) of each private key block in a PEM file.

    The ``-----BEGIN ... PRIVATE KEY-----`` lines are the same in every key,
    so only the body is secret; it is masked line by line (see ``expand_secrets``).
    """
    out = []
    for match in _PEM_KEY.finditer(pem):
        lines = [line for line in match.group(2).splitlines() if b":" not in line]
        body = b"\n".join(line.strip() for line in lines if line.strip())
        if body:
            out.append(body)
    return out
