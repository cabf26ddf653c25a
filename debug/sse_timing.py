"""Timing a Server-Sent Events stream: each event with its arrival time, and the verdict.

:func:`collect` reads an SSE URL and records when each event arrived and what it says
about itself (its ``ts`` and ``seq``); :func:`analyse` turns that into latency, rate,
gaps and bursts, and a verdict. ``sse-test measure`` and the plain ``sse-test`` run
(:mod:`.sse_run`) both use them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .client import EXIT_FAILED, EXIT_OK, Unreachable

if TYPE_CHECKING:
    import httpx

# --------------------------------------------------------------------------- analysis


@dataclass
class Sample:
    """One received event: when it arrived and what it said about itself."""

    arrival: float  # time.time() when the chunk that completed it was read
    id: str | None = None
    event: str | None = None
    ts: float | None = None  # the event's own "ts" (time.time() at the sender), if any
    seq: int | None = None


@dataclass
class Collection:
    """What one run of the consumer saw."""

    url: str
    requested: int  # 0: until the stream ends or the timeout
    started: float  # time.time() just before connecting
    status: int | None = None
    content_type: str | None = None
    samples: list[Sample] = field(default_factory=list)
    comments: int = 0
    ended: str = "count"  # count | stream-end | timeout | error
    stream_error: str | None = None


def sample_from_event(
    arrival: float, event: str | None, id: str | None, data: str | None
) -> Sample:
    """A Sample, with ``ts``/``seq`` taken from the data if it is a JSON object carrying them."""
    ts: float | None = None
    seq: int | None = None
    if data:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            raw_ts = obj.get("ts")
            if isinstance(raw_ts, int | float) and not isinstance(raw_ts, bool):
                if math.isfinite(raw_ts):
                    ts = float(raw_ts)
            raw_seq = obj.get("seq")
            if isinstance(raw_seq, int) and not isinstance(raw_seq, bool):
                seq = raw_seq
    return Sample(arrival=arrival, id=id, event=event, ts=ts, seq=seq)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _sequence_problems(field_name: str, values: list[int | None]) -> list[dict[str, Any]]:
    """Missing and out-of-order numbers in an id or seq sequence (first one sets the start)."""
    problems: list[dict[str, Any]] = []
    prev: int | None = None
    for value in values:
        if value is None:
            continue
        if prev is not None:
            if value > prev + 1:
                problems.append(
                    {"field": field_name, "kind": "missing", "after": prev, "got": value,
                     "missing": value - prev - 1}
                )
            elif value <= prev:
                problems.append(
                    {"field": field_name, "kind": "out_of_order", "after": prev, "got": value}
                )
        if prev is None or value > prev:
            prev = value
    return problems


def _numeric_id(sample: Sample) -> int | None:
    if sample.id is None:
        return None
    try:
        return int(sample.id)
    except ValueError:
        return None


def analyse(
    col: Collection, *, max_p99_ms: float = 250.0, burst_ms: float = 50.0
) -> dict[str, Any]:
    """Turn a Collection into the report (a JSON-able dict with ``exit_code``).

    Buffering is flagged when p99 latency exceeds ``max_p99_ms`` (0 disables
    that test), or when at least two events arrived "compressed": closer to
    the previous event than their timestamps say by more than ``burst_ms``
    (and by more than half) — events held back and then released together.
    The burst test compares differences only, so it needs no clock sync.
    """
    samples = col.samples
    timed = [s for s in samples if s.ts is not None]
    latencies = sorted((s.arrival - s.ts) * 1000.0 for s in timed if s.ts is not None)
    report = _timing(col, timed, latencies)
    report["gaps"] = _gaps(samples)

    compressed_after, bursts = _bursts(timed, burst_ms)
    reasons: list[str] = []
    if len(compressed_after) >= 2:
        reasons.append(
            f"{len(compressed_after)} events arrived together with an earlier one although "
            f"they were generated more than {burst_ms:g} ms apart "
            f"({len(bursts)} burst(s), largest {max(bursts)} events)"
        )
    if max_p99_ms > 0 and latencies and report["p99_ms"] > max_p99_ms:
        reasons.append(f"p99 latency {report['p99_ms']:.1f} ms is above {max_p99_ms:g} ms")
    buffered = bool(reasons)
    report["buffered"] = buffered
    report["bursts"] = {"count": len(bursts), "largest": max(bursts, default=0),
                        "compressed_events": len(compressed_after)}
    report["buffering_reasons"] = reasons

    problems = reasons + _delivery_problems(col, report["gaps"])
    short = col.requested > 0 and len(samples) < col.requested
    report["problems"] = problems
    report["notes"] = _notes(report, latencies, samples)

    if buffered:
        verdict = "buffered"
    elif short:
        verdict = "incomplete"
    elif problems:
        verdict = "gaps"
    else:
        verdict = "real-time"
    report["verdict"] = verdict
    report["ok"] = not problems
    report["exit_code"] = EXIT_OK if not problems else EXIT_FAILED
    return report


def _timing(col: Collection, timed: list[Sample], latencies: list[float]) -> dict[str, Any]:
    """The report's head: what was asked and seen, latency percentiles, duration and rate."""
    samples = col.samples
    report: dict[str, Any] = {
        "url": col.url,
        "status": col.status,
        "content_type": col.content_type,
        "requested": col.requested,
        "events": len(samples),
        "timed": len(timed),
        "untimed": len(samples) - len(timed),
        "comments": col.comments,
        "ended": col.ended,
        "stream_error": col.stream_error,
        "p50_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "min_ms": None,
        "mean_ms": None,
        "first_event_ms": None,
        "duration_s": None,
        "rate_per_s": None,
    }
    if latencies:
        report.update(
            p50_ms=round(percentile(latencies, 50), 3),
            p99_ms=round(percentile(latencies, 99), 3),
            max_ms=round(latencies[-1], 3),
            min_ms=round(latencies[0], 3),
            mean_ms=round(sum(latencies) / len(latencies), 3),
        )
    if samples:
        report["first_event_ms"] = round((samples[0].arrival - col.started) * 1000.0, 3)
        span = samples[-1].arrival - samples[0].arrival
        report["duration_s"] = round(samples[-1].arrival - col.started, 3)
        if len(samples) >= 2 and span > 0:
            report["rate_per_s"] = round((len(samples) - 1) / span, 3)
    return report


