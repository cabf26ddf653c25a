"""JSON-RPC request/response (signal-cli's ``version``) at concurrency 1 and 32.

Keep-alive connections, one per concurrent worker, h11 on raw trio sockets.
A warm-up of requests precedes each measured run on the same connections.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, median, pct, timed
from ._peers import na_for_missing, ordered, rotate

NAME = "jsonrpc"
TITLE = "JSON-RPC request/response"
LEVELS = (1, 32)


def plan(ctx: Ctx) -> dict[int, int]:
    """Concurrency -> requests per run (at most; see max_seconds)."""
    return {1: 1_000, 32: 6_000} if ctx.quick else {1: 3_000, 32: 20_000}


def max_seconds(ctx: Ctx) -> float:
    """Time bound of one measured run: a slow peer is measured over fewer requests."""
    return 4.0 if ctx.quick else 6.0


def rounds(ctx: Ctx) -> int:
    return 1 if ctx.quick else 2


def steps(ctx: Ctx) -> int:
    return len(LEVELS) * (2 + (ctx.ssh is not None)) * rounds(ctx)


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    counts = plan(ctx)
    rate: dict[int, dict[str, list[float]]] = {c: {} for c in LEVELS}
    lat: dict[int, dict[str, list[float]]] = {c: {} for c in LEVELS}
    cpu: dict[int, dict[str, list[float]]] = {c: {} for c in LEVELS}
    breakdown: dict[int, dict[str, list[dict[str, float]]]] = {c: {} for c in LEVELS}
    failures: list[str] = []
    measured: dict[str, list[int]] = {}
    with ctx.carapace() as carapace:
        ports = ctx.peer_ports(carapace)
        for rnd in range(rounds(ctx)):
            for conc in LEVELS:
                for peer in rotate(list(ports), rnd):
                    ctx.advance(f"jsonrpc: c={conc} via {peer}, round {rnd + 1}")
                    spec = {"mode": "rpc", "peer": ["127.0.0.1", ports[peer]],
                            "concurrency": conc, "requests": counts[conc],
                            "warmup": max(50, counts[conc] // 20),
                            "max_seconds": max_seconds(ctx)}
                    try:
                        out = ctx.measure(peer, carapace, spec, 240, profile=f"jsonrpc c={conc}")
                    except ScenarioError as exc:
                        failures.append(f"c={conc} via {peer}: {exc}")
                        continue
                    rate[conc].setdefault(peer, []).append(out["requests_per_s"])
                    measured.setdefault(f"c{conc}.{peer}", []).append(out["requests"])
                    cpu[conc].setdefault(peer, []).append(out["cpu_us_per_unit"])
                    breakdown[conc].setdefault(peer, []).append(
                        {k: round(v / out["units"] * 1e6, 1) for k, v in out["cpu"].items()})
                    lat[conc].setdefault(peer, []).extend(out["latencies"])
    for conc in LEVELS:
        res.rows.append(na_for_missing(ctx, Row(
            key=f"rpc.c{conc}.rps", label=f"c={conc} requests/s", unit="req/s",
            values=ordered({p: median(v) for p, v in rate[conc].items()}),
            compare="ratio", decimals=0)))
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            res.rows.append(na_for_missing(ctx, Row(
                key=f"rpc.c{conc}.{name}", label=f"c={conc} latency {name}", unit="ms",
                values=ordered({p: pct(v, q) for p, v in lat[conc].items()}),
                compare="diff", decimals=2)))
        res.samples[f"rpc_c{conc}_latency_ms"] = lat[conc]
    res.rows.append(na_for_missing(ctx, Row(
        key="rpc.c32.cpu", label="c=32 CPU per request, all processes", unit="µs",
        values=ordered({p: median(v) for p, v in cpu[32].items()}), compare="ratio",
        decimals=0)))
    res.notes += failures
    res.notes.append(f"up to {counts[1]:,} requests at c=1 and {counts[32]:,} at c=32 per run "
                     f"(or {max_seconds(ctx):.0f} s, whichever comes first); {rounds(ctx)} "
                     "round(s); keep-alive; method 'version'")
    res.raw["requests_measured"] = measured
    res.raw = {**res.raw, "requests_per_s": rate, "cpu_us_per_request": breakdown,
               "client": "raw trio sockets, keep-alive; request made by h11, "
                         "Content-Length answers read directly"}
    return res
