"""Server-Sent Events: an incremental WHATWG event-stream parser and its serializer.

Sans-IO, like the frame codec: :class:`SseParser` is fed the upstream's body
bytes in whatever pieces they arrive and returns every :class:`Event` and
:class:`Comment` those bytes complete, the moment the blank line (or comment
line) that completes it arrives — nothing waits for "more". :func:`serialize`
turns them back into ``text/event-stream`` bytes with LF line ends.

The rules are those of the HTML standard's "event stream interpretation"
(https://html.spec.whatwg.org/multipage/server-sent-events.html), with one
deliberate difference: a block that sets any field but has no ``data`` line
(``id: 5`` alone, say) is returned as an Event with ``data=None`` instead of
being skipped, so the tunnel forwards everything and the local client decides.

- Lines end with CRLF, LF or CR; a CR at the end of one chunk and an LF at the
  start of the next are one line end.
- One UTF-8 byte order mark at the very start of the stream is skipped.
- Text is UTF-8, invalid sequences become U+FFFD; a character split between
  chunks decodes whole (lines are decoded only once they are complete).
- ``:text`` is a comment; ``name:value`` is a field, with one leading space of
  the value removed; ``name`` alone is a field with an empty value.
- ``data`` lines are joined with LF; ``id`` values containing NUL and
  ``retry`` values that are not ASCII digits are ignored; other field names
  are ignored; a blank line ends the block.

This is the streaming hot path, so the parser works on whole chunks with C
string methods (one ``rfind`` per chunk for the last line end, one decode and
one split per chunk) and never rescans bytes it has already seen: an
unfinished line waits in a ``bytearray`` that only grows at its end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_LINE",
    "MAX_RETRY",
    "RAW_PENDING_MAX",
    "Comment",
    "Event",
    "SseBlocks",
    "SseParser",
    "serialize",
]

DEFAULT_MAX_LINE = 16 * 1024 * 1024
"""Default cap on one line of the stream, in bytes, without its line end (16 MiB)."""

MAX_RETRY = 2**63 - 1
"""``retry`` values above this (in milliseconds: about 292 million years) are clamped to it,
so that every parsed event fits the wire's 64-bit integers."""

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event block. ``None`` means the field was absent from the block."""

    event: str | None = None
    """Value of the block's last ``event`` field."""
    data: str | None = None
    """The block's ``data`` lines joined with LF (no trailing LF)."""
    id: str | None = None
    """Value of the block's last ``id`` field without NUL (``""`` resets the last event id)."""
    retry: int | None = None
    """Value of the block's last all-digits ``retry`` field, in milliseconds."""


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment line (often a keepalive)."""

    text: str
    """The line without its leading ``:`` (a following space is kept)."""


def _parse_retry(value: str) -> int:
    """An all-ASCII-digits string as an int, clamped to MAX_RETRY (no int() digit limit)."""
    value = value.lstrip("0")
    if len(value) > 19:
        return MAX_RETRY
    return min(int(value or "0"), MAX_RETRY)


class SseParser:
    """Incremental event-stream parser: ``feed`` bytes, get the events they complete.

    ``max_line`` bounds one line (bytes, line end excluded); a longer line
    raises :class:`ProtocolError` and the stream should be dropped. No other
    input makes the parser raise.
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_event",
        "_id",
        "_partial",
        "_retry",
        "_seen",
        "_skip_lf",
        "max_line",
    )

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, *, at_start: bool = True) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._reset()
        self._at_start = at_start
        """``at_start=False``: the stream is already under way (no BOM to strip)."""

    def _reset(self) -> None:
        self._partial = bytearray()
        """Bytes of the unfinished last line (no line end in it)."""
        self._skip_lf = False
        """The last chunk ended with CR: an LF starting the next one belongs to it."""
        self._at_start = True
        """Nothing processed yet: a BOM may still have to be stripped."""
        self._event: str | None = None
        self._data: list[str] | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._seen = False
        """The current block has set a field, so its blank line dispatches an Event."""

    @property
    def pending(self) -> bool:
        """True if an unfinished line, or fields of an undispatched block, are buffered."""
        return bool(self._partial) or self._seen

    def feed(self, data: bytes) -> list[Event | Comment]:
        """Take the next bytes of the stream; return the events and comments they complete."""
        if not data:
            return []
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                start = 1
        elif self._at_start:
            head = bytes(self._partial) + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._partial[:] = head  # wait for the rest of a possible BOM
                return []
            self._at_start = False
            self._partial.clear()
            data = head[len(_BOM) :] if head.startswith(_BOM) else head
        lf = data.rfind(b"\n", start)
        cr = data.rfind(b"\r", start)
        end = lf if lf > cr else cr
        partial = self._partial
        if end < 0:
            partial += memoryview(data)[start:]
            if len(partial) > self.max_line:
                raise self._too_long(len(partial))
            return []
        if partial:
            partial += memoryview(data)[start : end + 1]
            block = bytes(partial)
            partial.clear()
        elif start == 0 and end + 1 == len(data):
            block = bytes(data)
        else:
            block = data[start : end + 1]
        if end + 1 < len(data):
            partial += memoryview(data)[end + 1 :]
            if len(partial) > self.max_line:
                raise self._too_long(len(partial))
        elif data[end] == _CR:
            self._skip_lf = True
        return self._process(block)

    def close(self) -> list[Event | Comment]:
        """End of stream: a last line without line end still counts as a line, but the
        unfinished block is discarded (it never got its blank line). Resets the parser."""
        out: list[Event | Comment] = []
        if self._partial:
            out = self._process(bytes(self._partial) + b"\n")
        self._reset()
        return out

    def _too_long(self, size: int) -> ProtocolError:
        return ProtocolError(
            f"SSE line of at least {size} bytes exceeds the {self.max_line}-byte limit"
        )

    def _process(self, block: bytes) -> list[Event | Comment]:
        """Interpret ``block``: whole lines, each ended by CR, LF or CRLF."""
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if len(block) > self.max_line:
            longest = max(map(len, block.split(b"\n")))
            if longest > self.max_line:
                raise self._too_long(longest)
        lines = block.decode("utf-8", "replace").split("\n")
        lines.pop()  # the empty string after the final line end

        out: list[Event | Comment] = []
        event = self._event
        data = self._data
        id_ = self._id
        retry = self._retry
        seen = self._seen
        for line in lines:
            if not line:
                if seen:
                    out.append(
                        Event(event, None if data is None else "\n".join(data), id_, retry)
                    )
                    event = id_ = None
                    data = None
                    retry = None
                    seen = False
                continue
            name, colon, value = line.partition(":")
            if colon:
                if not name:
                    out.append(Comment(value))
                    continue
                if value[:1] == " ":
                    value = value[1:]
            if name == "data":
                if data is None:
                    data = [value]
                else:
                    data.append(value)
                seen = True
            elif name == "event":
                event = value
                seen = True
            elif name == "id":
                if "\x00" not in value:
                    id_ = value
                    seen = True
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    retry = _parse_retry(value)
                    seen = True
        self._event = event
        self._data = data
        self._id = id_
        self._retry = retry
        self._seen = seen
        return out


