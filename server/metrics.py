"""Prometheus metrics for one server, served as text at ``GET /metrics``.

Each :class:`ServerMetrics` owns its own ``CollectorRegistry`` (never the
global one), so several servers can run in one process — the tests do.
Counters of requests decided are prometheus-client objects incremented
right there; numbers the server already keeps (sessions, open streams, bytes
on each link, :class:`~carapace.server.stats.Stats`, SSE events forwarded and
their latency histogram, kept as plain integers per batch of events) are read
when scraped, so the hot path pays next to nothing for them. Frames by
direction and type are counted by a frame observer installed when the debug
listener starts.

The ``tool`` label of requests only takes the names the policy knows; any
other name an agent sends is counted as ``(unknown)``, so a hostile VM
cannot grow the label set without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from carapace.protocol.messages import PROTOCOL_VERSION, Message

from .approvals import OUTCOMES
from .policy.mcp import CALL_METHODS
from .sandbox import SANDBOX_MODES

if TYPE_CHECKING:
    from .session import AgentSession
    from .shares import FairShares
    from .view import OperatorView

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

UNKNOWN_TOOL = "(unknown)"

# Event latency inside the server is normally tens of microseconds; the upper
# buckets catch a stream held back by a reader that returns no credit.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

APPROVAL_WAIT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""A person answers in seconds to minutes; the default approval timeout is 120 s."""


AUDIT_COUNTERS = (
    ("carapace_audit_records_truncated",
     "Audit records with a field cut to the size caps (--audit-max-record-bytes).",
     "records_truncated"),
    ("carapace_audit_denials_suppressed",
     "Deny records counted in a denials_suppressed record instead of written "
     "(--audit-deny-limit, --audit-deny-bytes).", "denials_suppressed"),
    ("carapace_audit_denied_bytes_suppressed",
     "Bytes of the deny records counted instead of written.", "denied_bytes_suppressed"),
)
"""(metric, help, key of OperatorView.audit_counts()) of the audit trail's own limits."""


