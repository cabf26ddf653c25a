"""N concurrent idle SSE streams through one agent (10,000; 1,000 with --quick).

Each stream is ``/sse-forever`` with an hour between events: it is open once its
first event arrived. Measured: the time to open all of them (also directly and
through ssh -L, for scale), the RSS each costs the agent and the server
((VmRSS with the streams open − before) / N), and, while they stay open, the
latency of one live 200 events/s stream through Carapace (and directly, as the
reference), read by a second client process. Opening is bounded in time (and
stops at 15 s without progress); streams still opening then are cancelled and
the rest of the scenario runs with those that opened.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import httpx

from ..common import Ctx, Row, ScenarioError, ScenarioResult, pct, timed
from ..harness import rss_kib
from ._peers import ordered

NAME = "idle-streams"
TITLE = "Idle SSE streams"
IDLE_PATH = "/sse-forever?interval_ms=3600000&size=64"


def streams(ctx: Ctx) -> int:
    return 1_000 if ctx.quick else 10_000


def live_events(ctx: Ctx) -> int:
    """Full runs cover more than one 15 s keepalive period of the idle streams."""
    return 400 if ctx.quick else 3200


def steps(ctx: Ctx) -> int:
    return 3 + ssh_open(ctx)


def _read_phase(proc: subprocess.Popen[str], want: str, timeout: float) -> dict[str, Any]:
    """Next JSON line from the interactive client (bounded by ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "error" in msg:
                raise ScenarioError(f"client: {msg['error']}")
            if msg.get("phase") == want or (want == "result" and "result" in msg):
                return dict(msg.get("result", msg))
    finally:
        sel.close()
    err = proc.stderr.read()[-600:] if proc.stderr and proc.poll() is not None else ""
    raise ScenarioError(f"client did not reach phase {want!r} in {timeout:.0f} s {err}")


def _send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.poll() is None and proc.stdin is not None:
            _send(proc, "close")
        proc.wait(60)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(10)


def _open_only(ctx: Ctx, port: int, n: int, timeout: float) -> dict[str, Any]:
    proc = ctx.start_client({"mode": "idle", "peer": ["127.0.0.1", port], "streams": n,
                             "path": IDLE_PATH, "open_timeout": timeout})
    try:
        return _read_phase(proc, "open", timeout + 60)
    finally:
        _finish(proc)


def _wait_upstream_idle(ctx: Ctx, timeout: float = 60) -> None:
    """Until the upstream has no open streams left (the last run's closes landed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stats = httpx.get(f"http://127.0.0.1:{ctx.upstream.port}/stats", timeout=5).json()
            if stats.get("open_streams", 0) == 0:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)


def open_timeout(ctx: Ctx) -> float:
    return 60.0 if ctx.quick else 90.0


def ssh_open(ctx: Ctx) -> bool:
    """Time-to-open through ssh -L only where it is cheap: at 10,000 streams it took
    ~100 s on these machines and reset some channels, a third of the run's budget."""
    return ctx.ssh is not None and ctx.quick


@timed
def run(ctx: Ctx) -> ScenarioResult:
    n = streams(ctx)
    res = ScenarioResult(NAME, f"{n:,} idle SSE streams")
    open_s: dict[str, float | None] = {}
    opened_n: dict[str, int] = {}
    curves: dict[str, Any] = {}
    failures: list[str] = []
    timeout = open_timeout(ctx)

    def record(peer: str, out: dict[str, Any]) -> None:
        opened_n[peer] = out["opened"]
        curves[peer] = out.get("curve")
        if out["opened"] == n:
            open_s[peer] = out["open_seconds"]
        else:
            errs = f"; errors: {out['first_errors']}" if out["first_errors"] else ""
            failures.append(f"via {peer}: {out['opened']:,} of {n:,} open after "
                            f"{out['open_seconds']:.0f} s (bounded at {timeout:.0f} s, or 15 s "
                            f"without progress){errs}")

    for peer, port in (("direct", ctx.upstream.port),
                       ("ssh", ctx.ssh.port if ctx.ssh and ssh_open(ctx) else None)):
        if port is None:
            continue
        ctx.advance(f"idle-streams: opening {n:,} via {peer}")
        try:
            record(peer, _open_only(ctx, port, n, timeout))
        except ScenarioError as exc:
            failures.append(f"via {peer}: {exc}")
        _wait_upstream_idle(ctx)

    server_args: list[str] = []
    if ctx.server_flag("--max-requests-per-agent"):
        server_args += ["--max-requests-per-agent", str(n + 1000)]
    rss: dict[str, dict[str, int]] = {}
    live: dict[str, list[float]] = {}
    count = live_events(ctx)
    with ctx.carapace(server_args=server_args) as carapace:
        pids = carapace.pids()
        ctx.client({"mode": "sse-latency", "peers": {"c": ["127.0.0.1", carapace.port]},
                    "count": 20, "path": "/sse?count=20&interval_ms=1"}, 60)
        time.sleep(0.5)
        rss["before"] = {name: rss_kib(pid) for name, pid in pids.items()}
        ctx.advance(f"idle-streams: opening {n:,} via carapace")
        proc = ctx.start_client({"mode": "idle", "peer": ["127.0.0.1", carapace.port],
                                 "streams": n, "path": IDLE_PATH, "open_timeout": timeout})
        try:
            with ctx.profile("idle-streams open", pids):
                record("carapace", _read_phase(proc, "open", timeout + 60))
            time.sleep(2.0)  # let the last frames (and any cancelled opens) settle
            rss["open"] = {name: rss_kib(pid) for name, pid in pids.items()}
            ctx.advance("idle-streams: live stream while they are open")
            # A separate client process reads the live streams, so the one holding
            # the idle streams (and reading their keepalives) does not skew them.
            try:
                live_out = ctx.client({
                    "mode": "sse-latency", "count": count, "stagger_ms": 2.5,
                    "peers": {"direct": ["127.0.0.1", ctx.upstream.port],
                              "carapace": ["127.0.0.1", carapace.port]},
                    "path": f"/sse?count={count}&interval_ms=5&size=300"},
                    count * 0.005 + 60)
                live = {p: v for p, v in live_out["samples"].items() if v}
                for peer, why in live_out["errors"].items():
                    failures.append(f"live stream via {peer}: {why}")
            except ScenarioError as exc:
                failures.append(f"live stream: {exc}")
        finally:
            _finish(proc)
        alive = {name: p.alive() for name, p in
                 (("agent", carapace.agent), ("server", carapace.server)) if p is not None}
    _wait_upstream_idle(ctx)
    for name, ok in alive.items():
        if not ok:
            failures.append(f"the {name} died during the scenario")

    held = opened_n.get("carapace", 0)
    per_stream = {name: (rss["open"][name] - rss["before"][name]) / held
                  for name in rss.get("open", {})} if held else {}
    ssh_na = ({} if ssh_open(ctx) else
              {"ssh": ctx.ssh_reason or "no ssh"} if ctx.ssh is None else
              {"ssh": "not at 10,000 (slow); --quick measures 1,000"})
    res.rows.append(Row(key="idle.open_s", label=f"time to open {n:,}", unit="s",
                        values=ordered(open_s), compare="ratio", decimals=2, na=ssh_na))
    for name in ("agent", "server"):
        res.rows.append(Row(key=f"idle.rss.{name}", label=f"RSS per stream, {name}",
                            unit="KiB", values=ordered({"carapace": per_stream.get(name)}),
                            decimals=1, na={"direct": "n/a", "ssh": "n/a"}))
    for q, qname in ((0.5, "p50"), (0.99, "p99")):
        res.rows.append(Row(key=f"idle.live.{qname}", label=f"live stream {qname} meanwhile",
                            unit="ms", values=ordered({p: pct(v, q) for p, v in live.items()}),
                            compare="diff", decimals=2,
                            na={"ssh": "not measured"}))
    res.samples["idle_live_latency_ms"] = live
    res.notes += failures
    if held and held < n:
        res.notes.append(f"RSS per stream over the {held:,} streams that did open; the rest "
                         "were cancelled before the live stream ran")
    res.notes.append(f"live: {count:,} events at 200/s through Carapace while the streams are "
                     "held, read by a separate client with direct as the reference")
    res.raw = {"rss_kib": rss, "open_seconds": open_s, "opened": opened_n, "streams": n,
               "open_curve": curves}
    return res