RAW_PENDING_MAX = 256 * 1024
"""Bytes of an unfinished block :class:`SseBlocks` holds before it leaves the stream to
the parser (whose line limit then applies): far above real events, small enough that a
frame of whole blocks stays a small step of credit."""

_EVENT_STARTS = (b"data:", b"data\n", b"event:", b"event\n")
"""A block whose first line is one of these dispatches an event, whatever follows."""
_ID_STARTS = (b"id:", b"id\n")
"""So does one whose first line is an ``id`` without NUL."""
_SKIPPED = (b":", b"\n")
"""First bytes of lines that set nothing: a comment, a blank line."""


def _events_in(region: bytes) -> int:
    """How many events whole blocks (LF line ends, ending with a blank line) dispatch."""
    count = 0
    for block in region.split(b"\n\n"):
        while block[:1] in _SKIPPED:  # comment lines and blank lines set no field
            nl = block.find(b"\n")
            block = block[nl + 1:] if nl >= 0 else b""
        if block.startswith(_EVENT_STARTS) or block in (b"data", b"event"):
            count += 1
        elif (block.startswith(_ID_STARTS) or block == b"id") and b"\x00" not in block:
            count += 1
        elif block:  # comments, blank lines, retry, unknown fields: the parser decides
            parser = SseParser(at_start=False)
            count += sum(type(item) is Event for item in parser.feed(block + b"\n\n"))
    return count


