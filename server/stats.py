"""The server's own counters: written where things happen, read by health and /metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Real counters, read by health, connections and /metrics."""

    started: float = field(default_factory=time.time)
    connections: int = 0
    handshake_failures: int = 0
    protocol_errors: int = 0
    frames_in: int = 0
    frames_out: int = 0
    unknown_id_frames: int = 0
    errors: int = 0
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    limit_hits: dict[str, int] = field(default_factory=dict)
    """Limits hit (each also an audit ``limit`` record), by the record's ``limit`` name."""
    unauthenticated_refused: dict[str, int] = field(default_factory=dict)
    """Connections closed before their handshake: over a cap (total, per_address),
    handshake_frame (a frame over --handshake-max-frame), handshake_timeout,
    handshake_error (bytes that are no handshake)."""
    transports: dict[str, int] = field(default_factory=dict)
    """Connections accepted, by transport (tcp, unix, vsock)."""

    def count_request(self, kind: str, decision: str) -> None:
        key = (kind, decision)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_transport(self, transport: str) -> None:
        self.transports[transport] = self.transports.get(transport, 0) + 1
