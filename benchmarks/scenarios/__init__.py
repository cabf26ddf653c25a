"""The scenarios, in the order a run measures them.

Each module has ``NAME``, ``TITLE``, ``steps(ctx)`` (how many progress steps it
reports) and ``run(ctx) -> ScenarioResult``.
"""

from __future__ import annotations

from types import ModuleType

from . import (
    download,
    idle_streams,
    jsonrpc,
    many_agents,
    masking,
    noisy_neighbour,
    shim,
    sse_latency,
    sse_throughput,
)

SCENARIOS: list[ModuleType] = [
    sse_latency,
    sse_throughput,
    jsonrpc,
    download,
    shim,
    masking,
    idle_streams,
    noisy_neighbour,
    many_agents,
]

BY_NAME = {m.NAME: m for m in SCENARIOS}