class ServerMetrics:
    def __init__(self, server: OperatorView) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "carapace_requests", "Requests decided by the policy.",
            ["kind", "decision", "agent", "tool"], registry=reg,
        )
        self.denials = Counter(
            "carapace_denials", "Requests denied by the policy.",
            ["kind", "agent", "tool"], registry=reg,
        )
        self.parse_limits = Counter(
            "carapace_parse_limit_refusals",
            "Requests refused before they were parsed, by the parse limit they broke "
            "(max_jsonrpc_body_bytes, max_jsonrpc_batch, max_argv, ...).",
            ["limit"], registry=reg,
        )
        self.refusals = Counter(
            "carapace_share_refusals", "Requests refused at a fair-share cap (shares.py): "
            "limit is cli_processes, upstream_connections or sse_streams, scope agent (its "
            "own cap, 429) or host (all agents together, 503).",
            ["limit", "scope", "agent"], registry=reg,
        )
        self.revoked = Counter(
            "carapace_requests_revoked",
            "Open requests ended by a reload whose policy denies them (kind: http or cli).",
            ["kind"], registry=reg,
        )
        self._request_counters: dict[tuple[str, bool, str, str], Any] = {}
        """(kind, allowed, agent, tool label) → its child of ``requests``; bounded by
        the authenticated agents times the policy's tools (others are one label)."""
        self.event_latency = LatencyHistogram(LATENCY_BUCKETS)
        """``carapace_event_latency_seconds``, exported by the live collector."""
        self.events_forwarded = 0
        """``carapace_sse_events_total``."""
        self.frames: dict[tuple[str, str], int] = {}
        """(direction, frame type) → count, from the frame observer."""
        self.sniff_dropped = 0
        """Sniff records dropped because a subscriber read too slowly (set by the listener)."""
        self.sniff_subscribers = 0
        self._links: dict[int, tuple[Any, Any]] = {}
        """id(reader) → (FrameReader, FrameWriter) of links seen, until folded."""
        self._closed_bytes = {"in": 0, "out": 0}
        self._attached = False
        self.secret_ref_failures = Counter(
            "carapace_secret_ref_failures",
            "Secret references that gave no usable value at a reload (which was rejected).",
            ["kind"], registry=reg,
        )
        reg.register(_LiveCollector(self))
        reg.register(_SandboxCollector(server))
        self.approvals = Counter(
            "carapace_approvals",
            "Calls that needed a person's approval, by how it ended (approved, denied, "
            "timeout, withdrawn, shutdown, remembered, refused: over --max-pending-approvals).",
            ["outcome"], registry=reg,
        )
        self.approval_wait = Histogram(
            "carapace_approval_wait_seconds",
            "How long calls waited for a person's approval (remembered ones wait 0 s).",
            buckets=APPROVAL_WAIT_BUCKETS, registry=reg,
        )
        for outcome in OUTCOMES:  # every outcome is exported from the start, at 0
            self.approvals.labels(outcome)
        self.mcp_calls = Counter(
            "carapace_mcp_calls", "MCP calls judged in MCP sessions, by tool, method and "
            "outcome (answered, error, denied, timed_out, cancelled, unanswered).",
            ["tool", "method", "outcome"], registry=reg,
        )
        self.mcp_result_bytes = Counter(
            "carapace_mcp_result_bytes", "Bytes of the host MCP servers' answers to calls.",
            ["tool"], registry=reg,
        )
        self.mcp_refused = Counter(
            "carapace_mcp_sessions_refused", "MCP sessions Carapace ended: a client message "
            "that is not JSON-RPC, a message over --mcp-max-message-bytes, too many pending "
            "requests.", ["tool", "reason"], registry=reg,
        )

    # -- called where things happen -------------------------------------------------
    def count_request(self, kind: str, allowed: bool, agent: str, tool: str) -> None:
        """One request decided (``kind``: ``http`` or ``cli``)."""
        tools = self.server.policy.tools
        label = tool if tool in tools else UNKNOWN_TOOL
        key = (kind, allowed, agent, label)
        counter = self._request_counters.get(key)
        if counter is None:  # labels() costs a lock and a dict of tuples per call
            counter = self.requests.labels(kind, "allow" if allowed else "deny", agent, label)
            self._request_counters[key] = counter
        counter.inc()
        if not allowed:
            self.denials.labels(kind, agent, label).inc()

    def count_approval(self, outcome: str, waited: float | None) -> None:
        """One approval ended (``outcome`` from a fixed set); ``waited`` None: never opened."""
        self.approvals.labels(outcome).inc()
        if waited is not None:
            self.approval_wait.observe(waited)

    def count_mcp_call(self, tool: str, method: str, outcome: str, result_bytes: int) -> None:
        """One MCP call (``tool`` is a policy tool with a running session: bounded;
        ``method`` one the filter judges, others as ``other``)."""
        label = method if method in CALL_METHODS else "other"
        self.mcp_calls.labels(tool, label, outcome).inc()
        if result_bytes:
            self.mcp_result_bytes.labels(tool).inc(result_bytes)

    def count_mcp_refused(self, tool: str, reason: str) -> None:
        self.mcp_refused.labels(tool, reason).inc()

    def count_parse_limit(self, limit: str) -> None:
        """One request refused by a parse limit (``policy/limits.py``; a fixed label set)."""
        self.parse_limits.labels(limit).inc()

    def count_refusal(self, limit: str, scope: str, agent: str) -> None:
        """A request refused at a fair-share cap (agents are authenticated: a bounded label)."""
        self.refusals.labels(limit, scope, agent).inc()

    def watch_shares(self, shares: FairShares) -> None:
        """Export what all agents hold now of each fair share, and its host-wide cap."""
        self.registry.register(_SharesCollector(shares))

    def count_revoked(self, kind: str) -> None:
        """One open request ended by a reload (``revocation.py``; kind: http or cli)."""
        self.revoked.labels(kind).inc()

    def count_events(self, count: int, arrived: float | None) -> None:
        """``count`` SSE events queued on the link, their bytes read at trio time ``arrived``.

        Each request's stream is given this at construction (``on_events``).
        """
        self.events_forwarded += count
        if arrived is not None:
            self.event_latency.observe(max(0.0, trio.current_time() - arrived), count)

    # -- frame observer ---------------------------------------------------------------
    def attach(self) -> None:
        """Start counting frames (once; the debug listener calls this)."""
        if not self._attached:
            self._attached = True
            self.server.frame_observers.append(self.observe)

    def observe(self, session: AgentSession, direction: str, msg: Message) -> None:
        key = (direction, msg.TYPE)
        self.frames[key] = self.frames.get(key, 0) + 1
        reader = session.reader
        if reader is not None and id(reader) not in self._links:
            self._links[id(reader)] = (reader, session.writer)
            if len(self._links) > len(self.server.sessions) + 32:
                self._fold_closed()

    def _current_links(self) -> dict[int, tuple[Any, Any]]:
        return {id(s.reader): (s.reader, s.writer) for s in self.server.sessions.values()
                if s.reader is not None}

    def _fold_closed(self) -> None:
        """Move the final counts of links no session uses any more into the closed totals.

        A session keeps its requests across reconnects, but each link has its own
        reader and writer (and counters); the ones seen here are kept until folded.
        """
        current = self._current_links()
        for key in [k for k in self._links if k not in current]:
            reader, writer = self._links.pop(key)
            self._closed_bytes["in"] += reader.bytes_received
            self._closed_bytes["out"] += writer.bytes_sent if writer is not None else 0

    def link_bytes(self) -> dict[str, int]:
        """Bytes received from and sent to agents on authenticated links since the start."""
        self._fold_closed()
        links = {**self._links, **self._current_links()}
        return {
            "in": self._closed_bytes["in"] + sum(r.bytes_received for r, _ in links.values()),
            "out": self._closed_bytes["out"]
            + sum(w.bytes_sent for _, w in links.values() if w is not None),
        }

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        data: bytes = generate_latest(self.registry)
        return data


