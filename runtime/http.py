"""HTTP/1.1 facts and h11 plumbing shared by every HTTP endpoint Carapace serves or calls.

The agent's local listeners, the server's upstream relay, the operator API
and the test upstream all speak HTTP/1.1 through h11; what they must agree
on (which headers belong to one hop only, the reason phrase of a status,
what "the client went away" looks like) is written here once.
"""

from __future__ import annotations

import functools
import re
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11
import trio

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that describe one connection (RFC 9110 §7.6.1), lowercase: never forwarded."""

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
"""An RFC 9110 token in full: a method or a header name."""
TOKEN_BYTES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class ClientGone(Exception):
    """The HTTP client closed or broke its connection while we were answering."""


DISCONNECTS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError, trio.ClosedResourceError, OSError, ClientGone)
"""What a client going away raises on the way out of a handler."""


@functools.lru_cache(maxsize=128)
def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (empty for an unregistered code)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def response_head(status: int, headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]
                  ) -> h11.Response:
    """An h11 response head with its reason phrase."""
    return h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))


class RequestHead:
    """A request head as a handler reads it: method, path, parsed query, headers."""

    def __init__(self, event: h11.Request) -> None:
        self.method = event.method.decode("ascii", "replace").upper()
        self.target = event.target.decode("latin-1")
        parts = urlsplit(self.target)
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), if present."""
        lname = name.lower()
        found = None
        for k, v in self.headers:
            if k.lower() == lname:
                found = v
        return found


class ChunkFramingBound:
    """Bytes read since the last body byte of a message: chunk-size lines, extensions,
    trailers. llhttp keeps no bound on those and httptools buffers a growing trailer
    (h11 bounded both), so a wrapper around either parser reports each read here."""

    __slots__ = ("limit", "run")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.run = 0

    def exceeded(self, read: int, body: int) -> bool:
        """After a read of ``read`` bytes of which ``body`` were body: over the limit?"""
        self.run = read - body if body else self.run + read
        return self.run > self.limit

    def problem(self) -> str:
        return f"over {self.limit} bytes of chunk framing or trailers without body bytes"
