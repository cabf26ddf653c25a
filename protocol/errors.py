"""The one error type the protocol package raises for bad input."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something that is not valid Carapace protocol.

    Every decoding failure — truncated or oversized frames, malformed msgpack,
    unknown message types, missing or mistyped fields — raises this and only
    this, so a caller needs a single ``except`` to drop a misbehaving peer.
    """