def _gaps(samples: list[Sample]) -> dict[str, Any]:
    """Gaps: ids (when numeric) and seq numbers must each count up by one."""
    details = _sequence_problems("id", [_numeric_id(s) for s in samples])
    details += _sequence_problems("seq", [s.seq for s in samples])
    return {
        "missing_ids": sum(g.get("missing", 0) for g in details if g["field"] == "id"),
        "missing_seq": sum(g.get("missing", 0) for g in details if g["field"] == "seq"),
        "out_of_order": sum(1 for g in details if g["kind"] == "out_of_order"),
        "details": details[:50],
    }


def _bursts(timed: list[Sample], burst_ms: float) -> tuple[list[int], list[int]]:
    """Runs of compressed inter-arrival gaps: the index (in ``timed``) of the later event
    of each compressed pair, and the size in events of each run."""
    compressed_after: list[int] = []
    for i in range(1, len(timed)):
        a, b = timed[i - 1], timed[i]
        assert a.ts is not None and b.ts is not None
        ts_gap = (b.ts - a.ts) * 1000.0
        arr_gap = (b.arrival - a.arrival) * 1000.0
        if ts_gap - arr_gap > burst_ms and arr_gap < ts_gap / 2:
            compressed_after.append(i)
    bursts: list[int] = []
    for i in compressed_after:
        if bursts and i - 1 in compressed_after:
            bursts[-1] += 1
        else:
            bursts.append(2)
    return compressed_after, bursts


def _delivery_problems(col: Collection, gaps: dict[str, Any]) -> list[str]:
    """Problems besides buffering: gaps, fewer events than asked for, a failed stream."""
    problems: list[str] = []
    if gaps["missing_ids"] or gaps["missing_seq"] or gaps["out_of_order"]:
        problems.append(
            f"gaps: {gaps['missing_ids']} missing id(s), {gaps['missing_seq']} missing seq "
            f"number(s), {gaps['out_of_order']} out of order"
        )
    if col.requested > 0 and len(col.samples) < col.requested:
        why = {
            "timeout": "the timeout expired",
            "stream-end": "the stream ended",
            "error": f"the connection failed ({col.stream_error})",
        }.get(col.ended, col.ended)
        problems.append(f"only {len(col.samples)} of {col.requested} events: {why}")
    elif col.ended == "error":
        problems.append(f"the stream failed: {col.stream_error}")
    return problems