class SseBlocks:
    """Finds the whole event blocks in event-stream bytes, so they can travel as they are.

    :meth:`feed` returns the bytes up to and including the last blank line that
    has arrived (each event leaves the moment its blank line is read; nothing
    waits for more) and how many events they dispatch; the rest waits for its
    blank line. CRLF line ends become LF. It returns None when the stream
    cannot travel as bytes — a CR that is not part of a CRLF (or may be the
    first half of one, at the end of the bytes), a possible byte order mark
    at its start, bytes that are not UTF-8, an unfinished block over
    ``max_pending`` — and from then on the caller parses: :meth:`handover`
    gives the parser, already fed everything not returned, and what that
    completed. Its events are exactly the parser's: a client that reads the
    bytes sees the events that :class:`SseParser` would have made of them.
    """

    __slots__ = ("_fresh", "_pending", "_refused", "max_pending")

    def __init__(self, max_pending: int = RAW_PENDING_MAX) -> None:
        self.max_pending = max_pending
        self._pending = bytearray()
        """The unfinished block: starts right after a blank line (or the stream's start)."""
        self._fresh = True
        """Nothing accepted yet: the stream's first bytes are still to come."""
        self._refused = b""
        """Once :meth:`feed` returned None: every byte it did not return."""

    def feed(self, data: bytes) -> tuple[bytes, int] | None:
        """Take the next bytes; return the whole blocks now complete and their event count
        (``b""``, 0 when none), or None if the stream has to be parsed from here on."""
        if not data:
            return b"", 0
        if self._fresh and data[0] == _BOM[0]:
            self._refuse(data)
            return None
        self._fresh = False
        if b"\r" in data:
            # A CR last may be half a CRLF, or a line end of its own that completes
            # an event now: only the parser can tell without waiting for more.
            lf_only = data.replace(b"\r\n", b"\n")
            if data[-1] == _CR or b"\r" in lf_only:
                self._refuse(data)
                return None
            data = lf_only
        pending = self._pending
        end = data.rfind(b"\n\n")
        if end >= 0:
            cut = end + 2
        elif pending and pending[-1] == _LF and data[0] == _LF:
            cut = 1  # the blank line began at the end of the last bytes
        else:
            pending += data
            if len(pending) > self.max_pending:
                self._refuse(b"")
                return None
            return b"", 0
        if pending:
            region = bytes(pending) + data[:cut]
            pending.clear()
        else:
            region = data if cut == len(data) else data[:cut]
        if cut < len(data):
            pending += memoryview(data)[cut:]
        if not region.isascii():
            try:
                region.decode("utf-8")
            except UnicodeDecodeError:
                self._refuse(b"", region)
                return None
        return region, _events_in(region)

    def _refuse(self, raw: bytes, region: bytes = b"") -> None:
        """Keep what has not been returned, in stream order, for :meth:`handover`."""
        if region:  # the region was taken out of the pending bytes: it goes back first
            self._refused = region + bytes(self._pending)
        else:
            self._refused = bytes(self._pending) + raw
        self._pending.clear()
        return None

    def handover(
        self, max_line: int = DEFAULT_MAX_LINE
    ) -> tuple[SseParser, list[Event | Comment]]:
        """The parser that goes on from here (after :meth:`feed` returned None, or at the
        stream's end), fed what was not returned, and the events and comments that
        completed."""
        parser = SseParser(max_line, at_start=self._fresh)
        rest, self._refused = self._refused + bytes(self._pending), b""
        self._pending.clear()
        return parser, parser.feed(rest)


def _check_single_line(what: str, value: str, *, nul: bool = False) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {what} cannot contain CR or LF: {value[:40]!r}")
    if nul and "\x00" in value:
        raise ValueError(f"an SSE {what} cannot contain NUL: {value[:40]!r}")


def serialize(item: Event | Comment) -> bytes:
    """The ``text/event-stream`` bytes for one event (ending in a blank line) or comment line.

    Parsing the result gives ``item`` back. ``data`` may hold line breaks (each
    line becomes one ``data`` line; CR and CRLF come back as LF, as a client
    would read them); ``event`` and ``id`` cannot carry CR or LF, ``id`` not
    NUL, a comment no line break and ``retry`` no sign: those raise ValueError
    rather than silently change what the client sees.
    """
    if isinstance(item, Comment):
        _check_single_line("comment", item.text)
        return b":" + item.text.encode("utf-8") + b"\n"
    return serialize_event(item.event, item.data, item.id, item.retry)


def serialize_event(event: str | None, data: str | None, id: str | None,
                    retry: int | None) -> bytes:
    """:func:`serialize` for an event given as its fields (no :class:`Event` to build)."""
    parts: list[str] = []
    if event is not None:
        _check_single_line("event type", event)
        parts.append("event: " + event + "\n")
    if id is not None:
        _check_single_line("event id", id, nul=True)
        parts.append("id: " + id + "\n")
    if retry is not None:
        if retry < 0:
            raise ValueError(f"an SSE retry cannot be negative: {retry}")
        parts.append(f"retry: {retry:d}\n")
    if data is not None:
        lines = _LINE_BREAK.split(data) if "\r" in data else data.split("\n")
        for line in lines:
            parts.append("data: " + line + "\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
