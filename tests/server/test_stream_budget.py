"""A stream's inbox is charged to its agent's budget until the handler has consumed it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from carapace.protocol.errors import ProtocolError
from carapace.protocol.flow import flow_cost
from carapace.protocol.messages import Credit, Data, End, Message, Signal
from carapace.server.memory import INBOX_ITEM_OVERHEAD, AgentMemory, MemoryLimitExceeded
from carapace.server.streams import ServerStream


class Sink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_many(self, msgs: Sequence[Message]) -> None:
        self.sent.extend(msgs)


class NoReplay:
    buffered_bytes = 0


def stream(limit: int = 10**9, window: int = 1000) -> tuple[ServerStream, AgentMemory, Sink]:
    memory = AgentMemory(limit, NoReplay())
    sink = Sink()
    return ServerStream(sink, 1, window, memory=memory), memory, sink


async def test_delivered_frames_are_charged_and_consumed_ones_released() -> None:
    s, memory, sink = stream()
    data = Data(id=1, data=b"x" * 600)
    s.deliver(data)
    s.deliver(Signal(id=1, signum=2))
    assert memory.inboxes == flow_cost(data) + 2 * INBOX_ITEM_OVERHEAD
    seen = []
    async for msg in s.incoming():
        seen.append(msg)
        if isinstance(msg, Data):
            s.consumed(msg)
        if len(seen) == 2:
            break
    assert memory.inboxes == 0
    assert sink.sent == [Credit(id=1, amount=flow_cost(data))]


def test_what_a_finished_request_still_held_is_released() -> None:
    s, memory, _ = stream()
    s.deliver(Data(id=1, data=b"x" * 500))
    s.deliver(End(id=1))
    s.close_inbox()
    assert memory.inboxes == 0
    s.deliver(Signal(id=1, signum=2))  # after the end: dropped, not charged
    assert memory.inboxes == 0


def test_an_agent_over_its_budget_is_told_so() -> None:
    s, _, _ = stream(limit=2000, window=10**6)
    with pytest.raises(MemoryLimitExceeded, match="over --agent-memory-limit 2000"):
        for _ in range(100):
            s.deliver(Data(id=1, data=b"x" * 100))


def test_stdin_sent_without_credit_is_a_protocol_error() -> None:
    s, _, _ = stream(window=1000)
    s.deliver(Data(id=1, data=b"x" * 984))  # exactly the window
    with pytest.raises(ProtocolError, match="agent ignored flow control"):
        s.deliver(Data(id=1, data=b"x"))
