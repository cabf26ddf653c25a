"""SSE throughput: one stream as fast as the upstream writes, and 100 streams at once.

The upstream's ``/sse-flood`` formats ≈300-byte events (each with its own id
and ts) 32 to a write, which keeps it well above 100,000 events/s, so the
direct column shows what the client and the machine can do. Peers run one
after the other (never concurrently: each run wants both cores), in rounds
whose starting peer rotates; the table shows each peer's median round.

Upstreams: that batched test upstream, the same with ``--write-pattern
per-event`` (one chunk per event, a comment every ten), and uvicorn +
sse-starlette (one event per write). The last two are ~10x slower per event,
so they send a quarter of the events. The tunnel's own CPU per event (agent +
server, or ssh + sshd) is a row of its own, set against ssh -L's in a note.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, median, timed
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

NAME = "sse-throughput"
TITLE = "SSE throughput (events/s)"
UPSTREAMS = ("test", "test-per-event", "sse-starlette")
SIZE = 300
PATH = "/sse-flood?count={count}&size=300&batch=32"
STREAMS = 100
KINDS = ("single", "multi")


def plan(ctx: Ctx) -> dict[str, int]:
    if ctx.quick:
        return {"single": 60_000, "multi_per_stream": 600, "rounds": 1}
    return {"single": 200_000, "multi_per_stream": 2_000, "rounds": 3}


def steps(ctx: Ctx) -> int:
    peers = 2 + (ctx.ssh is not None)
    return 2 * peers * plan(ctx)["rounds"] * max(1, len(ctx.upstreams_for(UPSTREAMS)))


Series = dict[str, dict[str, list[float]]]


def measure(ctx: Ctx, up: Served, p: dict[str, int], failures: list[str]
            ) -> tuple[Series, Series, Series, dict[str, dict[str, list[dict[str, float]]]]]:
    """Every peer's rounds against ``up``: events/s, CPU per event (all processes and
    the tunnel's own), and the per-process breakdown."""
    rate: Series = {k: {} for k in KINDS}
    cpu: Series = {k: {} for k in KINDS}
    tunnel: Series = {k: {} for k in KINDS}
    breakdown: dict[str, dict[str, list[dict[str, float]]]] = {k: {} for k in KINDS}
    single = max(1000, int(p["single"] * up.flood_share))
    per_stream = max(10, int(p["multi_per_stream"] * up.flood_share))
    with ctx.carapace(up=up) as carapace:
        ports = ctx.peer_ports(carapace, up)
        for port in ports.values():  # warm-up through every peer
            ctx.client({"mode": "sse-throughput", "peer": ["127.0.0.1", port], "streams": 4,
                        "events_per_stream": 2000, "path": PATH}, 60)
        for rnd in range(p["rounds"]):
            for kind, streams, count in (("single", 1, single),
                                         ("multi", STREAMS, per_stream)):
                for peer in rotate(list(ports), rnd):
                    ctx.advance(f"sse-throughput: {up.name}, {kind} via {peer}, "
                                f"round {rnd + 1}")
                    spec = {"mode": "sse-throughput", "peer": ["127.0.0.1", ports[peer]],
                            "streams": streams, "events_per_stream": count, "path": PATH}
                    try:
                        out = ctx.measure(peer, carapace, spec, 180,
                                          profile=f"sse-throughput {kind}", up=up)
                    except ScenarioError as exc:
                        failures.append(f"{up.name}: {kind} via {peer}: {exc}")
                        continue
                    rate[kind].setdefault(peer, []).append(out["events_per_s"])
                    cpu[kind].setdefault(peer, []).append(out["cpu_us_per_unit"])
                    tunnel[kind].setdefault(peer, []).append(out["tunnel_us_per_unit"])
                    breakdown[kind].setdefault(peer, []).append(
                        {k: round(v / out["units"] * 1e6, 2) for k, v in out["cpu"].items()})
    return rate, cpu, tunnel, breakdown


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    p = plan(ctx)
    ups = ctx.upstreams_for(UPSTREAMS)
    several = len(ups) > 1
    failures: list[str] = skipped_notes(ctx, UPSTREAMS)
    tunnel_notes: list[str] = []
    for up in ups:
        try:
            rate, cpu, tunnel, breakdown = measure(ctx, up, p, failures)
        except ScenarioError as exc:  # its warm-up failed: the other upstreams go on
            failures.append(f"{up.name}: {exc}")
            continue
        for kind, label in (("single", "1 stream"), ("multi", f"{STREAMS} streams, total")):
            res.rows.append(na_for_missing(ctx, Row(
                key=key_for(f"throughput.{kind}", up), label=label_for(label, up, several),
                unit="events/s",
                values=ordered({peer: median(v) for peer, v in rate[kind].items()}),
                compare="ratio", decimals=0)))
        for kind, label in (("single", "1 stream"), ("multi", f"{STREAMS} streams")):
            res.rows.append(na_for_missing(ctx, Row(
                key=key_for(f"throughput.{kind}.cpu", up),
                label=label_for(f"CPU per event, all processes, {label}", up, several),
                unit="µs", values=ordered({peer: median(v) for peer, v in cpu[kind].items()}),
                compare="ratio", decimals=1)))
        for kind, label in (("single", "1 stream"), ("multi", f"{STREAMS} streams")):
            row = na_for_missing(ctx, Row(
                key=key_for(f"throughput.{kind}.tunnel_cpu", up),
                label=label_for(f"tunnel CPU per event, {label}", up, several), unit="µs",
                values=ordered({peer: median(v) for peer, v in tunnel[kind].items()
                                if peer != "direct"}),
                decimals=1, na={"direct": "no tunnel"}))
            res.rows.append(row)
            if (note := tunnel_vs_ssh(row, up, f"event, {label}")) is not None:
                tunnel_notes.append(note)
        res.raw[key_for("rounds", up)] = rate
        res.raw[key_for("cpu_us_per_event", up)] = breakdown
    if not res.rows:
        raise ScenarioError("no upstream measured: " + "; ".join(failures))
    res.notes += failures + tunnel_notes + [TUNNEL_CPU_NOTE]
    res.notes.append(
        f"{p['single']:,} events on 1 stream; {STREAMS} × {p['multi_per_stream']:,} events "
        "(a quarter of that from the upstreams that write one event at a time); "
        f"~{SIZE} B each; median of {p['rounds']} round(s); 'vs direct' is a ratio")
    res.raw.update({"plan": p,
                    "client": "raw trio socket, counts blank lines (no parsing)"})
    return res
