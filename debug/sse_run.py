"""``carapace-debug sse-test`` without a subcommand: events at an interval, each one shown.

The Rust Carapace's ``sse-test --count N --interval-ms MS`` generated N events and
printed each with its elapsed time, then the rate. Here the same command does that,
and with ``--through URL`` it reads the events through the tunnel instead:

- without ``--through`` the events come from a test source started here (the test
  upstream, on a loopback port) and are read back directly. That exercises the
  generator and this host's SSE reading, not the tunnel, and the output says so. A
  host-side command cannot send anything through the tunnel by itself: the tunnel
  only carries requests the agent makes, to upstreams the policy names. When a
  server's debug listener answers, the output names the command that does measure it;
- ``--through URL`` reads an SSE URL served through the agent (in the VM, the
  ``--expose`` port of a tool whose upstream is ``sse-test serve``, or any source whose
  events carry a numeric ``ts``). Each event's latency is its arrival here minus that
  ``ts``; with ``--direct URL``, the same source read without the tunnel at the same
  time, the latency of the same event number there is subtracted: what the tunnel
  added, event by event.

When the debug listener answers, a ``--through`` run also reads the server's count of
forwarded SSE events before and after: the server's own word that events crossed it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click

from .client import EXIT_UNREACHABLE, DebugClient, Unreachable
from .sse_timing import Collection, Sample, analyse, collect, percentile

PROBE_TIMEOUT = 2.0
"""Seconds to wait for the debug listener: the run must not hang on a server it only
reports on (inside a VM there is usually none)."""


@dataclass(frozen=True)
class RunSpec:
    count: int
    interval_ms: float
    through: str | None  # None: generate here and read directly
    direct: str | None
    timeout: float


@dataclass
class Row:
    """One event as shown: when it arrived and what it cost (milliseconds)."""

    n: int
    id: str | None
    event: str
    elapsed_ms: float
    latency_ms: float | None
    direct_ms: float | None = None
    added_ms: float | None = None


def with_query(url: str, count: int, interval_ms: float) -> str:
    """``url`` asking for ``count`` events ``interval_ms`` apart (the test upstream's
    parameters), unless its query already says."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {name for name, _ in query}
    query += [(k, v) for k, v in (("count", str(count)), ("interval_ms", f"{interval_ms:g}"))
              if k not in names]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _key(sample: Sample, n: int) -> object:
    """What pairs an event with its twin on the direct read: seq, else id, else position."""
    return sample.seq if sample.seq is not None else sample.id if sample.id is not None else n


def _latency(sample: Sample | None) -> float | None:
    if sample is None or sample.ts is None:
        return None
    return round((sample.arrival - sample.ts) * 1000.0, 3)


@dataclass
class EventLog:
    """Turns arriving events into rows, in order, each once its direct twin is known.

    The direct read is usually the faster one; a row waits for its twin only while
    the direct read is still going, so a direct read that fails or ends early holds
    nothing back.
    """

    started: float
    show: Callable[[Row], None] | None
    paired: bool
    rows: list[Row] = field(default_factory=list)
    _main: list[Sample] = field(default_factory=list)
    _direct: dict[object, Sample] = field(default_factory=dict)
    _direct_done: bool = False

    def on_main(self, sample: Sample) -> None:
        self._main.append(sample)
        self._emit_ready()

    def on_direct(self, sample: Sample) -> None:
        self._direct[_key(sample, len(self._direct) + 1)] = sample
        self._emit_ready()

    def direct_done(self) -> None:
        self._direct_done = True
        self._emit_ready()

    def _emit_ready(self) -> None:
        while len(self.rows) < len(self._main):
            n = len(self.rows) + 1
            sample = self._main[n - 1]
            twin = self._direct.get(_key(sample, n)) if self.paired else None
            if self.paired and twin is None and not self._direct_done:
                return
            latency, direct = _latency(sample), _latency(twin)
            row = Row(n=n, id=sample.id, event=sample.event or "message",
                      elapsed_ms=round((sample.arrival - self.started) * 1000.0, 3),
                      latency_ms=latency, direct_ms=direct,
                      added_ms=None if latency is None or direct is None
                      else round(latency - direct, 3))
            self.rows.append(row)
            if self.show is not None:
                self.show(row)


@dataclass
class Outcome:
    url: str
    main: Collection
    direct: Collection | None


