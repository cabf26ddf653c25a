"""SSE event latency: one stream at 200 events/s per peer, all peers at once.

Latency of an event = the time the client read it (``time.time()`` after the
``receive_some`` that completed it) − the ``ts`` the upstream wrote into it
just before its ``send_all``. The three streams run concurrently in one client
process, started 1.67 ms apart so their events interleave instead of landing
together; machine noise hits all three alike. Upstreams: the test upstream
(batched and per-event: for ``/sse`` the same writes, plus a comment every ten
events) and uvicorn + sse-starlette; each with its own Carapace pair, one
upstream after the other.
"""

from __future__ import annotations

from ..common import Ctx, Row, ScenarioError, ScenarioResult, timed
from ..stats import pct
from ..upstreams import Served
from ._peers import key_for, label_for, na_for_missing, ordered, skipped_notes

NAME = "sse-latency"
TITLE = "SSE latency, 1 stream at 200 events/s (ms)"
UPSTREAMS = ("test", "test-per-event", "sse-starlette")
INTERVAL_MS = 5
SIZE = 300


def steps(ctx: Ctx) -> int:
    return 2 * max(1, len(ctx.upstreams_for(UPSTREAMS)))


def events(ctx: Ctx) -> int:
    return 400 if ctx.quick else 2000


def measure(ctx: Ctx, up: Served, count: int) -> dict[str, object]:
    """One Carapace pair to ``up``; the three peers' streams at once."""
    with ctx.carapace(up=up) as carapace:
        ports = ctx.peer_ports(carapace, up)
        peers = {name: ["127.0.0.1", port] for name, port in ports.items()}
        stagger = INTERVAL_MS / len(peers)
        # Warm-up: connections, the server's upstream pool, code paths.
        ctx.client({"mode": "sse-latency", "peers": peers, "count": 50, "stagger_ms": stagger,
                    "path": f"/sse?count=50&interval_ms=2&size={SIZE}"}, 60)
        ctx.advance(f"sse-latency: {up.name}, measuring")
        out = ctx.client({"mode": "sse-latency", "peers": peers, "count": count,
                          "stagger_ms": stagger,
                          "path": f"/sse?count={count}&interval_ms={INTERVAL_MS}&size={SIZE}"},
                         count * INTERVAL_MS / 1000 + 60)
        ctx.advance(f"sse-latency: {up.name}, done")
    return out


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    count = events(ctx)
    ups = ctx.upstreams_for(UPSTREAMS)
    several = len(ups) > 1
    res.notes += skipped_notes(ctx, UPSTREAMS)
    measured = 0
    for up in ups:
        try:
            out = measure(ctx, up, count)
        except ScenarioError as exc:
            res.notes.append(f"{up.name}: {exc}")
            continue
        samples: dict[str, list[float]] = out["samples"]  # type: ignore[assignment]
        errors: dict[str, str] = out["errors"]  # type: ignore[assignment]
        for peer, why in errors.items():
            res.notes.append(f"{up.name} via {peer}: {why}")
            samples[peer] = []
        if not samples.get("direct"):
            res.notes.append(f"{up.name}: direct stream failed: {errors.get('direct')}")
            continue
        measured += 1
        res.samples[key_for("sse_latency_ms", up)] = {p: v for p, v in samples.items() if v}
        for key, label, q in (("p50", "p50", 0.5), ("p99", "p99", 0.99), ("max", "max", 1.0)):
            res.rows.append(na_for_missing(ctx, Row(
                key=key_for(f"sse.{key}", up), label=label_for(f"event latency {label}", up,
                                                               several),
                unit="ms", values=ordered({p: pct(v, q) for p, v in samples.items() if v}),
                compare="diff", decimals=2)))
        res.raw[key_for("events_per_peer", up)] = {p: len(v) for p, v in samples.items()}
    if not measured:
        raise ScenarioError("no upstream's direct stream worked: " + "; ".join(res.notes))
    res.raw.update({"interval_ms": INTERVAL_MS, "size": SIZE,
                    "client": "raw trio socket + h11 + carapace.protocol.sse.SseParser"})
    res.notes.append(f"{count} events of ~{SIZE} B per peer; 'vs direct' is the added latency")
    return res
