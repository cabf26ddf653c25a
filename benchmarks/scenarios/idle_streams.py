"""N concurrent idle SSE streams through one agent (10,000; 1,000 with --quick).

Each stream is ``/sse-forever`` with an hour between events: it is open once its
first event arrived. Measured per peer: the time to open all of them (directly,
for scale); through ssh -L and through Carapace, the RSS each stream costs the
processes in between ((VmRSS with the streams open − before) / N: the agent
and the server, the ssh client and the sshd serving it) and, while they stay
open, the latency of one live 200 events/s stream through that peer (and
directly, as the reference), read by a second client process. Opening is
bounded in time (and stops at 15 s without progress); streams still opening
then are cancelled and the rest runs with those that opened.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..common import Ctx, Row, ScenarioError, ScenarioResult, timed
from ..harness import rss_kib
from ..stats import pct
from ._peers import na_for_missing, ordered

NAME = "idle-streams"
TITLE = "Idle SSE streams"
IDLE_PATH = "/sse-forever?interval_ms=3600000&size=64"


def streams(ctx: Ctx) -> int:
    return 1_000 if ctx.quick else 10_000


def live_events(ctx: Ctx) -> int:
    """Full runs cover more than one 15 s keepalive period of the idle streams."""
    return 400 if ctx.quick else 3200


def steps(ctx: Ctx) -> int:
    return 1 + 2 * (2 if ctx.ssh is not None else 1)


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


def _rss(pids: dict[str, list[int]]) -> dict[str, int]:
    """KiB of RSS per role, summed over the role's processes."""
    return {role: sum(rss_kib(pid) for pid in group) for role, group in pids.items()}


