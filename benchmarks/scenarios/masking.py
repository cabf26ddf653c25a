"""Masking cost: the tunnel with injected secrets scrubbed vs without.

Measured by ``benchmarks/masking.py`` (run as is, also on its own as
``python -m benchmarks.masking``): two Carapace pairs that differ only in
whether their tools inject secrets, in alternating rounds. This adapter maps
its result into the table's Carapace column (there is nothing to mask on the
direct and ssh paths). Skipped with a note when the module is missing (a
trimmed checkout); a run that the module itself refuses is the scenario's
error.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..common import Ctx, Row, ScenarioError, ScenarioResult, timed

NAME = "masking"
TITLE = "Secret masking cost"
MODULE = "benchmarks.masking"
NA = {"direct": "nothing to mask", "ssh": "nothing to mask"}


def available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ImportError:
        return False


def steps(ctx: Ctx) -> int:
    return 1 if available() else 0


@timed
def run(ctx: Ctx) -> ScenarioResult:
    if not available():
        return ScenarioResult(NAME, TITLE, skipped="benchmarks/masking.py is missing; this "
                              "scenario only adapts its result")
    module = importlib.import_module(MODULE)
    ctx.advance("masking: plain vs masked pairs (benchmarks/masking.py)")
    try:
        out: dict[str, Any] = module.run(quick=ctx.quick)
    except SystemExit as exc:
        raise ScenarioError(f"benchmarks/masking.py: {exc}") from None
    except Exception as exc:
        raise ScenarioError(f"benchmarks/masking.py: {type(exc).__name__}: {exc}") from None
    res = ScenarioResult(NAME, TITLE)
    plain, masked = out.get("plain", {}), out.get("masked", {})

    def added(key: str) -> float | None:
        if key in plain and key in masked:
            return float(masked[key]) - float(plain[key])
        return None

    for key, label, unit, value in (
        ("masking.cost", "SSE throughput lost to masking", "%",
         out.get("sse_throughput_cost_pct")),
        ("masking.cli_cost", "CLI stdout throughput lost to masking", "%",
         out.get("cli_throughput_cost_pct")),
        ("masking.sse_p50", "SSE latency p50 added by masking", "ms",
         added("sse_latency_p50_ms")),
        ("masking.sse_p99", "SSE latency p99 added by masking", "ms",
         added("sse_latency_p99_ms")),
        ("masking.cli_p50", "CLI round trip p50 added by masking", "ms",
         added("cli_roundtrip_p50_ms")),
    ):
        res.rows.append(Row(key=key, label=label, unit=unit,
                            values={"direct": None, "ssh": None, "carapace": value},
                            decimals=1 if unit == "%" else 2, na=dict(NA)))
    res.notes.append(f"by benchmarks/masking.py: median of {out.get('rounds')} alternating "
                     "rounds, masked pair vs plain pair")
    res.raw = out
    return res
