"""The server's configuration, parsed once at the edge (``main.py``) into one typed object.

Each default is a named constant used by both the command line and the
dataclass, so ``--help`` and a server built in a test agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from carapace.protocol.flow import DEFAULT_WINDOW
from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.protocol.handshake import DEFAULT_HANDSHAKE_TIMEOUT
from carapace.protocol.keepalive import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL
from carapace.protocol.resume import DEFAULT_REPLAY_LIMIT

from .audit import DEFAULT_BACKUPS, DEFAULT_DENY_LIMIT, DEFAULT_MAX_BYTES
from .audit.caps import DEFAULT_MAX_RECORD_BYTES
from .audit.throttle import DEFAULT_DENY_BYTES
from .mcp.filter import DEFAULT_MAX_MESSAGE_BYTES, MAX_PENDING
from .policy import DEFAULT_LIMITS, ParseLimits

DEFAULT_LISTEN = ("127.0.0.1", 8765)
DEFAULT_POLICY_FILE = "/etc/carapace/policy.yaml"
DEFAULT_MAX_REQUESTS_PER_AGENT = 10_000
DEFAULT_MAX_AGENTS = 64
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_RESUME_GRACE = 30.0


@dataclass
class ServerConfig:
    """Everything the server needs to run, apart from the policy and the tokens."""

    listen_host: str = DEFAULT_LISTEN[0]
    listen_port: int = DEFAULT_LISTEN[1]
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
    mcp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest MCP message either way in an MCP session (``--mcp-max-message-bytes``)."""
    mcp_max_pending: int = MAX_PENDING
    """Client requests one MCP session may leave waiting for an answer (``--mcp-max-pending``)."""
