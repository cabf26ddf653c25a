"""Talking to HTTP upstreams: the pooled client (llhttp on the wire), its errors, and
Content-Encoding."""

from .client import UpstreamClient, UpstreamResponse
from .decoding import ContentDecoder
from .errors import (
    UnsupportedEncoding,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "ContentDecoder",
    "UnsupportedEncoding",
    "UpstreamBroken",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]