@dataclass
class Held:
    """What holding N idle streams through one peer showed."""

    opened: dict[str, Any]
    rss_before: dict[str, int]
    rss_open: dict[str, int]
    live: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _hold(ctx: Ctx, peer: str, port: int, pids: Callable[[], dict[str, list[int]]],
          n: int, profile: dict[str, int] | None = None) -> Held:
    """Open ``n`` idle streams through ``peer``, take the RSS of the processes in
    between (``pids``: role → processes), then measure a live stream through the
    same peer, and directly as the reference, while they stay open. With
    ``--profile``, the ``profile`` processes are sampled while the streams open."""
    timeout = open_timeout(ctx)
    count = live_events(ctx)
    ctx.client({"mode": "sse-latency", "peers": {peer: ["127.0.0.1", port]},
                "count": 20, "path": "/sse?count=20&interval_ms=1"}, 60)  # warm-up
    time.sleep(0.5)
    before = _rss(pids())
    ctx.advance(f"idle-streams: opening {n:,} via {peer}")
    proc = ctx.start_client({"mode": "idle", "peer": ["127.0.0.1", port], "streams": n,
                             "path": IDLE_PATH, "open_timeout": timeout})
    try:
        with (ctx.profile("idle-streams open", profile) if profile
              else contextlib.nullcontext()):
            opened = _read_phase(proc, "open", timeout + 60)
        time.sleep(2.0)  # let the last frames (and any cancelled opens) settle
        held = Held(opened, before, _rss(pids()))
        ctx.advance(f"idle-streams: live stream via {peer} while they are open")
        # A separate client process reads the live streams, so the one holding
        # the idle streams (and reading their keepalives) does not skew them.
        try:
            live_out = ctx.client({
                "mode": "sse-latency", "count": count, "stagger_ms": 2.5,
                "peers": {"direct": ["127.0.0.1", ctx.upstream.port],
                          peer: ["127.0.0.1", port]},
                "path": f"/sse?count={count}&interval_ms=5&size=300"},
                count * 0.005 + 60)
            held.live = {p: v for p, v in live_out["samples"].items() if v}
            for who, why in live_out["errors"].items():
                held.failures.append(f"live stream via {who}: {why}")
        except ScenarioError as exc:
            held.failures.append(f"live stream via {peer}: {exc}")
    finally:
        _finish(proc)
    return held


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

    ctx.advance(f"idle-streams: opening {n:,} via direct")
    try:
        record("direct", _open_only(ctx, ctx.upstream.port, n, timeout))
    except ScenarioError as exc:
        failures.append(f"via direct: {exc}")
    _wait_upstream_idle(ctx)

    held: dict[str, Held] = {}
    alive: dict[str, bool] = {}
    if ctx.ssh is not None:
        ssh = ctx.ssh
        try:
            held["ssh"] = _hold(ctx, "ssh", ssh.port, lambda: {
                "agent": list(ssh.pids().values()),
                "server": list(ssh.sshd_pids().values())}, n)
        except ScenarioError as exc:
            failures.append(f"via ssh: {exc}")
        _wait_upstream_idle(ctx)

    server_args: list[str] = []
    if ctx.server_flag("--max-requests-per-agent"):
        server_args += ["--max-requests-per-agent", str(n + 1000)]
    # Deliberate fan-out through one agent: above the fair-share defaults.
    for flag in ("--max-sse-streams-per-agent", "--max-sse-streams",
                 "--max-upstream-connections-per-agent", "--max-upstream-connections"):
        if ctx.server_flag(flag):
            server_args += [flag, str(n + 1000)]
    with ctx.carapace(server_args=server_args) as carapace:
        pids = carapace.pids()
        try:
            held["carapace"] = _hold(ctx, "carapace", carapace.port,
                                     lambda: {k: [v] for k, v in pids.items()}, n, pids)
        except ScenarioError as exc:
            failures.append(f"via carapace: {exc}")
        alive = {name: p.alive() for name, p in
                 (("agent", carapace.agent), ("server", carapace.server)) if p is not None}
    _wait_upstream_idle(ctx)
    for name, ok in alive.items():
        if not ok:
            failures.append(f"the {name} died during the scenario")

    per_stream: dict[str, dict[str, float]] = {}
    live: dict[str, list[float]] = {}
    for peer, h in held.items():
        record(peer, h.opened)
        failures += h.failures
        live[peer] = h.live.get(peer, [])
        if peer == "carapace":  # the direct column: the reference read beside Carapace
            live["direct"] = h.live.get("direct", [])
        elif h.live.get("direct"):
            ref = h.live["direct"]
            res.notes.append(f"beside ssh, the direct reference read p50 {pct(ref, 0.5):.2f} ms, "
                             f"p99 {pct(ref, 0.99):.2f} ms")
        count = h.opened["opened"]
        if count:
            per_stream[peer] = {role: (h.rss_open[role] - h.rss_before[role]) / count
                                for role in h.rss_open}
            if count < n:
                res.notes.append(f"{peer}: RSS per stream over the {count:,} streams that did "
                                 "open; the rest were cancelled before the live stream ran")
    res.rows.append(na_for_missing(ctx, Row(
        key="idle.open_s", label=f"time to open {n:,}", unit="s", values=ordered(open_s),
        compare="ratio", decimals=2)))
    for role, who in (("agent", "client"), ("server", "sshd")):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"idle.rss.{role}", label=f"RSS per stream, {role} (ssh: {who})", unit="KiB",
            values=ordered({p: v.get(role) for p, v in per_stream.items()}), decimals=1,
            na={"direct": "no process between"})))
    for q, qname in ((0.5, "p50"), (0.99, "p99")):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"idle.live.{qname}", label=f"live stream {qname} meanwhile", unit="ms",
            values=ordered({p: pct(v, q) for p, v in live.items()}), compare="diff",
            decimals=2)))
    res.samples["idle_live_latency_ms"] = live
    res.notes += failures
    res.notes.append(f"live: {live_events(ctx):,} events at 200/s through each peer while "
                     "its streams are held, read by a separate client beside a direct "
                     "reference read (the direct column: the one beside Carapace)")
    res.raw = {"rss_kib": {p: {"before": h.rss_before, "open": h.rss_open}
                           for p, h in held.items()},
               "open_seconds": open_s, "opened": opened_n, "streams": n, "open_curve": curves}
    return res
