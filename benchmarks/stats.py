"""The percentile every benchmark reports, in a leaf module: the load generators that
run as child processes import it without the harness."""

from __future__ import annotations

import math


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[min(len(ordered), rank) - 1]
