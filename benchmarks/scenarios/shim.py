"""CLI round trip through the shim vs running the binary directly.

Measured by ``benchmarks/shim_roundtrip.py`` (a colleague's module, run as
is): ``echo x`` through shim → agent → server → exec, interleaved with
``/bin/echo x`` run directly. This adapter only maps its result into the
table: direct = ``/bin/echo``, Carapace = through the shim. Skipped with a
note while the module is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..common import Ctx, Row, ScenarioError, ScenarioResult, timed

NAME = "shim"
TITLE = "CLI round trip (echo x)"
MODULE = "benchmarks.shim_roundtrip"


def available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ImportError:
        return False


def rounds(ctx: Ctx) -> int:
    return 40 if ctx.quick else 150


def steps(ctx: Ctx) -> int:
    return 1


@timed
def run(ctx: Ctx) -> ScenarioResult:
    if not available():
        return ScenarioResult(NAME, TITLE, skipped="benchmarks/shim_roundtrip.py is not here "
                              "yet; this scenario runs it once it exists")
    module = importlib.import_module(MODULE)
    ctx.advance(f"shim: {rounds(ctx)} interleaved rounds (shim_roundtrip.run)")
    try:
        out: dict[str, Any] = module.run(rounds=rounds(ctx), warmup=5)
    except SystemExit as exc:  # the module reports its failures this way
        raise ScenarioError(f"shim_roundtrip: {exc}") from None
    ms = out["ms"]
    res = ScenarioResult(NAME, TITLE)
    for q in ("p50", "p99"):
        res.rows.append(Row(
            key=f"shim.{q}", label=f"round trip {q}", unit="ms",
            values={"direct": ms["direct"][q], "ssh": None, "carapace": ms["shim"][q]},
            compare="diff", decimals=2, na={"ssh": "not measured"}))
    parts = ", ".join(f"{what} {v:.1f} ms" for what, v in out["breakdown_p50"].items())
    res.notes.append(f"{out['rounds']} rounds by benchmarks/shim_roundtrip.py; "
                     f"the added p50 splits into: {parts}")
    res.raw = out
    return res
