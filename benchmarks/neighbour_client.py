"""Agent B's side of the noisy-neighbour scenario: what a well-behaved user sees.

Run as ``python -m benchmarks.neighbour_client SPEC_JSON`` (``port``: agent B's
exposed tool; ``sse_interval_ms``). It holds one live SSE stream
(``/sse-forever``, numbered events stamped with the upstream's ``ts``) and makes
one JSON-RPC call every 100 ms, both through the real agent B. Interactive,
like the idle-streams client: it prints ``{"phase": "ready"}`` once both work,
then reads ``go`` (the attack starts: measuring begins) and ``stop`` (it ended)
on stdin, drains the stream for a moment and prints ``{"result": ...}``.

Measured between ``go`` and ``stop``: each event's latency (arrival − ``ts``,
same host, same clock), each call's round trip, calls that failed (any answer
but 200, a broken connection, no answer within 5 s or by the end), events
lost (due in that time by the upstream's schedule but not arrived 1.5 s after
``stop``: skipped, or held up by a stalled server) — all of B's, none of A's.
An event or call that never came enters the percentiles with a lower bound
(the end − when it was due), flagged ``*_lower_bound`` when that sets the value.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from typing import Any

import h11
import trio

from carapace.protocol.sse import Event, SseParser

from .client import READ, BenchError, connect, get_request
from .stats import pct

RPC_EVERY = 0.1
RPC_TIMEOUT = 5.0
NO_ANSWER = f"no answer within {RPC_TIMEOUT:g} s"
DRAIN = 1.5
"""Seconds the stream is still read after ``stop``, so late events count as late, not lost."""


class State:
    def __init__(self) -> None:
        self.go: float | None = None
        self.stop: float | None = None
        self.end: float | None = None
        self.events: list[tuple[int, float, float]] = []  # id, ts, arrival
        self.stream_error: str | None = None
        self.rpcs: list[tuple[float, float | None, str]] = []  # start, ms or None, error
        self.pending: set[float] = set()  # start times of calls still unanswered
        self.first_event = trio.Event()
        self.first_rpc = trio.Event()


async def stream(host: str, port: int, path: str, st: State) -> None:
    sock = await connect(host, port)
    async with sock:
        conn, req = get_request(host, port, path)
        await sock.send_all(req)
        parser = SseParser()
        while True:
            data = await sock.receive_some(READ)
            now = time.time()
            if not data:
                raise BenchError("the stream ended")
            conn.receive_data(data)
            while (ev := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(ev, h11.Response) and ev.status_code != 200:
                    raise BenchError(f"HTTP {ev.status_code} for the stream")
                if isinstance(ev, h11.Data):
                    for item in parser.feed(bytes(ev.data)):
                        if isinstance(item, Event) and item.data:
                            body = json.loads(item.data)
                            st.events.append((int(body["seq"]), float(body["ts"]), now))
                            st.first_event.set()
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    raise BenchError("the stream ended")


RPC_BODY = json.dumps({"jsonrpc": "2.0", "method": "version", "id": 1}).encode()


async def one_call(sock: trio.SocketStream, conn: h11.Connection, host: str, port: int) -> None:
    """One call on a keep-alive connection; BenchError unless it answered 200 with a result."""
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    await sock.send_all(conn.send(h11.Request(method="POST", target="/api/v1/rpc", headers=[
        ("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(RPC_BODY)))])) + conn.send(h11.Data(data=RPC_BODY))
        + conn.send(h11.EndOfMessage()))
    status, body = 0, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await sock.receive_some(65536)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                raise BenchError("connection closed")
        elif isinstance(ev, h11.Response):
            status = ev.status_code
        elif isinstance(ev, h11.Data):
            body += bytes(ev.data)
        elif isinstance(ev, h11.EndOfMessage):
            break
        elif isinstance(ev, h11.ConnectionClosed):
            raise BenchError("connection closed")
    if status != 200 or b'"result"' not in body:
        raise BenchError(f"HTTP {status}: {body[:80].decode(errors='replace')}")
    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        raise BenchError("the connection cannot be reused")


async def caller(host: str, port: int, st: State) -> None:
    """One call every ``RPC_EVERY`` on schedule (open loop: a stalled call does not
    hold back the next, each takes an idle keep-alive connection or opens one), so
    a stall shows as slow or unanswered calls, not as calls never made."""
    idle: list[tuple[trio.SocketStream, h11.Connection]] = []

    async def call() -> None:
        start = time.time()
        st.pending.add(start)
        t0 = time.perf_counter()
        error = ""
        sock: trio.SocketStream | None = None
        try:
            with trio.fail_after(RPC_TIMEOUT):
                if idle:
                    sock, conn = idle.pop()
                else:
                    sock, conn = await connect(host, port), h11.Connection(h11.CLIENT)
                await one_call(sock, conn, host, port)
            idle.append((sock, conn))
        except trio.TooSlowError:
            error = NO_ANSWER
            if sock is not None:
                sock.socket.close()
        except (BenchError, OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            error = str(exc) or type(exc).__name__
            if sock is not None:
                sock.socket.close()
        st.pending.discard(start)
        st.rpcs.append((start, None if error else (time.perf_counter() - t0) * 1000.0, error))
        if not error:
            st.first_rpc.set()

    async with trio.open_nursery() as nursery:
        due = trio.current_time()
        while True:
            nursery.start_soon(call)
            due += RPC_EVERY
            await trio.sleep_until(due)


async def commands(st: State, done: trio.Event) -> None:
    await st.first_event.wait()
    await st.first_rpc.wait()
    sys.stdout.write(json.dumps({"phase": "ready"}) + "\n")
    sys.stdout.flush()
    for want in ("go", "stop"):
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != want:
            raise BenchError(f"expected {want!r} on stdin, got {line.strip()!r}")
        if want == "go":
            st.go = time.time()
        else:
            st.stop = time.time()
    await trio.sleep(DRAIN)
    st.end = time.time()
    done.set()



def _events(st: State, interval_s: float) -> dict[str, Any]:
    """Latency of the events due between ``go`` and ``stop``; one that never came
    counts with a lower bound (the end of the drain − when it was due) and as lost."""
    assert st.go is not None and st.stop is not None and st.end is not None
    got = {i: (ts, at) for i, ts, at in st.events}
    latencies = {i: (at - ts) * 1000.0 for i, (ts, at) in got.items() if st.go <= ts <= st.stop}
    missing: dict[int, float] = {}
    if got:  # the upstream's schedule, from the first event: id k is due at ts0 + (k − i0)·T
        i0 = min(got)
        ts0 = got[i0][0]
        first = max(i0, i0 + math.ceil((st.go - ts0) / interval_s))
        last = i0 + math.floor((st.stop - ts0) / interval_s)
        for k in range(first, last + 1):
            if k not in got:
                missing[k] = (st.end - (ts0 + (k - i0) * interval_s)) * 1000.0
    else:
        due = int((st.stop - st.go) / interval_s)
        missing = {k: (st.end - st.go - k * interval_s) * 1000.0 for k in range(due)}
    values = [*latencies.values(), *missing.values()]
    bound = set(missing.values())
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    ids = sorted(got)
    return {
        "events": len(latencies), "events_lost": len(missing),
        "events_skipped": sum(b - a - 1 for a, b in itertools.pairwise(ids) if b > a + 1),
        "event_p50_ms": p50, "event_p99_ms": p99,
        "event_p50_lower_bound": p50 in bound, "event_p99_lower_bound": p99 in bound,
        "event_max_ms": max(values, default=None), "stream_error": st.stream_error,
    }


def _calls(st: State) -> dict[str, Any]:
    """Round trips of the calls started between ``go`` and ``stop``; one unanswered
    (at the end, or within ``RPC_TIMEOUT``) counts with a lower bound and as failed."""
    assert st.go is not None and st.stop is not None and st.end is not None
    calls = [(ms, err) for start, ms, err in st.rpcs if st.go <= start <= st.stop]
    pending = [start for start in st.pending if st.go <= start <= st.stop]
    unanswered = [(st.end - start) * 1000.0 for start in pending]
    unanswered += [RPC_TIMEOUT * 1000.0 for ms, err in calls if err == NO_ANSWER]
    ok = [ms for ms, _ in calls if ms is not None]
    errors = [err for ms, err in calls if ms is None and err != NO_ANSWER]
    values = ok + unanswered
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    return {
        "rpcs": len(calls) + len(pending), "rpcs_failed": len(errors) + len(unanswered),
        "rpcs_unanswered": len(unanswered), "rpc_errors": sorted(set(errors))[:3],
        "rpc_p50_ms": p50, "rpc_p99_ms": p99, "rpc_p99_lower_bound": p99 in set(unanswered),
        "rpc_max_ms": max(values, default=None),
    }


def summarise(st: State, interval_s: float) -> dict[str, Any]:
    return {**_events(st, interval_s), **_calls(st)}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = "127.0.0.1", int(spec["port"])
    interval = float(spec.get("sse_interval_ms", 20))
    st = State()
    done = trio.Event()

    async def watch_stream() -> None:
        try:
            await stream(host, port, f"/sse-forever?interval_ms={interval:g}&size=200", st)
        except (BenchError, OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            st.stream_error = str(exc) or type(exc).__name__
            st.first_event.set()  # do not hang the harness; the error is reported

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_stream)
        nursery.start_soon(caller, host, port, st)
        nursery.start_soon(commands, st, done)
        await done.wait()
        nursery.cancel_scope.cancel()
    return summarise(st, interval / 1000.0)


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = trio.run(run, spec)
    except Exception as exc:
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        sys.exit(1)
    sys.stdout.write(json.dumps({"result": result}) + "\n")


if __name__ == "__main__":
    main()
