"""What can go wrong talking to an upstream, one class per kind of fault."""

from __future__ import annotations


class UpstreamError(Exception):
    """A request to an upstream did not get a whole answer."""


class UpstreamUnavailable(UpstreamError):
    """No answer: connecting failed (refused, DNS, TLS) or the upstream closed first."""


class UpstreamTimeout(UpstreamError):
    """No response head within the timeout, or a body idle for longer than allowed."""


class UpstreamBroken(UpstreamError):
    """The answer broke off after its head (connection closed or reset, bad framing)."""


class UnsupportedEncoding(UpstreamError):
    """A ``Content-Encoding`` that :class:`ContentDecoder` cannot undo."""
