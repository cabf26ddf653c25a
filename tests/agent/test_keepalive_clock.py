"""The agent's KeepaliveClock: one timer says which idle event streams need a keepalive."""

from __future__ import annotations

import gc

import trio
import trio.testing

from carapace.agent.http_listener import KeepaliveClock


class FakeStream:
    """Stands in for an AgentStream: records when it was told a keepalive is due."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nudged_at: list[float] = []

    def keepalive_due(self) -> None:
        self.nudged_at.append(trio.current_time())


async def test_idle_stream_is_nudged_every_interval(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    clock = KeepaliveClock(15.0)
    stream = FakeStream("a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        start = trio.current_time()
        clock.wrote(stream)  # type: ignore[arg-type]
        await trio.sleep(61)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip([start, *stream.nudged_at], stream.nudged_at, strict=False)]
    assert len(gaps) == 4
    for gap in gaps:
        assert 15.0 - clock.slack <= gap <= 15.0 + 1e-9


async def test_writes_postpone_the_keepalive(autojump_clock: trio.testing.MockClock) -> None:
    clock = KeepaliveClock(10.0)
    busy, idle = FakeStream("busy"), FakeStream("idle")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        clock.wrote(busy)  # type: ignore[arg-type]
        clock.wrote(idle)  # type: ignore[arg-type]
        for _ in range(35):  # busy writes every second for 35 s
            await trio.sleep(1)
            clock.wrote(busy)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert busy.nudged_at == []
    assert len(idle.nudged_at) == 3


async def test_forgotten_stream_is_never_nudged(autojump_clock: trio.testing.MockClock) -> None:
    clock = KeepaliveClock(5.0)
    gone, kept = FakeStream("gone"), FakeStream("kept")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        clock.wrote(gone)  # type: ignore[arg-type]
        clock.wrote(kept)  # type: ignore[arg-type]
        await trio.sleep(2)
        clock.forget(gone)  # type: ignore[arg-type]
        clock.forget(gone)  # type: ignore[arg-type]  (twice is harmless)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert gone.nudged_at == []
    assert len(kept.nudged_at) == 4


async def test_clock_sleeps_while_no_stream_is_open(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    clock = KeepaliveClock(1.0)
    late = FakeStream("late")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        await trio.sleep(100)  # nothing to do: the clock waits, it does not spin
        start = trio.current_time()
        clock.wrote(late)  # type: ignore[arg-type]
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert len(late.nudged_at) == 1
    assert late.nudged_at[0] - start <= 1.0


async def test_streams_due_together_share_a_wake_up(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    """Streams opened within `slack` of each other are nudged at the same moment."""
    clock = KeepaliveClock(15.0)
    streams = [FakeStream(str(i)) for i in range(100)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        for s in streams:
            clock.wrote(s)  # type: ignore[arg-type]
            await trio.sleep(clock.slack / 200)
        await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert len({s.nudged_at[0] for s in streams}) == 1


async def test_idle_streams_leave_no_cyclic_garbage(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    """Keepalives for idle streams must not feed the cyclic collector: beside thousands
    of streams its pauses stall live ones (a timeout around each stream's wait would
    leave a cycle per keepalive)."""
    clock = KeepaliveClock(1.0)
    inboxes = []

    async def idle_relay(send: trio.MemorySendChannel[None],
                         receive: trio.MemoryReceiveChannel[None]) -> None:
        class Stream:
            def keepalive_due(self) -> None:
                send.send_nowait(None)

        stream = Stream()
        clock.wrote(stream)  # type: ignore[arg-type]
        async for _ in receive:
            clock.wrote(stream)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        for _ in range(200):
            send, receive = trio.open_memory_channel[None](10)
            inboxes.append(send)
            nursery.start_soon(idle_relay, send, receive)
        await trio.sleep(1.5)  # everything set up and through one keepalive
        gc.collect()
        gc.disable()
        try:
            await trio.sleep(3.0)  # three keepalives for each of 200 streams
            collected = gc.collect()
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()
    assert collected < 50, f"{collected} objects in cycles after 600 keepalives"


async def test_a_large_burst_yields_between_nudges(autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    """Thousands due at once are nudged a few per scheduler batch, so other tasks
    (a live stream's relay) run in between instead of after all of them."""
    clock = KeepaliveClock(15.0)
    streams = [FakeStream(str(i)) for i in range(1000)]
    ran_between: list[int] = []
    first_nudge = trio.Event()
    streams[0].keepalive_due = lambda: (first_nudge.set(),  # type: ignore[method-assign]
                                        streams[0].nudged_at.append(trio.current_time()))

    async def other_task() -> None:
        await first_nudge.wait()
        while True:
            nudged = sum(1 for s in streams if s.nudged_at)
            ran_between.append(nudged)
            if nudged == len(streams):
                return
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        for s in streams:
            clock.wrote(s)  # type: ignore[arg-type]
        nursery.start_soon(other_task)
        await first_nudge.wait()
        while len(ran_between) == 0 or ran_between[-1] < len(streams):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert all(len(s.nudged_at) == 1 for s in streams)
    partial = {n for n in ran_between if 0 < n < len(streams)}
    assert len(partial) >= 20, "other tasks ran only after most of the burst"


def test_the_agent_refuses_a_keepalive_interval_it_could_not_keep() -> None:
    """0 would have the clock nudge without pause; the CLI says so instead of spinning."""
    import subprocess
    import sys
    from pathlib import Path

    agent = Path(sys.executable).parent / "carapace-agent"
    for bad in ("0", "-1", "0.01"):
        out = subprocess.run([str(agent), "--server", "127.0.0.1:1", "--token-file", "/dev/null",
                              "--expose", "x=1", "--sse-keepalive", bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert "--sse-keepalive" in out.stderr and "0.1" in out.stderr


async def test_a_zero_interval_still_yields_between_rounds() -> None:
    """Belt and braces below the CLI's bound: each round nudges a stream once, then yields."""
    clock = KeepaliveClock(0.0)
    stream = FakeStream("s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        clock.wrote(stream)  # type: ignore[arg-type]
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert 1 <= len(stream.nudged_at) <= 50
