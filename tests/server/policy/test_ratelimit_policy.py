"""Per-tool and per-agent limits applied to decisions (ratelimit.apply_rate_limits)."""

from __future__ import annotations

from carapace.server.policy import Decision, RateLimiter, apply_rate_limits, load_policy, vm_denial

POLICY = load_policy("""\
agents:
  vm1: {tools: [a, b, free], rate_limit: {max_requests: 4, window_secs: 10}}
  vm2: {tools: [a, b, free]}
tools:
  a:
    type: http
    upstream: "http://127.0.0.1:1"
    rate_limit: {max_requests: 2, window_secs: 60}
  b:
    type: http
    upstream: "http://127.0.0.1:1"
  free:
    type: http
    upstream: "http://127.0.0.1:1"
""")

ALLOW = Decision(True, "ok", "rule")


def test_tool_limit_is_each_agents_own_and_reports_retry_after() -> None:
    rl = RateLimiter()
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 0.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 1.0) is ALLOW
    third = apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 2.0)
    assert not third.allow and third.code == "rate_limited"
    assert third.retry_after == 58 and third.rule == "tools.a.rate_limit"
    assert vm_denial(third, "vm2", "a")[:2] == (429, "rate_limited")
    # Another agent has a budget of its own (global_rate_limit is the shared one).
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 3.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "a", 60.5) is ALLOW


def test_agent_limit_spans_tools() -> None:
    rl = RateLimiter()
    for t, tool in enumerate(["b", "free", "b", "free"]):
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", tool, float(t)) is ALLOW
    over = apply_rate_limits(rl, ALLOW, POLICY, "vm1", "b", 5.0)
    assert over.code == "rate_limited" and over.rule == "agents.vm1.rate_limit"
    assert over.retry_after == 5
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm2", "b", 5.0) is ALLOW  # not vm2's limit


def test_a_request_refused_by_one_limit_uses_up_neither() -> None:
    rl = RateLimiter()
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 0.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 0.0) is ALLOW
    for _ in range(5):  # refused by the tool limit: the agent budget is not spent
        assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 1.0).rule == "tools.a.rate_limit"
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "b", 1.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "b", 1.0) is ALLOW
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "b", 1.0).rule == "agents.vm1.rate_limit"


def test_denied_decisions_pass_through_uncounted() -> None:
    rl = RateLimiter()
    deny = Decision(False, "no", "rule", "denied")
    for _ in range(10):
        assert apply_rate_limits(rl, deny, POLICY, "vm1", "a", 0.0) is deny
    assert apply_rate_limits(rl, ALLOW, POLICY, "vm1", "a", 0.0) is ALLOW


def test_unavailable_tools_read_the_same_to_the_vm() -> None:
    from carapace.server.policy import decide_http

    unknown = decide_http(POLICY, "vm1", "nosuch", "GET", "/", [], b"")
    ungranted = decide_http(POLICY, "vm3", "a", "GET", "/", [], b"")
    assert (unknown.code, ungranted.code) == ("unknown_tool", "not_granted")
    assert vm_denial(unknown, "vm1", "nosuch") == (
        403, "denied", "denied by policy: tool 'nosuch' is not available to agent 'vm1'")
    assert vm_denial(ungranted, "vm3", "a") == (
        403, "denied", "denied by policy: tool 'a' is not available to agent 'vm3'")
    weird = vm_denial(unknown, "vm1", "x'\n")
    assert "\n" not in weird[2]
    bad = decide_http(POLICY, "vm1", "a", "GET", "/../x", [], b"")
    assert vm_denial(bad, "vm1", "a")[:2] == (400, "bad_request")
