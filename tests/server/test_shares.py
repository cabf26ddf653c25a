"""Fair shares: per-agent and host-wide caps on what is held open at once."""

from __future__ import annotations

from carapace.server.policy import vm_denial
from carapace.server.policy.decision import Decision
from carapace.server.shares import FairShares, Refusal, ShareCaps, Slot


def caps(**kw: int) -> ShareCaps:
    base = {"cli_processes_per_agent": 2, "cli_processes": 3,
            "upstream_connections_per_agent": 1, "upstream_connections": 2,
            "sse_streams_per_agent": 0, "sse_streams": 0}
    return ShareCaps(**{**base, **kw})


def test_an_agent_at_its_cap_gets_429_and_the_others_are_still_served() -> None:
    shares = FairShares(caps())
    held = [shares.acquire("cli_processes", "vm1") for _ in range(2)]
    assert all(isinstance(s, Slot) for s in held)
    refused = shares.acquire("cli_processes", "vm1")
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.code, refused.scope) == (429, "too_many_requests", "agent")
    assert refused.retry_after >= 1 and "--max-cli-processes-per-agent" in refused.reason
    assert isinstance(shares.acquire("cli_processes", "vm2"), Slot)
    # The host-wide cap (3) is now reached: vm3 hears 503 server_busy.
    busy = shares.acquire("cli_processes", "vm3")
    assert isinstance(busy, Refusal) and (busy.status, busy.code) == (503, "server_busy")
    assert "--max-cli-processes" in busy.reason
    assert shares.refusals[("cli_processes", "agent")] == 1
    assert shares.refusals[("cli_processes", "host")] == 1
    first = held[0]
    assert isinstance(first, Slot)
    first.release()
    first.release()  # once only
    assert shares.in_use("cli_processes") == 2
    assert isinstance(shares.acquire("cli_processes", "vm3"), Slot)


def test_upstream_connections_are_counted_per_tool() -> None:
    shares = FairShares(caps())
    assert isinstance(shares.acquire("upstream_connections", "vm1", "a"), Slot)
    assert isinstance(shares.acquire("upstream_connections", "vm1", "b"), Slot)
    own = shares.acquire("upstream_connections", "vm1", "a")
    assert isinstance(own, Refusal) and own.scope == "agent" and "tool a" in own.reason
    assert isinstance(shares.acquire("upstream_connections", "vm2", "a"), Slot)
    host = shares.acquire("upstream_connections", "vm3", "a")
    assert isinstance(host, Refusal) and host.scope == "host"
    assert shares.in_use("upstream_connections") == 3
    assert shares.held("upstream_connections", "vm1", "a") == 1


def test_zero_means_no_cap_and_released_slots_leave_nothing_behind() -> None:
    shares = FairShares(caps())
    slots = [shares.acquire("sse_streams", f"vm{i % 7}") for i in range(1000)]
    assert all(isinstance(s, Slot) for s in slots)
    for slot in slots:
        assert isinstance(slot, Slot)
        with slot:
            pass
    assert shares.in_use("sse_streams") == 0
    assert not shares._agents and not shares._host  # memory follows what is open


def test_refusals_read_to_the_vm_with_their_status() -> None:
    for code, status in (("too_many_requests", 429), ("server_busy", 503)):
        d = Decision(False, "agent vm1 already has 2 CLI processes running", "--x", code, 1)
        assert vm_denial(d, "vm1", "t")[:2] == (status, code)


def test_full_says_why_without_taking_a_slot() -> None:
    shares = FairShares(caps(sse_streams_per_agent=1))
    assert shares.full("sse_streams", "vm1") is None
    assert isinstance(shares.acquire("sse_streams", "vm1"), Slot)
    why = shares.full("sse_streams", "vm1")
    assert isinstance(why, Refusal) and why.flag == "--max-sse-streams-per-agent"
    assert shares.in_use("sse_streams") == 1 and shares.refusals[("sse_streams", "agent")] == 1
