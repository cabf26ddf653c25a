"""Content-Encoding, undone as the body streams, for callers that must read the body
(event streams, masking)."""

from __future__ import annotations

import zlib

from .errors import UnsupportedEncoding, UpstreamBroken


class ContentDecoder:
    """Undo a response's ``Content-Encoding`` (gzip, x-gzip, deflate, identity) as it streams.

    ``ContentDecoder(value)`` takes the header's value (None or empty: identity)
    and raises :class:`UnsupportedEncoding` for anything else (br, zstd, ...),
    so a caller can refuse what it cannot read rather than pass on garbage.
    Several encodings are undone in reverse order of listing. ``deflate`` is
    accepted zlib-wrapped (as RFC 9110 says) or raw (as some servers send it).
    """

    __slots__ = ("_steps",)

    def __init__(self, content_encoding: bytes | str | None) -> None:
        if isinstance(content_encoding, bytes):
            content_encoding = content_encoding.decode("latin-1")
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        steps: list[_Inflate] = []
        for name in reversed(names):
            if name == "identity":
                continue
            if name in ("gzip", "x-gzip"):
                steps.append(_Inflate(zlib.MAX_WBITS | 16))
            elif name == "deflate":
                steps.append(_Inflate(None))
            else:
                raise UnsupportedEncoding(f"Content-Encoding {name!r} is not supported")
        self._steps = steps

    @property
    def identity(self) -> bool:
        return not self._steps

    def feed(self, data: bytes) -> bytes:
        for step in self._steps:
            data = step.feed(data)
        return data

    def flush(self) -> bytes:
        data = b""
        for step in self._steps:
            data = step.feed(data) + step.flush()
        return data


class _Inflate:
    __slots__ = ("_first", "_obj", "_wbits")

    def __init__(self, wbits: int | None) -> None:
        self._wbits = wbits
        self._first = True
        self._obj = zlib.decompressobj(zlib.MAX_WBITS if wbits is None else wbits)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        try:
            out = self._obj.decompress(data)
        except zlib.error as exc:
            if self._wbits is None and self._first:  # raw deflate, no zlib header
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                self._first = False
                return self.feed(data)
            raise UpstreamBroken(f"the compressed answer is corrupt: {exc}") from None
        self._first = False
        return out

    def flush(self) -> bytes:
        try:
            return self._obj.flush()
        except zlib.error as exc:  # pragma: no cover - flush rarely raises
            raise UpstreamBroken(f"the compressed answer is corrupt: {exc}") from None