class LatencyHistogram:
    """A histogram kept as plain numbers: one bisect per batch of equal observations.

    prometheus-client's Histogram takes one observation per call; the events
    of one upstream read arrive and leave together, so they are counted
    together here and exported by the live collector.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class _LiveCollector(Collector):
    """Values read from the server when scraped."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The names this collector exports (so registering it does not collect)."""
        for name in ("carapace_build_info", "carapace_start_time_seconds",
                     "carapace_agents_connected", "carapace_inflight_streams",
                     "carapace_sniff_subscribers"):
            yield GaugeMetricFamily(name, "")
        for name in ("carapace_frames", "carapace_frame_bytes", "carapace_connections",
                     "carapace_handshake_failures", "carapace_protocol_errors",
                     "carapace_errors", "carapace_sniff_dropped"):
            yield CounterMetricFamily(name, "")
        yield CounterMetricFamily("carapace_sse_events", "")
        yield HistogramMetricFamily("carapace_event_latency_seconds", "")
        for name, _doc, _key in AUDIT_COUNTERS:
            yield CounterMetricFamily(name, "")
        for name in ("carapace_limit_hits", "carapace_unauthenticated_refused"):
            yield CounterMetricFamily(name, "")
        for name in ("carapace_unauthenticated_connections", "carapace_agent_memory_bytes"):
            yield GaugeMetricFamily(name, "")
        yield CounterMetricFamily("carapace_transport_connections", "", labels=["transport"])

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        server = m.server
        stats = server.stats
        info = GaugeMetricFamily(
            "carapace_build_info", "Server version and wire protocol version.",
            labels=["version", "protocol"],
        )
        info.add_metric([server.version, str(PROTOCOL_VERSION)], 1)
        yield info
        yield GaugeMetricFamily(
            "carapace_start_time_seconds", "When the server started (Unix time).",
            value=stats.started,
        )
        yield GaugeMetricFamily(
            "carapace_agents_connected", "Agents with an authenticated link.",
            value=len(server.sessions),
        )
        inflight = GaugeMetricFamily(
            "carapace_inflight_streams", "Requests in flight, per agent.", labels=["agent"],
        )
        for name, session in sorted(server.sessions.items()):
            inflight.add_metric([name], len(session.streams))
        yield inflight
        frames = CounterMetricFamily(
            "carapace_frames", "Frames on agent links after the handshake.",
            labels=["direction", "type"],
        )
        for (direction, kind), count in sorted(m.frames.items()):
            frames.add_metric([direction, kind], count)
        yield frames
        link_bytes = CounterMetricFamily(
            "carapace_frame_bytes", "Bytes on authenticated agent links (in: from agents).",
            labels=["direction"],
        )
        for direction, count in m.link_bytes().items():
            link_bytes.add_metric([direction], count)
        yield link_bytes
        for name, doc, value in (
            ("carapace_connections", "Connections accepted from agents (every transport).",
             stats.connections),
            ("carapace_handshake_failures", "Agent handshakes that failed.",
             stats.handshake_failures),
            ("carapace_protocol_errors", "Agent links closed for breaking the protocol.",
             stats.protocol_errors),
            ("carapace_errors", "Requests that failed with an internal error.", stats.errors),
            ("carapace_sniff_dropped", "Sniff feed records dropped for slow subscribers.",
             m.sniff_dropped),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "carapace_sniff_subscribers", "Clients reading the sniff feed.",
            value=m.sniff_subscribers,
        )
        yield CounterMetricFamily("carapace_sse_events", "SSE events forwarded to agents.",
                                  value=m.events_forwarded)
        yield m.event_latency.family(
            "carapace_event_latency_seconds",
            "Time from an SSE event's last byte arriving from the upstream to its frame "
            "being queued on the agent link (includes waiting for the stream's credit; "
            "the events of one upstream read are queued together).",
        )
        counts = server.audit_counts()
        for name, doc, key in AUDIT_COUNTERS:
            yield CounterMetricFamily(name, doc, value=counts.get(key, 0))
        by_transport = CounterMetricFamily(
            "carapace_transport_connections",
            "Connections accepted from agents, by transport (tcp, unix, vsock).",
            labels=["transport"],
        )
        for transport, count in sorted(stats.transports.items()):
            by_transport.add_metric([transport], count)
        yield by_transport
        yield from _bounds_families(server)


