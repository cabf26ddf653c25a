"""FrameWriter's byte limit: a peer that stops reading is cut off, never waited for."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from carapace.protocol.framing import encode
from carapace.protocol.messages import Pong
from carapace.runtime.frames import QUEUE_ITEM_OVERHEAD, FrameWriter, LinkClosed


async def test_a_queue_that_reaches_its_limit_refuses_and_tells_its_owner() -> None:
    # A stream that never takes anything: the peer does not read.
    stream = trio.testing.MemorySendStream()
    overflows: list[int] = []
    frame = encode(Pong(nonce=1))
    cost = len(frame) + QUEUE_ITEM_OVERHEAD
    writer = FrameWriter(stream, limit=10 * cost, on_overflow=overflows.append)
    for _ in range(10):
        writer.send_bytes(frame)  # never blocks, however full
    assert writer.queued_bytes == 10 * cost
    with pytest.raises(LinkClosed, match="over its limit"):
        writer.send_bytes(frame)
    assert overflows == [11 * cost]
    assert writer.closed
    with pytest.raises(LinkClosed):
        writer.send_bytes(frame)
    assert overflows == [11 * cost]  # told once


async def test_what_the_writing_task_takes_leaves_the_count() -> None:
    stream = trio.testing.MemorySendStream()
    frame = encode(Pong(nonce=1))
    writer = FrameWriter(stream, limit=3 * (len(frame) + QUEUE_ITEM_OVERHEAD))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for _ in range(100):  # far more than the limit, drained as it goes
            writer.send_bytes(frame)
            await trio.testing.wait_all_tasks_blocked()
            assert writer.queued_bytes == 0
        writer.close()
    assert writer.frames_sent == 100


async def test_without_a_limit_the_queue_is_unbounded() -> None:
    writer = FrameWriter(trio.testing.MemorySendStream())
    for _ in range(10_000):
        writer.send(Pong(nonce=1))
    assert writer.queued_bytes > 10_000 * QUEUE_ITEM_OVERHEAD
