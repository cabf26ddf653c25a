"""Response bodies framed by the server itself (sans-IO), where h11 showed in the profile.

A chunked body (:class:`ChunkedDecoder`), for event streams: an upstream that
writes one event per write sends one chunk per event; read through h11, every
chunk cost two ``next_event`` calls through its state machine, the largest
share of the server's CPU per event. This decoder takes what one read
brought and returns all the body bytes of the chunks in it at once, with a
``find`` and a slice per chunk. It is as strict as h11's
reader about what it acts on: a chunk size is 1 to 16 hex digits (an
extension after ``;`` is ignored, as h11 does), its line and the line after
its data end in CRLF, trailer lines are ``name: value``; anything else
raises :class:`ChunkedError`. Lines are bounded, so an upstream cannot make
it buffer without end.

A body of known length (:class:`LengthDecoder`), for bulk answers: h11
copied every read into its buffer and out again, and cost a state-machine
round per read; this counts.
"""

from __future__ import annotations

__all__ = ["MAX_CHUNK_LINE", "MAX_TRAILERS", "ChunkedDecoder", "ChunkedError", "LengthDecoder"]

MAX_CHUNK_LINE = 4096
"""Longest chunk-size line (with any extension): real ones are a few bytes."""
MAX_TRAILERS = 64 * 1024
"""Most trailer bytes after the last chunk (the same bound as a response head)."""

_HEX = b"0123456789abcdefABCDEF"


class ChunkedError(ValueError):
    """The body is not valid chunked encoding; the message says where."""


class ChunkedDecoder:
    """``feed`` what was read, ``take`` the body bytes it completes; ``done`` at the end."""

    __slots__ = ("_buf", "_crlf", "_error", "_left", "_trailer_bytes", "_trailers", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0
        """Data bytes of the current chunk still to come."""
        self._crlf = False
        """The current chunk's data is complete; the CRLF after it is next."""
        self._trailers = False
        """The last chunk (size 0) was read; trailer lines, then a blank line, are next."""
        self._trailer_bytes = 0
        self._error: ChunkedError | None = None
        """Bad framing met after some body bytes: raised by the next take."""
        self.done = False
        """The blank line after the last chunk was read: the body is complete."""

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data

    def take(self) -> bytes:
        """Every body byte the bytes fed so far complete (``b""`` if none yet). Bad framing
        raises, once the body bytes before it have been taken."""
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            self._decode(out)
        except ChunkedError as exc:
            if not out:
                raise
            self._error = exc  # what came before it still goes first
        return out[0] if len(out) == 1 else b"".join(out)

    def _decode(self, out: list[bytes]) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        try:
            while not self.done:
                if self._left:
                    n = min(self._left, end - pos)
                    if not n:
                        break
                    out.append(buf[pos:pos + n])
                    pos += n
                    self._left -= n
                    if self._left:
                        break
                    self._crlf = True
                if self._crlf:
                    if end - pos < 2:
                        break
                    if buf[pos:pos + 2] != b"\r\n":
                        raise ChunkedError("a chunk's data is not followed by CRLF")
                    pos += 2
                    self._crlf = False
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self._check_partial(end - pos)
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if self._trailers:
                    self._trailer(line)
                else:
                    self._size_line(line)
        finally:
            self._buf = buf[pos:] if pos < end else b""

    def _size_line(self, line: bytes) -> None:
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not 1 <= len(size) <= 16 or size.translate(None, _HEX):
            raise ChunkedError(f"bad chunk size line {line[:40]!r}")
        self._left = int(size, 16)
        if not self._left:
            self._trailers = True

    def _trailer(self, line: bytes) -> None:
        if not line:
            self.done = True
            return
        self._trailer_bytes += len(line) + 2
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip() or self._trailer_bytes > MAX_TRAILERS:
            raise ChunkedError(f"bad trailer line {line[:40]!r}")

    def _check_partial(self, size: int) -> None:
        limit = MAX_TRAILERS - self._trailer_bytes if self._trailers else MAX_CHUNK_LINE
        if size > limit:
            raise ChunkedError(f"a chunk-size or trailer line of over {limit} bytes")


class LengthDecoder:
    """A body of ``length`` bytes: ``feed``, ``take``, ``done`` as :class:`ChunkedDecoder`.
    Bytes beyond the length are dropped (the connection is not reused after it)."""

    __slots__ = ("_buf", "_left", "done")

    def __init__(self, length: int) -> None:
        self._left = length
        self._buf = b""
        self.done = not length

    def feed(self, data: bytes) -> None:
        if len(data) >= self._left:
            data = data[:self._left]
        self._left -= len(data)
        self._buf = self._buf + data if self._buf else data

    def take(self) -> bytes:
        out, self._buf = self._buf, b""
        if not self._left:
            self.done = True
        return out