async def _read(spec: RunSpec, log: EventLog) -> Outcome:
    """Read the events (from a source started here unless ``spec.through``), with the
    direct read beside them when asked."""
    import trio

    from carapace.debug.upstream import serve_upstream

    read = functools.partial(collect, count=spec.count, timeout=spec.timeout)
    direct: list[Collection] = []

    async def read_direct(url: str) -> None:
        try:
            direct.append(await read(url, on_sample=log.on_direct))
        except Unreachable as exc:
            raise Unreachable(f"the direct read: {exc.message}", exc.hint) from None
        finally:
            log.direct_done()

    async with trio.open_nursery() as outer:
        if spec.through is None:
            source = await outer.start(functools.partial(
                serve_upstream, "127.0.0.1", 0, stream_count=spec.count,
                stream_interval_ms=spec.interval_ms))
            url = source.url("/sse")
        else:
            url = spec.through
        url = with_query(url, spec.count, spec.interval_ms)
        async with trio.open_nursery() as inner:
            if spec.direct is not None:
                inner.start_soon(read_direct, with_query(spec.direct, spec.count,
                                                         spec.interval_ms))
            main = await read(url, on_sample=log.on_main)
        outer.cancel_scope.cancel()  # the local source serves forever
    return Outcome(url, main, direct[0] if direct else None)


def probe(client: DebugClient) -> dict[str, Any]:
    """What the server's debug listener says, or why it said nothing."""
    quick = dataclasses.replace(client, timeout=PROBE_TIMEOUT)
    try:
        doc = quick.get_json("/debug/health")
    except Unreachable as exc:
        return {"address": client.address, "reachable": False, "error": exc.message}
    return {"address": client.address, "reachable": True, "status": doc.get("status"),
            "agents": doc.get("agents") or [], "tools": (doc.get("policy") or {}).get("tools"),
            "sse_events": doc.get("sse_events")}


# --------------------------------------------------------------------------- the report


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"p50_ms": round(percentile(ordered, 50), 3),
            "p99_ms": round(percentile(ordered, 99), 3),
            "max_ms": round(ordered[-1], 3), "events": len(ordered)}


def _through_scope(spec: RunSpec, outcome: Outcome, rows: list[Row]
                   ) -> tuple[list[str], list[str]]:
    """What a --through run measured and what it did not, in words."""
    measured = [f"{len(rows)} event(s) read through {outcome.url}"]
    not_measured: list[str] = []
    if any(r.latency_ms is not None for r in rows):
        measured[0] += ": latency = arrival here − the event's own 'ts' (the source's clock)"
    else:
        not_measured.append("latency: the events carry no numeric 'ts' in JSON data, so only "
                            "their arrival was timed (`carapace-debug sse-test serve` stamps "
                            "every event)")
    if spec.direct is not None:
        measured.append(f"the same source read directly at the same time ({spec.direct}): "
                        "added = latency through the tunnel − the same event's latency there")
    else:
        not_measured.append("a direct read of the source (--direct URL): the latency includes "
                            "the source's own delay and any offset between its clock and this "
                            "host's")
    return measured, not_measured


def _server_scope(spec: RunSpec, before: dict[str, Any], after: dict[str, Any] | None
                  ) -> tuple[list[str], list[str], str | None]:
    """What the debug listener added to the run: measured, not measured, the next step."""
    where = before["address"]
    if not before["reachable"] and spec.through is None:
        return [], [], (f"no server's debug listener answered here ({before['error']}). To "
                        "measure a tunnel, give --through URL: an SSE URL served through the "
                        "agent (carapace-debug sse-test --help)")
    if not before["reachable"]:
        return [], [f"the server's side: no debug listener answered ({before['error']}); "
                    "normal inside a VM"], None
    if spec.through is None:
        agents = ", ".join(before["agents"]) or "none"
        step = (f"carapace-server at {where} answers (status {before['status']}, agents: "
                f"{agents}). To send these events through its tunnel: on the host run "
                "`carapace-debug sse-test serve --port 8099` with a policy tool whose upstream "
                "is http://127.0.0.1:8099, then in the VM `carapace-debug sse-test --count "
                f"{spec.count} --interval-ms {spec.interval_ms:g} --through "
                "http://127.0.0.1:PORT/sse` (PORT: that tool's --expose port); see DEPLOYMENT.md")
        return [], [], step
    counts = (before.get("sse_events"), (after or {}).get("sse_events"))
    if all(isinstance(c, int) for c in counts):
        return [f"the server at {where} forwarded {counts[1] - counts[0]} SSE event(s) during "
                "the run (its count covers every stream, not only this one)"], [], None
    return [], [f"the server's count of forwarded events at {where}: not readable after the "
                "run"], None


