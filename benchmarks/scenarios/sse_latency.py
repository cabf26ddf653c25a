"""SSE event latency: one stream at 200 events/s per peer, all peers at once.

Latency of an event = the time the client read it (``time.time()`` after the
``receive_some`` that completed it) − the ``ts`` the upstream wrote into it
just before its ``send_all``. The three streams run concurrently in one client
process, started 1.67 ms apart so their events interleave instead of landing
together; machine noise hits all three alike.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, pct, timed
from ._peers import na_for_missing, ordered

NAME = "sse-latency"
TITLE = "SSE latency, 1 stream at 200 events/s (ms)"
INTERVAL_MS = 5
SIZE = 300


def steps(ctx: Ctx) -> int:
    return 2


def events(ctx: Ctx) -> int:
    return 400 if ctx.quick else 2000


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    count = events(ctx)
    with ctx.carapace() as carapace:
        ports = ctx.peer_ports(carapace)
        peers = {name: ["127.0.0.1", port] for name, port in ports.items()}
        stagger = INTERVAL_MS / len(peers)
        # Warm-up: connections, the server's upstream pool, code paths.
        ctx.client({"mode": "sse-latency", "peers": peers, "count": 50, "stagger_ms": stagger,
                    "path": f"/sse?count=50&interval_ms=2&size={SIZE}"}, 60)
        ctx.advance("sse-latency: measuring")
        out = ctx.client({"mode": "sse-latency", "peers": peers, "count": count,
                          "stagger_ms": stagger,
                          "path": f"/sse?count={count}&interval_ms={INTERVAL_MS}&size={SIZE}"},
                         count * INTERVAL_MS / 1000 + 60)
        ctx.advance("sse-latency: done")
    samples: dict[str, list[float]] = out["samples"]
    errors: dict[str, str] = out["errors"]
    for peer, why in errors.items():
        res.notes.append(f"{peer}: {why}")
        samples[peer] = []
    if not samples.get("direct"):
        raise ScenarioError(f"direct stream failed: {errors.get('direct')}")
    res.samples["sse_latency_ms"] = {p: v for p, v in samples.items() if v}
    for key, label, q in (("p50", "p50", 0.5), ("p99", "p99", 0.99), ("max", "max", 1.0)):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"sse.{key}", label=f"event latency {label}", unit="ms",
            values=ordered({p: pct(v, q) for p, v in samples.items() if v}),
            compare="diff", decimals=2)))
    res.raw = {"events_per_peer": {p: len(v) for p, v in samples.items()},
               "interval_ms": INTERVAL_MS, "size": SIZE,
               "client": "raw trio socket + h11 + carapace.protocol.sse.SseParser"}
    res.notes.append(f"{count} events of ~{SIZE} B per peer; 'vs direct' is the added latency")
    return res
