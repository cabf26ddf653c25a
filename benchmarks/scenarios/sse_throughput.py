"""SSE throughput: one stream as fast as the upstream writes, and 100 streams at once.

The upstream's ``/sse-flood`` formats ≈300-byte events (each with its own id
and ts) 32 to a write, which keeps it well above 100,000 events/s, so the
direct column shows what the client and the machine can do. Peers run one
after the other (never concurrently: each run wants both cores), in rounds
whose starting peer rotates; the table shows each peer's median round.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, median, timed
from ._peers import na_for_missing, ordered, rotate

NAME = "sse-throughput"
TITLE = "SSE throughput (events/s)"
SIZE = 300
PATH = "/sse-flood?count={count}&size=300&batch=32"
STREAMS = 100


def plan(ctx: Ctx) -> dict[str, int]:
    if ctx.quick:
        return {"single": 60_000, "multi_per_stream": 600, "rounds": 1}
    return {"single": 200_000, "multi_per_stream": 2_000, "rounds": 3}


def steps(ctx: Ctx) -> int:
    peers = 2 + (ctx.ssh is not None)
    return 2 * peers * plan(ctx)["rounds"]


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    p = plan(ctx)
    results: dict[str, dict[str, list[float]]] = {"single": {}, "multi": {}}
    cpu: dict[str, dict[str, list[float]]] = {"single": {}, "multi": {}}
    breakdown: dict[str, dict[str, list[dict[str, float]]]] = {"single": {}, "multi": {}}
    failures: list[str] = []
    with ctx.carapace() as carapace:
        ports = ctx.peer_ports(carapace)
        # Warm-up through every peer.
        for port in ports.values():
            ctx.client({"mode": "sse-throughput", "peer": ["127.0.0.1", port], "streams": 4,
                        "events_per_stream": 2000, "path": PATH}, 60)
        for rnd in range(p["rounds"]):
            for kind, streams, per_stream in (("single", 1, p["single"]),
                                              ("multi", STREAMS, p["multi_per_stream"])):
                for peer in rotate(list(ports), rnd):
                    ctx.advance(f"sse-throughput: {kind} via {peer}, round {rnd + 1}")
                    spec = {"mode": "sse-throughput", "peer": ["127.0.0.1", ports[peer]],
                            "streams": streams, "events_per_stream": per_stream, "path": PATH}
                    try:
                        out = ctx.measure(peer, carapace, spec, 180,
                                          profile=f"sse-throughput {kind}")
                    except ScenarioError as exc:
                        failures.append(f"{kind} via {peer}: {exc}")
                        continue
                    results[kind].setdefault(peer, []).append(out["events_per_s"])
                    cpu[kind].setdefault(peer, []).append(out["cpu_us_per_unit"])
                    breakdown[kind].setdefault(peer, []).append(
                        {k: round(v / out["units"] * 1e6, 2) for k, v in out["cpu"].items()})
    for kind, label in (("single", "1 stream"), ("multi", f"{STREAMS} streams, total")):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"throughput.{kind}", label=label, unit="events/s",
            values=ordered({peer: median(v) for peer, v in results[kind].items()}),
            compare="ratio", decimals=0)))
    for kind, label in (("single", "1 stream"), ("multi", f"{STREAMS} streams")):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"throughput.{kind}.cpu", label=f"CPU per event, all processes, {label}",
            unit="µs", values=ordered({peer: median(v) for peer, v in cpu[kind].items()}),
            compare="ratio", decimals=1)))
    res.notes += failures
    res.notes.append(
        f"{p['single']:,} events on 1 stream; {STREAMS} × {p['multi_per_stream']:,} events; "
        f"~{SIZE} B each; median of {p['rounds']} round(s); 'vs direct' is a ratio")
    res.raw = {"rounds": results, "plan": p, "cpu_us_per_event": breakdown,
               "client": "raw trio socket, counts blank lines (no parsing)"}
    return res
