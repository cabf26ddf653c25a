"""A tool's rate_limit is each agent's own; global_rate_limit is shared by all of them."""

from __future__ import annotations

import pytest

from carapace.server.policy import (
    Decision,
    PolicyError,
    RateLimiter,
    apply_rate_limits,
    load_policy,
    prune_rate_limits,
)

POLICY = load_policy("""\
tools:
  a:
    type: http
    upstream: "http://127.0.0.1:1"
    rate_limit: {max_requests: 3, window_secs: 60}
  g:
    type: http
    upstream: "http://127.0.0.1:1"
    rate_limit: {max_requests: 3, window_secs: 60}
    global_rate_limit: {max_requests: 4, window_secs: 10}
  c:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
    global_rate_limit: {max_requests: 1, window_secs: 5}
""")

ALLOW = Decision(True, "ok", "rule")


def test_one_agent_spending_its_budget_leaves_the_others_theirs() -> None:
    rl = RateLimiter()
    for t in range(3):
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", float(t)) is ALLOW
    over = apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 3.0)
    assert over.code == "rate_limited" and over.rule == "tools.a.rate_limit"
    assert "each agent" in over.reason and over.retry_after == 57
    for t in range(3):  # vm2's own three, while vm1 is locked out
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 3.0 + t) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 6.0).code == "rate_limited"


def test_global_rate_limit_is_shared_by_every_agent() -> None:
    rl = RateLimiter()
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "g", 0.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "g", 0.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "g", 1.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm3", "g", 2.0) is ALLOW
    for agent in ("vm1", "vm2", "vm4"):  # four in 10 s, whoever asked: everyone waits
        over = apply_rate_limits(rl, ALLOW, POLICY, agent, "g", 3.0)
        assert over.code == "rate_limited" and over.rule == "tools.g.global_rate_limit"
        assert over.retry_after == 7 and "all agents together" in over.reason
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm4", "g", 10.5) is ALLOW


def test_a_global_refusal_does_not_spend_the_agents_own_budget() -> None:
    rl = RateLimiter()
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "c", 0.0) is ALLOW
    for _ in range(5):
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "c", 1.0).code == "rate_limited"
    # g: vm1 has its own three left even after the refusals above on another tool.
    for t in range(3):
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "g", 20.0 + t) is ALLOW


def test_global_rate_limit_loads_and_is_checked_like_rate_limit() -> None:
    tool = POLICY.tools["g"]
    assert tool.global_rate_limit is not None and tool.global_rate_limit.max_requests == 4
    assert POLICY.tools["a"].global_rate_limit is None
    with pytest.raises(PolicyError, match=r"tools\.x\.global_rate_limit\.burst.*unknown key"):
        load_policy("tools:\n  x: {type: http, upstream: 'http://h', "
                    "global_rate_limit: {max_requests: 1, window_secs: 1, burst: 2}}\n")
    with pytest.raises(PolicyError, match=r"global_rate_limit\.window_secs.*required"):
        load_policy("tools:\n  x: {type: http, upstream: 'http://h', "
                    "global_rate_limit: {max_requests: 1}}\n")


def test_budgets_are_bounded_by_agents_times_tools_and_pruned_on_reload() -> None:
    rl = RateLimiter()
    agents = [f"vm{i}" for i in range(20)]
    for _ in range(50):  # many requests add no keys: one per (agent, tool) with a limit
        for agent in agents:
            for tool in ("a", "c"):
                apply_rate_limits(rl, ALLOW, POLICY, agent, tool, 0.0)
    assert len(rl) == 20 + 1  # each agent's own budget of a, the shared one of c
    smaller = load_policy("""\
tools:
  a:
    type: http
    upstream: "http://127.0.0.1:1"
    rate_limit: {max_requests: 3, window_secs: 60}
""")
    prune_rate_limits(rl, smaller, agents[:5])
    assert len(rl) == 5  # c is gone, and so are the agents no longer configured