def _notes(report: dict[str, Any], latencies: list[float], samples: list[Sample]) -> list[str]:
    """What the reader should know that is no problem of the stream's."""
    notes: list[str] = []
    if report["untimed"]:
        notes.append(
            f"{report['untimed']} event(s) had no numeric 'ts' in JSON data: counted, not timed"
        )
    if latencies and latencies[0] < -5.0:
        notes.append(
            f"negative latency ({latencies[0]:.1f} ms): the sender's clock is ahead of this "
            "host's; latencies are off by the clock offset (burst detection is not affected)"
        )
    if not samples:
        notes.append("no events received")
    return notes


# --------------------------------------------------------------------------- consuming


_CONNECT_HINT = (
    "check that the URL is right and that something listens there: the carapace-agent "
    "with --expose TOOL=PORT for that port (and its link to carapace-server), or "
    "`carapace-debug sse-test serve` when measuring the upstream directly"
)


async def collect(
    url: str,
    *,
    count: int,
    timeout: float,
    headers: Sequence[tuple[str, str]] = (),
    on_event: Callable[[int], None] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
) -> Collection:
    """Consume the SSE stream at ``url`` until ``count`` events (0: until it ends) or timeout.

    ``on_event`` hears the number of events so far, ``on_sample`` each event as it arrives.
    """
    import httpx
    import trio

    from carapace.protocol.errors import ProtocolError

    col = Collection(url=url, requested=count, started=time.time())
    req_headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    req_headers.update(dict(headers))
    limits = httpx.Timeout(connect=min(10.0, timeout), read=None, write=10.0, pool=10.0)
    got_head = False
    # trust_env=False: an http_proxy in the environment would measure the proxy instead.
    async with httpx.AsyncClient(timeout=limits, trust_env=False) as client:
        with trio.move_on_after(timeout) as scope:
            try:
                col.started = time.time()
                async with client.stream("GET", url, headers=req_headers) as resp:
                    got_head = True
                    await _check_head(col, resp)
                    col.ended = await _read_events(col, resp, count, on_event, on_sample)
                    if col.ended == "count":
                        return col
            except Unreachable:
                raise
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise Unreachable(
                    f"bad URL {url!r}: {exc}", "give a full http:// URL, e.g. "
                    "http://127.0.0.1:8099/events"
                ) from exc
            except (httpx.HTTPError, ProtocolError, OSError) as exc:
                if not got_head:
                    raise Unreachable(
                        f"cannot connect to {url}: {type(exc).__name__}: {exc}".rstrip(": "),
                        _CONNECT_HINT,
                    ) from exc
                col.ended = "error"
                col.stream_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if scope.cancelled_caught:
            if not got_head:
                raise Unreachable(
                    f"no response from {url} within {timeout:g} s",
                    "the endpoint accepted the connection but never answered: check the "
                    "upstream behind it, or raise --timeout",
                )
            col.ended = "timeout"
    return col


async def _check_head(col: Collection, resp: httpx.Response) -> None:
    """Note the answer's status and type; Unreachable unless it is a 200 event stream."""
    url = col.url
    col.status = resp.status_code
    col.content_type = resp.headers.get("content-type")
    if resp.status_code != 200:
        body = (await resp.aread())[:300].decode("utf-8", "replace").strip()
        raise Unreachable(
            f"{url} answered HTTP {resp.status_code}" + (f": {body}" if body else ""),
            "check the path and query; behind the tunnel a 403 means the "
            "policy denied the call (see `carapace-debug audit`)",
        )
    mime = (col.content_type or "").split(";")[0].strip().lower()
    if mime != "text/event-stream":
        raise Unreachable(
            f"{url} answered Content-Type {col.content_type or '(none)'}, "
            "not text/event-stream",
            "this is not an SSE endpoint; Carapace streams a response as "
            "events only when the upstream says text/event-stream",
        )


async def _read_events(
    col: Collection,
    resp: httpx.Response,
    count: int,
    on_event: Callable[[int], None] | None,
    on_sample: Callable[[Sample], None] | None,
) -> str:
    """Parse the stream into ``col`` until ``count`` events (0: no limit) or its end;
    return why it stopped (``count`` or ``stream-end``)."""
    from carapace.protocol.sse import Comment, SseParser

    parser = SseParser()
    async for chunk in resp.aiter_bytes():
        arrival = time.time()
        for item in parser.feed(chunk):
            if isinstance(item, Comment):
                col.comments += 1
                continue
            sample = sample_from_event(arrival, item.event, item.id, item.data)
            col.samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
            if on_event is not None:
                on_event(len(col.samples))
            if count and len(col.samples) >= count:
                return "count"
    return "stream-end"
