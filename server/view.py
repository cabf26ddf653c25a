"""What the operator API and the metrics may see of the running server.

They are handed this view at construction instead of the server itself, so
they read a few named facts and cannot reach into the rest (the daemon
satisfies it; a test can give a small stand-in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from carapace.protocol.messages import Message

from .admission import HandshakeSlots
from .approvals import Approvals
from .config import ServerConfig
from .policy import Policy
from .sandbox import SandboxStatus
from .session import AgentSession, Direction
from .stats import Stats

FrameObserver = Callable[[AgentSession, Direction, Message], None]
"""Called with every frame a session sends ("out") or receives ("in")."""


class OperatorView(Protocol):
    """The read-only facts of a running server that its operator may see."""

    @property
    def version(self) -> str: ...

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def draining(self) -> bool: ...

    @property
    def policy(self) -> Policy:
        """The policy in force now (a reload replaces it)."""
        ...

    @property
    def sessions(self) -> Mapping[str, AgentSession]: ...

    @property
    def frame_observers(self) -> list[FrameObserver]: ...

    @property
    def mcp_observers(self) -> list[Callable[[dict[str, Any]], None]]:
        """Told of each MCP call of every MCP session (``server/mcp/session.py``)."""
        ...

    def secrets(self) -> list[bytes]:
        """Every secret the server holds (tokens, injected values): never shown."""
        ...

    @property
    def denials_suppressed(self) -> int:
        """Deny records the audit trail counted instead of writing one by one."""
        ...

    def audit_counts(self) -> Mapping[str, int]:
        """``records_truncated``, ``denials_suppressed``, ``denied_bytes_suppressed``."""

    @property
    def sandbox_status(self) -> SandboxStatus:
        """How CLI tools are confined now (bwrap or none, and why)."""

    @property
    def admission(self) -> HandshakeSlots:
        """The connections that have not authenticated yet."""

    @property
    def approvals(self) -> Approvals:
        """The calls waiting for a person, and the remembered approvals."""
        ...