def build_report(spec: RunSpec, outcome: Outcome, log: EventLog, before: dict[str, Any],
                 after: dict[str, Any] | None) -> dict[str, Any]:
    """The run as one JSON-able document (``exit_code`` included)."""
    analysis = analyse(outcome.main)
    rows = log.rows
    if spec.through is None:
        measured = [f"{len(rows)} event(s) generated here by a test source, "
                    f"{spec.interval_ms:g} ms apart, and read back directly over loopback HTTP"]
        not_measured = ["the tunnel: without --through URL no event crossed carapace-agent or "
                        "carapace-server"]
    else:
        measured, not_measured = _through_scope(spec, outcome, rows)
    more_measured, more_not, next_step = _server_scope(spec, before, after)
    direct = outcome.direct
    return {
        "mode": "local" if spec.through is None else "through",
        "url": outcome.url, "direct_url": spec.direct,
        "count": spec.count, "interval_ms": spec.interval_ms,
        "received": len(rows), "duration_ms": rows[-1].elapsed_ms if rows else None,
        "rate_per_s": analysis["rate_per_s"],
        "latency": _stats([r.latency_ms for r in rows if r.latency_ms is not None]),
        "added": _stats([r.added_ms for r in rows if r.added_ms is not None]),
        "direct": None if direct is None else {"received": len(direct.samples)},
        "events": [dataclasses.asdict(r) for r in rows],
        "verdict": analysis["verdict"], "ok": analysis["ok"],
        "problems": analysis["problems"], "notes": analysis["notes"],
        "measured": measured + more_measured, "not_measured": not_measured + more_not,
        "server": {"before": before, "after": after}, "next_step": next_step,
        "exit_code": analysis["exit_code"],
    }


# --------------------------------------------------------------------------- output


def _header(spec: RunSpec) -> str:
    what = f"SSE test: {spec.count} events, {spec.interval_ms:g} ms apart, "
    if spec.through is None:
        return what + "from a test source started here, read directly (not through the tunnel)"
    return what + f"through {spec.through}" + (
        f", and directly from {spec.direct}" if spec.direct else "")


def show_row(row: Row) -> None:
    parts = [f"[Event #{row.n}] id={row.id or '-'} event={row.event}",
             f"elapsed {row.elapsed_ms:.1f} ms"]
    if row.latency_ms is not None:
        parts.append(f"latency {row.latency_ms:.1f} ms")
    if row.direct_ms is not None:
        parts.append(f"direct {row.direct_ms:.1f} ms")
    if row.added_ms is not None:
        parts.append(f"tunnel added {row.added_ms:.1f} ms")
    click.echo("  ".join(parts))


def _fmt(stats: dict[str, float]) -> str:
    return (f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
            f"max {stats['max_ms']:.1f} ms over {stats['events']} event(s)")


def print_report(report: dict[str, Any]) -> None:
    local = report["mode"] == "local"
    took = report["duration_ms"]
    click.echo(f"{'Generated' if local else 'Received'} {report['received']} of "
               f"{report['count']} events" + ("" if took is None else f" in {took:.1f} ms"))
    rate = report["rate_per_s"]
    click.echo(f"Rate: {'—' if rate is None else f'{rate:.1f}'} events/s")
    if report["latency"]:
        click.echo(f"Latency: {_fmt(report['latency'])}")
    if report["added"]:
        click.echo(f"Tunnel added: {_fmt(report['added'])}")
    click.echo(f"Verdict: {report['verdict'].upper()}"
               + (" (of the local source; the tunnel was not measured)" if local else ""))
    for problem in report["problems"]:
        click.echo(f"  problem: {problem}")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    for line in report["measured"]:
        click.echo(f"Measured: {line}")
    for line in report["not_measured"]:
        click.echo(f"Not measured: {line}")
    if report["next_step"]:
        click.echo(f"Next: {report['next_step']}")


def run_and_report(spec: RunSpec, client: DebugClient, as_json: bool) -> int:
    """Run ``spec``, print what happened, and return the exit status."""
    import trio

    from carapace.runtime.errors import find_exception

    before = probe(client)
    if not as_json:
        click.echo(_header(spec))
    log = EventLog(started=time.time(), show=None if as_json else show_row,
                   paired=spec.direct is not None)
    try:
        outcome = trio.run(_read, spec, log)
    except (Unreachable, BaseExceptionGroup) as exc:
        found = find_exception(exc, Unreachable)
        if found is None:
            raise
        if as_json:
            click.echo(json.dumps({"mode": "local" if spec.through is None else "through",
                                   "url": spec.through, "ok": False, "verdict": "unreachable",
                                   "error": found.message, "hint": found.hint,
                                   "exit_code": EXIT_UNREACHABLE}))
        else:
            click.echo(f"error: {found.message}" + (f"\n  check: {found.hint}" if found.hint
                                                      else ""), err=True)
        return EXIT_UNREACHABLE
    after = probe(client) if spec.through is not None and before["reachable"] else None
    report = build_report(spec, outcome, log, before, after)
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)
    return int(report["exit_code"])
