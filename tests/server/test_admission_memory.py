"""Unauthenticated-connection slots, the refusal log's throttle, and an agent's memory budget."""

from __future__ import annotations

import pytest

from carapace.server.admission import HandshakeSlots, LogThrottle, Slot
from carapace.server.memory import AgentMemory, MemoryLimitExceeded


def test_slots_are_capped_per_address_and_overall() -> None:
    slots = HandshakeSlots(total=4, per_address=2)
    a1, a2 = slots.admit("10.0.0.1"), slots.admit("10.0.0.1")
    assert isinstance(a1, Slot) and isinstance(a2, Slot)
    assert slots.admit("10.0.0.1") == "per_address"
    b1, b2 = slots.admit("10.0.0.2"), slots.admit("10.0.0.2")
    assert isinstance(b1, Slot) and isinstance(b2, Slot)
    assert slots.admit("10.0.0.3") == "total"
    assert slots.open == 4


def test_a_released_slot_is_free_again_and_release_is_idempotent() -> None:
    slots = HandshakeSlots(total=1, per_address=1)
    slot = slots.admit("a")
    assert isinstance(slot, Slot)
    slot.release()
    slot.release()  # the link released it on authentication, the server again at the end
    assert slots.open == 0 and slots.held_by("a") == 0
    assert isinstance(slots.admit("b"), Slot)


def test_the_refusal_log_speaks_once_per_interval_and_counts_the_rest() -> None:
    throttle = LogThrottle(interval=10)
    assert throttle.allow(0.0) == 0
    assert all(throttle.allow(t) is None for t in (0.1, 1.0, 9.9))
    assert throttle.allow(10.0) == 3
    assert throttle.allow(10.5) is None
    assert throttle.allow(25.0) == 1


class Replay:
    buffered_bytes = 0


class Queue:
    queued_bytes = 0


def test_the_budget_counts_inboxes_replay_and_the_link_queue() -> None:
    replay, queue = Replay(), Queue()
    memory = AgentMemory(1000, replay)
    memory.link_queue = queue
    memory.charge(400)
    replay.buffered_bytes = 300
    queue.queued_bytes = 300
    assert memory.used == 1000
    memory.check()  # at the limit is fine
    with pytest.raises(MemoryLimitExceeded, match=r"inboxes 401, replay 300, link queue 300"):
        memory.charge(1)
    memory.release(401)
    assert memory.used == 600
