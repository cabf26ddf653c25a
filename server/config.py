"""The server's configuration, parsed once at the edge (``main.py``) into one typed object.

Each default is a named constant used by both the command line and the
dataclass, so ``--help`` and a server built in a test agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carapace.protocol.flow import DEFAULT_WINDOW
from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.protocol.handshake import DEFAULT_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_FRAME
from carapace.protocol.keepalive import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL
from carapace.protocol.resume import DEFAULT_REPLAY_LIMIT
from carapace.runtime.addresses import Address, TcpAddress
from carapace.runtime.unix_sockets import SOCKET_MODE

from .admission import DEFAULT_MAX_UNAUTHENTICATED, DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
from .approvals import DEFAULT_MAX_PENDING_APPROVALS
from .audit import DEFAULT_BACKUPS, DEFAULT_DENY_LIMIT, DEFAULT_MAX_BYTES
from .audit.caps import DEFAULT_MAX_RECORD_BYTES
from .audit.throttle import DEFAULT_DENY_BYTES
from .mcp.filter import DEFAULT_MAX_MESSAGE_BYTES, MAX_PENDING
from .policy import DEFAULT_LIMITS, ParseLimits
from .shares import ShareCaps

DEFAULT_LISTEN = ("127.0.0.1", 8765)
DEFAULT_POLICY_FILE = "/etc/carapace/policy.yaml"
DEFAULT_MAX_REQUESTS_PER_AGENT = 10_000
DEFAULT_MAX_AGENTS = 64
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_RESUME_GRACE = 30.0
DEFAULT_HANDSHAKE_MAX_FRAME = MAX_HANDSHAKE_FRAME
"""Largest frame accepted before ``welcome`` (protocol/handshake.py says why)."""
DEFAULT_MAX_LINK_QUEUE = DEFAULT_REPLAY_LIMIT + DEFAULT_REPLAY_LIMIT // 2
"""Bytes queued on one link for an agent that is not reading them (96 MiB). Every
numbered frame in the queue is also unacknowledged, so the replay limit already bounds
those (and a resuming agent gets all of them queued at once); the other half covers
the per-frame overhead the queue counts (64 B) and link frames — pongs, acks — that an
agent reading its socket drains at once. Only a peer that stops reading reaches it."""
DEFAULT_AGENT_MEMORY_LIMIT = 2 * DEFAULT_REPLAY_LIMIT
"""Bytes one agent may make the server hold: its stream inboxes, its replay buffer and
its link's queue (128 MiB). A frame waiting in the queue is also kept for replay and
counts twice, so an agent at the replay limit still fits; a compliant agent's inboxes
hold about a window (256 KiB) per stream whose consumer is slow."""


@dataclass
class ServerConfig:
    """Everything the server needs to run, apart from the policy and the tokens."""

    listen: tuple[Address, ...] = (TcpAddress(*DEFAULT_LISTEN),)
    """Every address agents may connect to: TCP, unix sockets, vsock (``--listen``)."""
    policy_file: str = DEFAULT_POLICY_FILE
    token_file: str = ""
    debug_host: str | None = None
    debug_port: int | None = None
    audit_log: str | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    window: int = DEFAULT_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_requests_per_agent: int = DEFAULT_MAX_REQUESTS_PER_AGENT
    max_agents: int = DEFAULT_MAX_AGENTS
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    resume_grace: float = DEFAULT_RESUME_GRACE
    replay_limit: int = DEFAULT_REPLAY_LIMIT
    audit_max_bytes: int = DEFAULT_MAX_BYTES
    audit_backups: int = DEFAULT_BACKUPS
    audit_fsync: bool = False
    audit_deny_limit: tuple[int, float] = DEFAULT_DENY_LIMIT
    parse_limits: ParseLimits = DEFAULT_LIMITS
    """Server-wide caps on what the policy engine parses; tools may override them."""
    audit_deny_bytes: int = DEFAULT_DENY_BYTES
    audit_max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    tls_key: str | None = None
    """The TLS private key file (hidden from tools; its key material is masked)."""
    debug_token_file: str | None = None
    """The debug listener's token file (hidden from tools)."""
    handshake_max_frame: int = DEFAULT_HANDSHAKE_MAX_FRAME
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
    max_link_queue: int = DEFAULT_MAX_LINK_QUEUE
    agent_memory_limit: int = DEFAULT_AGENT_MEMORY_LIMIT
    unix_socket_mode: int = SOCKET_MODE
    """File mode of each unix socket the server listens on."""
    shares: ShareCaps = field(default_factory=ShareCaps)
    """Caps on CLI processes, upstream connections and event streams (``shares.py``)."""
    max_pending_approvals: int = DEFAULT_MAX_PENDING_APPROVALS
    """Calls one agent may have waiting for a person at once (``approvals.py``)."""
    approval_notify: str | None = None
    """Shell command run with a JSON summary on stdin for each new pending approval."""
    mcp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest MCP message either way in an MCP session (``--mcp-max-message-bytes``)."""
    mcp_max_pending: int = MAX_PENDING
    """Client requests one MCP session may leave waiting for an answer (``--mcp-max-pending``)."""
