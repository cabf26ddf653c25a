"""What the many-agents load generator records: each agent's state, the latencies, the summary.

Split from :mod:`benchmarks.swarm` (which plays the agents). An event's
latency is taken at two moments: when its bytes reached the generator's
socket (the kernel's receive timestamp, ``SO_TIMESTAMPNS``) and when the
generator read them; the first is what the tunnel delivered.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from .client import READ
from .stats import pct


@dataclass
class Stats:
    """What every agent saw, shared by all of them."""

    recording: bool = False
    go: trio.Event = field(default_factory=trio.Event)
    mark: float | None = None
    events: list[float] = field(default_factory=list)  # ms, while recording
    events_by_kind: dict[str, list[float]] = field(default_factory=lambda: {
        "raw": [], "sample": [], "direct": []})
    events_read: list[float] = field(default_factory=list)
    """The same events, measured to when this process read them (its own delays in)."""
    per_agent_p99: list[float] = field(default_factory=list)
    rpcs: dict[str, list[float]] = field(default_factory=lambda: {
        "raw": [], "sample": [], "direct": []})
    rpc_errors: Counter[str] = field(default_factory=Counter)
    stream_errors: Counter[str] = field(default_factory=Counter)
    connect_failures: Counter[str] = field(default_factory=Counter)  # reason, after the mark
    connect_failures_before: Counter[str] = field(default_factory=Counter)
    handshakes: int = 0
    storm_handshakes: list[float] = field(default_factory=list)  # ms, dial to welcome
    measure_from: float = 0.0  # time.time() when recording started
    quiet: set[int] = field(default_factory=set)  # seconds when the machine was not saturated
    timeline: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """(kind, whole seconds since recording started): latencies (ms); where stalls are."""


@dataclass
class Agent:
    """One agent's state across its sessions."""

    name: str
    kind: str  # "raw", "sample", or "direct" (the reference: the upstream, no Carapace)
    sessions: int = 0
    flowing: bool = False  # its current stream has delivered an event
    back_at: float | None = None  # monotonic time of its first event after the mark
    latencies: list[float] = field(default_factory=list)
    source: str | None = None  # the loopback address it dials from (None: the default)


SO_TIMESTAMPNS = 35
"""Linux: stamp each received packet with the kernel's clock (``time.time()``'s clock)."""


TIMESPEC = struct.Struct("qq")


ANCILLARY = socket.CMSG_SPACE(TIMESPEC.size)


Arrival = tuple[float, float]
"""When an event reached this process's socket (the kernel's receive timestamp), and when
this process read it. The first is what the tunnel delivered; the second adds this one
process's own scheduling delays, serving 500 agents on a shared machine."""


def stamp_arrivals(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


async def receive_stamped(sock: trio.socket.SocketType) -> tuple[bytes, float, float]:
    """Bytes from ``sock``, when the first of them reached it, and when they were read.

    Only the first packet's timestamp comes with a read; the bytes of later packets in
    the same read are given the read's time (an upper bound: never flattering)."""
    data, ancillary, _, _ = await sock.recvmsg(READ, socket.CMSG_SPACE(TIMESPEC.size))
    read_at = time.time()
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = TIMESPEC.unpack(value[:TIMESPEC.size])
            return data, min(read_at, sec + nsec / 1e9), read_at
    return data, read_at, read_at


def event_ts(data: str | None) -> float | None:
    if not data:
        return None
    try:
        return float(json.loads(data)["ts"])
    except (ValueError, KeyError, TypeError):
        return None


def on_events(agent: Agent, stats: Stats, stamps: list[float], arrival: Arrival,
              started: float | None) -> None:
    """Record the latency of events stamped ``stamps`` that arrived at ``arrival``."""
    if not stamps:
        return
    if not agent.flowing:
        agent.flowing = True
        if stats.mark is not None and agent.back_at is None and started is not None \
                and started > stats.mark:
            agent.back_at = time.monotonic()
    if stats.recording:
        at, read_at = arrival
        second = int(at - stats.measure_from)
        bucket = stats.timeline.setdefault((agent.kind, second), [])
        for ts in stamps:
            ms = (at - ts) * 1000.0
            bucket.append(ms)
            stats.events_by_kind[agent.kind].append(ms)
            if agent.kind != "direct":
                stats.events.append(ms)
                stats.events_read.append((read_at - ts) * 1000.0)
                agent.latencies.append(ms)



def summary(agents: list[Agent], stats: Stats) -> dict[str, Any]:
    def dist(values: list[float]) -> dict[str, Any]:
        return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
                "max": max(values, default=None)}

    per_agent = [p for a in agents if (p := pct(a.latencies, 0.99)) is not None]
    back = [a.back_at - stats.mark for a in agents
            if a.back_at is not None and stats.mark is not None]
    return {
        "events": dist(stats.events),
        "events_read": dist(stats.events_read),
        "events_raw": dist(stats.events_by_kind["raw"]),
        "events_sample": dist(stats.events_by_kind["sample"]),
        "events_direct": dist(stats.events_by_kind["direct"]),
        "rpc_direct": dist(stats.rpcs["direct"]),
        "agents_with_events": sum(1 for a in agents if a.latencies),
        "per_agent_p99": dist(per_agent),
        "rpc_raw": dist(stats.rpcs["raw"]), "rpc_sample": dist(stats.rpcs["sample"]),
        "rpc_errors": dict(stats.rpc_errors.most_common(5)),
        "rpc_failed": sum(stats.rpc_errors.values()),
        "stream_errors": dict(stats.stream_errors.most_common(5)),
        "back_seconds": dist(back), "back": len(back), "agents": len(agents),
        "not_back": [a.name for a in agents if a.back_at is None][:10],
        "connect_failures_storm": dict(stats.connect_failures.most_common(6)),
        "connect_failures_start": dict(stats.connect_failures_before.most_common(6)),
        "handshakes": stats.handshakes,
        "storm_handshake_ms": dist(stats.storm_handshakes),
        "gc": GC.summary(),
        "events_quiet": dist([ms for (kind, second), v in stats.timeline.items()
                              if kind != "direct" and second in stats.quiet for ms in v]),
        "events_direct_quiet": dist([ms for (kind, second), v in stats.timeline.items()
                                     if kind == "direct" and second in stats.quiet
                                     for ms in v]),
        "quiet_seconds": len(stats.quiet),
        "timeline": {f"{kind} {second}": [len(v), pct(v, 0.5), pct(v, 0.99), max(v)]
                     for (kind, second), v in sorted(stats.timeline.items())},
    }


class GcPauses:
    """How long the cyclic collector held this process, per generation (a pause here
    delays every agent's reads, so it shows up as latency that is not the server's)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.count: Counter[int] = Counter()
        self.total: dict[int, float] = {}
        self.worst: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        gen = info["generation"]
        self.count[gen] += 1
        self.total[gen] = self.total.get(gen, 0.0) + ms
        self.worst[gen] = max(self.worst.get(gen, 0.0), ms)

    def summary(self) -> dict[str, Any]:
        return {f"gen{g}": {"n": self.count[g], "total_ms": round(self.total[g], 1),
                            "max_ms": round(self.worst[g], 1)} for g in sorted(self.count)}


GC = GcPauses()