class _SandboxCollector(Collector):
    """``carapace_sandbox_mode{mode}``: 1 for the confinement in force, 0 for the others,
    so an alert on ``carapace_sandbox_mode{mode="none"} == 1`` finds unconfined hosts."""

    def __init__(self, server: OperatorView) -> None:
        self.server = server

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("carapace_sandbox_mode", "")

    def collect(self) -> Iterator[Metric]:
        mode = GaugeMetricFamily(
            "carapace_sandbox_mode",
            "How CLI tools are confined on the host: bwrap, or none (unconfined).",
            labels=["mode"])
        current = self.server.sandbox_status.mode
        for name in SANDBOX_MODES:
            mode.add_metric([name], 1 if name == current else 0)
        yield mode


def _bounds_families(server: OperatorView) -> Iterator[Metric]:
    """What the server's memory and connection bounds hold now, and how often they hit."""
    stats = server.stats
    hits = CounterMetricFamily(
        "carapace_limit_hits", "Limits hit, by the name of their audit limit record.",
        labels=["limit"])
    for name, count in sorted(stats.limit_hits.items()):
        hits.add_metric([name], count)
    yield hits
    refused = CounterMetricFamily(
        "carapace_unauthenticated_refused",
        "Connections closed before their handshake: over a cap (total, per_address), "
        "handshake_frame, handshake_timeout, handshake_error.", labels=["reason"])
    for reason, count in sorted(stats.unauthenticated_refused.items()):
        refused.add_metric([reason], count)
    yield refused
    yield GaugeMetricFamily(
        "carapace_unauthenticated_connections", "Connections in their handshake now.",
        value=server.admission.open)
    memory = GaugeMetricFamily(
        "carapace_agent_memory_bytes", "What each agent makes the server hold now (stream "
        "inboxes, replay buffer, link queue), against --agent-memory-limit.", labels=["agent"])
    for name, session in sorted(server.sessions.items()):
        memory.add_metric([name], session.memory.used)
    yield memory


class _SharesCollector(Collector):
    """Fair shares in use and their host-wide caps, read when scraped."""

    def __init__(self, shares: FairShares) -> None:
        self.shares = shares

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("carapace_shares_in_use", "")
        yield GaugeMetricFamily("carapace_shares_cap", "")

    def collect(self) -> Iterator[Metric]:
        from .shares import LIMITS

        used = GaugeMetricFamily(
            "carapace_shares_in_use", "CLI processes running, upstream connections in use "
            "(all tools) and event streams open, all agents together.", labels=["limit"])
        caps = GaugeMetricFamily(
            "carapace_shares_cap", "Host-wide cap of each fair share (0: none; upstream "
            "connections: per tool).", labels=["limit"])
        for limit in LIMITS:
            used.add_metric([limit], self.shares.in_use(limit))
            caps.add_metric([limit], self.shares.caps.cap(limit, "host"))
        yield used
        yield caps
