"""Small helpers the scenarios share."""

from __future__ import annotations

from ..common import PEERS, Ctx, Row


def na_for_missing(ctx: Ctx, row: Row) -> Row:
    """Mark the ssh column n/a (with the reason) when the forward is not running."""
    if ctx.ssh is None and row.values.get("ssh") is None:
        row.na.setdefault("ssh", ctx.ssh_reason or "ssh forward not running")
    return row


def rotate(order: list[str], k: int) -> list[str]:
    """``order`` rotated by ``k``: each round starts with a different peer."""
    k %= max(1, len(order))
    return order[k:] + order[:k]


def ordered(values: dict[str, float | None]) -> dict[str, float | None]:
    return {p: values.get(p) for p in PEERS}
