"""Small helpers the scenarios share."""

from __future__ import annotations

from ..common import PEERS, Ctx, Row
from ..upstreams import Served


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


def key_for(key: str, up: Served) -> str:
    """A row's key: unchanged for the test upstream (the targets read those), else
    ``key@upstream``."""
    return key if up.name == "test" else f"{key}@{up.name}"


def label_for(label: str, up: Served, several: bool) -> str:
    """A row's label, led by its upstream's name when the scenario measures several
    or when it is not the test upstream."""
    return f"{up.name}: {label}" if several or up.name != "test" else label


def skipped_notes(ctx: Ctx, names: tuple[str, ...]) -> list[str]:
    """Why each of a scenario's upstreams that is not running was left out."""
    return [f"upstream {n} skipped: {ctx.upstream_skipped[n]}" for n in names
            if n in ctx.upstream_skipped]


TUNNEL_CPU_NOTE = ("tunnel CPU = the tunnel's own processes only, from their CPU time: "
                   "agent + server for Carapace, ssh client + sshd for ssh -L")


def tunnel_vs_ssh(row: Row, up: Served, per: str) -> str | None:
    """A note putting Carapace's own CPU against ssh -L's, when both were measured."""
    c, s = row.values.get("carapace"), row.values.get("ssh")
    if c is None or s is None or not s:
        return None
    return (f"{up.name}: tunnel CPU per {per}, Carapace {c:.1f} µs vs ssh -L {s:.1f} µs "
            f"({c / s:.2f}× ssh's)")
