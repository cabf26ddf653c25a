"""Process-wide tuning both daemons apply at start-up."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling a daemon that holds many streams.

    With thousands of open streams a full collection walks every one of their
    objects and holds the event loop for hundreds of milliseconds (measured:
    live-stream p99 250 ms beside 10,000 idle streams, 7 ms without the
    collector). Objects alive after start-up are frozen out of collection,
    young collections stay small (short pauses) and full passes are rare.
    """
    gc.freeze()
    gc.set_threshold(1_000, 20, 1_000)
