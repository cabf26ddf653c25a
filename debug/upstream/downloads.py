"""The test upstream's download route, ``GET /bytes``, and the content it sends.

The content is deterministic, so a test can check every byte that crossed
the tunnel with :func:`pattern_bytes` instead of keeping a copy.
"""

from __future__ import annotations

import functools
import hashlib

import trio

from .http import Request, Responder
from .state import Upstream

_PATTERN_PERIOD = 1 << 20  # the /bytes content repeats every MiB


@functools.cache
def _pattern_block() -> bytes:
    """One period of the /bytes content: sha256 of a big-endian counter, block after block."""
    return b"".join(
        hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(_PATTERN_PERIOD // 32)
    )


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The ``n`` bytes that ``GET /bytes`` sends from position ``offset`` on.

    Deterministic pseudo-random content (sha256 blocks of a counter, period
    1 MiB), so a test can check every byte that crossed the tunnel.
    """
    if n <= 0:
        return b""
    block = _pattern_block()
    start = offset % _PATTERN_PERIOD
    reps = (start + n + _PATTERN_PERIOD - 1) // _PATTERN_PERIOD
    return (block * reps)[start : start + n] if reps > 1 else block[start : start + n]


async def download(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /bytes``: [n=1024, chunk=65536, interval_ms=0] n bytes, with Content-Length."""
    n = req.q_int("n", 1024, 0, 1 << 40)
    chunk = req.q_int("chunk", 65536, 1, 16 * 1024 * 1024)
    interval = req.q_ms("interval_ms", 0.0) / 1000.0
    await resp.start(
        200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
    )
    sent = 0
    while sent < n:
        if interval and sent:
            await trio.sleep(interval)
        size = min(chunk, n - sent)
        await resp.write(pattern_bytes(size, sent))
        sent += size
    await resp.end()
