"""JSON-RPC request/response (signal-cli's ``version``) at concurrency 1 and 32.

Keep-alive connections, one per concurrent worker, h11 on raw trio sockets.
A warm-up of requests precedes each measured run on the same connections.
Upstreams: the test upstream's fake signal-cli, and nginx answering every call
with a fixed ``return 200 '…'`` (a server that costs next to nothing, so the
tunnel's share shows). Each with its own Carapace pair, one after the other.
The tunnel's own CPU per call (agent + server, or ssh + sshd) is a row of its own.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, median, timed
from ..stats import pct
from ..upstreams import Served
from ._peers import (
    TUNNEL_CPU_NOTE,
    key_for,
    label_for,
    na_for_missing,
    ordered,
    rotate,
    skipped_notes,
    tunnel_vs_ssh,
)

NAME = "jsonrpc"
TITLE = "JSON-RPC request/response"
UPSTREAMS = ("test", "nginx")
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
    ups = max(1, len(ctx.upstreams_for(UPSTREAMS)))
    return len(LEVELS) * (2 + (ctx.ssh is not None)) * rounds(ctx) * ups


Series = dict[int, dict[str, list[float]]]


def measure(ctx: Ctx, up: Served, res: ScenarioResult, failures: list[str]) -> None:
    """Every peer's rounds against ``up``; its rows appended to ``res``."""
    counts = plan(ctx)
    rate: Series = {c: {} for c in LEVELS}
    lat: Series = {c: {} for c in LEVELS}
    cpu: Series = {c: {} for c in LEVELS}
    tunnel: Series = {c: {} for c in LEVELS}
    breakdown: dict[int, dict[str, list[dict[str, float]]]] = {c: {} for c in LEVELS}
    measured: dict[str, list[int]] = {}
    with ctx.carapace(up=up) as carapace:
        ports = ctx.peer_ports(carapace, up)
        for rnd in range(rounds(ctx)):
            for conc in LEVELS:
                for peer in rotate(list(ports), rnd):
                    ctx.advance(f"jsonrpc: {up.name}, c={conc} via {peer}, round {rnd + 1}")
                    spec = {"mode": "rpc", "peer": ["127.0.0.1", ports[peer]],
                            "concurrency": conc, "requests": counts[conc],
                            "warmup": max(50, counts[conc] // 20),
                            "max_seconds": max_seconds(ctx)}
                    try:
                        out = ctx.measure(peer, carapace, spec, 240,
                                          profile=f"jsonrpc c={conc}", up=up)
                    except ScenarioError as exc:
                        failures.append(f"{up.name}: c={conc} via {peer}: {exc}")
                        continue
                    rate[conc].setdefault(peer, []).append(out["requests_per_s"])
                    measured.setdefault(f"c{conc}.{peer}", []).append(out["requests"])
                    cpu[conc].setdefault(peer, []).append(out["cpu_us_per_unit"])
                    tunnel[conc].setdefault(peer, []).append(out["tunnel_us_per_unit"])
                    breakdown[conc].setdefault(peer, []).append(
                        {k: round(v / out["units"] * 1e6, 1) for k, v in out["cpu"].items()})
                    lat[conc].setdefault(peer, []).extend(out["latencies"])
    several = len(ctx.upstreams_for(UPSTREAMS)) > 1
    for conc in LEVELS:
        res.rows.append(na_for_missing(ctx, Row(
            key=key_for(f"rpc.c{conc}.rps", up),
            label=label_for(f"c={conc} requests/s", up, several), unit="req/s",
            values=ordered({p: median(v) for p, v in rate[conc].items()}),
            compare="ratio", decimals=0)))
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            res.rows.append(na_for_missing(ctx, Row(
                key=key_for(f"rpc.c{conc}.{name}", up),
                label=label_for(f"c={conc} latency {name}", up, several), unit="ms",
                values=ordered({p: pct(v, q) for p, v in lat[conc].items()}),
                compare="diff", decimals=2)))
        res.samples[key_for(f"rpc_c{conc}_latency_ms", up)] = lat[conc]
    res.rows.append(na_for_missing(ctx, Row(
        key=key_for("rpc.c32.cpu", up),
        label=label_for("c=32 CPU per request, all processes", up, several), unit="µs",
        values=ordered({p: median(v) for p, v in cpu[32].items()}), compare="ratio",
        decimals=0)))
    for conc in LEVELS:
        row = na_for_missing(ctx, Row(
            key=key_for(f"rpc.c{conc}.tunnel_cpu", up),
            label=label_for(f"c={conc} tunnel CPU per request", up, several), unit="µs",
            values=ordered({p: median(v) for p, v in tunnel[conc].items() if p != "direct"}),
            decimals=0, na={"direct": "no tunnel"}))
        res.rows.append(row)
        if (note := tunnel_vs_ssh(row, up, f"call, c={conc}")) is not None:
            failures.append(note)
    res.raw[key_for("requests_measured", up)] = measured
    res.raw[key_for("requests_per_s", up)] = rate
    res.raw[key_for("cpu_us_per_request", up)] = breakdown


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    counts = plan(ctx)
    failures: list[str] = skipped_notes(ctx, UPSTREAMS)
    for up in ctx.upstreams_for(UPSTREAMS):
        try:
            measure(ctx, up, res, failures)
        except ScenarioError as exc:  # its Carapace pair did not start: the others go on
            failures.append(f"{up.name}: {exc}")
    if not res.rows:
        raise ScenarioError("no upstream measured: " + "; ".join(failures))
    res.notes += [*failures, TUNNEL_CPU_NOTE]
    res.notes.append(f"up to {counts[1]:,} requests at c=1 and {counts[32]:,} at c=32 per run "
                     f"(or {max_seconds(ctx):.0f} s, whichever comes first); {rounds(ctx)} "
                     "round(s); keep-alive; method 'version' (nginx: a fixed answer)")
    res.raw["client"] = ("raw trio sockets, keep-alive; request made by h11, "
                         "Content-Length answers read directly")
    return res
