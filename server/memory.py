"""One agent's memory on the server, held to a budget (``--agent-memory-limit``).

What an agent can make the server hold: data it sent toward its requests
that their consumers have not drained yet (stdin for a process that does
not read it; every frame waiting in a stream's inbox is counted, its bytes
plus ``INBOX_ITEM_OVERHEAD``), its requests' own bodies while they run (a
request that would not fit is refused), the frames kept for its replay until it
acknowledges them, and the frames queued on its link. A frame waiting in the
link's queue is also kept for replay and is counted in both: the budget is
an upper bound of what the agent holds, never an under-estimate. Credit keeps
a compliant agent's inboxes to about a window per stream; the budget bounds
their sum over up to ``--max-requests-per-agent`` streams, and the session of
an agent that goes past it is ended.
"""

from __future__ import annotations

from typing import Protocol

INBOX_ITEM_OVERHEAD = 128
"""What a frame waiting in an inbox costs beyond its payload (its message object, its
bytes object, the channel's slot), so that many empty frames are not free."""


class _Sized(Protocol):
    @property
    def buffered_bytes(self) -> int: ...


class _Queue(Protocol):
    @property
    def queued_bytes(self) -> int: ...


class MemoryLimitExceeded(Exception):
    """The agent holds more than its budget; the message says what and how much."""


class AgentMemory:
    """The running total of one agent's inboxes, replay buffer and link queue."""

    def __init__(self, limit: int, replay: _Sized) -> None:
        self.limit = limit
        self.inboxes = 0
        """Bytes (and per-frame overhead) waiting for a request's consumer."""
        self._replay = replay
        self.link_queue: _Queue | None = None
        """The current link's writer, once one is attached."""

    @property
    def used(self) -> int:
        queued = self.link_queue.queued_bytes if self.link_queue is not None else 0
        return self.inboxes + self._replay.buffered_bytes + queued

    def charge(self, amount: int) -> None:
        """``amount`` more bytes wait in an inbox; raise if that takes the agent over."""
        self.inboxes += amount
        self.check()

    def release(self, amount: int) -> None:
        self.inboxes -= amount

    def check(self) -> None:
        used = self.used
        if used > self.limit:
            queued = used - self.inboxes - self._replay.buffered_bytes
            raise MemoryLimitExceeded(
                f"the agent holds {used} bytes on the server (stream inboxes {self.inboxes}, "
                f"replay {self._replay.buffered_bytes}, link queue {queued}), over "
                f"--agent-memory-limit {self.limit}")
