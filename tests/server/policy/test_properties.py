"""Property tests: the decision functions never raise, whatever the VM sends."""

from __future__ import annotations

import json
import shlex
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carapace.server.policy import (
    CliDecision,
    Decision,
    Policy,
    argv_matches,
    decide_cli,
    decide_http,
    load_policy,
)

POLICY: Policy = load_policy(
    """
agents:
  default: {tools: [sig, open, op, cwd]}
tools:
  sig:
    type: http
    upstream: "http://127.0.0.1:1"
    allow_paths: ["POST /api/v1/rpc", "GET /api/*", "* /x/*/y"]
    jsonrpc_allow_methods: [send, version]
    jsonrpc_deny_methods: [unregister]
    jsonrpc_param_filters:
      send: {field: recipient, allow_patterns: ["+1*"], deny_patterns: ["+1900*"]}
  open: {type: http, upstream: "http://127.0.0.1:2"}
  op:
    type: cli
    binary: /usr/bin/op
    argv_allow_patterns: ["item get *", "item list*", "", "[a-z]*"]
    argv_deny_patterns: ["item delete *", "* --danger"]
    env_passthrough: [TERM]
    env_inject: {OP_TOKEN: "0123456789abcdef"}
  cwd:
    type: cli
    binary: /usr/bin/t
    argv_allow_patterns: ["*"]
    cwd_allowed: ["/srv/work"]
"""
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["method", "params", "recipient", "id", "x"]) | st.text(),
                      children, max_size=4),
    max_leaves=20,
)
jsonrpc_calls = st.fixed_dictionaries(
    {"method": st.sampled_from(["send", "version", "unregister", "other"]) | st.text()},
    optional={"params": json_values | st.fixed_dictionaries(
        {"recipient": st.text() | st.lists(st.text(), max_size=3) | json_values})},
)
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | jsonrpc_calls.map(lambda v: json.dumps(v).encode())
    | st.lists(jsonrpc_calls, max_size=3).map(lambda v: json.dumps(v).encode())
)
targets = st.text(max_size=40) | st.lists(
    st.sampled_from(["api", "v1", "rpc", "..", ".", "%2e", "%252e", "", "x", "y", "%", "?q=1"]),
    max_size=5,
).map(lambda parts: "/" + "/".join(parts))
header_lists = st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=4)
tools = st.sampled_from(["sig", "open", "op", "cwd", "nope"]) | st.text(max_size=5)
agents = st.sampled_from(["default", "other"]) | st.text(max_size=5)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(agent=agents, tool=tools,
       method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]) | st.text(max_size=8),
       target=targets, headers=header_lists, body=bodies)
def test_decide_http_never_raises(agent: str, tool: str, method: str, target: str,
                                  headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    decision = decide_http(POLICY, agent, tool, method, target, headers, body)
    assert isinstance(decision, Decision)
    assert decision.rule and decision.reason
    assert decision.allow == (decision.code == "")


def _fake_realpath(path: bytes) -> bytes:
    if b"missing" in path:
        raise FileNotFoundError(path)
    return path.rstrip(b"/") or b"/"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(agent=agents, tool=tools,
       argv=st.lists(st.binary(max_size=10) | st.sampled_from(
           [b"item", b"get", b"delete", b"list", b"--danger", b"a b", b"'"]), max_size=5),
       cwd=st.binary(max_size=20) | st.sampled_from([b"/srv/work", b"/srv/work/missing", b"/"]),
       env=st.lists(st.tuples(st.sampled_from([b"TERM", b"PATH", b"LD_PRELOAD"])
                              | st.binary(max_size=8), st.binary(max_size=8)), max_size=4))
def test_decide_cli_never_raises(agent: str, tool: str, argv: list[bytes], cwd: bytes,
                                 env: list[tuple[bytes, bytes]]) -> None:
    decision = decide_cli(POLICY, agent, tool, argv, cwd, env, realpath=_fake_realpath)
    assert isinstance(decision, CliDecision)
    if decision.allow:
        assert decision.argv[0] == decision.binary.encode()
        assert decision.argv[1:] == argv
        assert b"LD_PRELOAD" not in decision.env
        assert decision.env[b"PATH"] == b"/usr/local/bin:/usr/bin:/bin"
    else:
        assert decision.argv == [] and decision.env == {}


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4))
def test_single_argument_never_poses_as_words(words: list[str]) -> None:
    """Joining words into one argument never matches the pattern that lists them."""
    pattern = shlex.join(words)
    if len(words) > 1 and pattern == " ".join(words):  # plain words only
        assert argv_matches(words, pattern)
        assert not argv_matches([" ".join(words)], pattern)


@given(st.lists(st.text(max_size=8), max_size=5), st.text(max_size=12))
def test_argv_matches_never_raises(args: list[str], pattern: str) -> None:
    assert argv_matches(args, pattern) in (True, False)




@settings(max_examples=200, deadline=None)
@given(st.lists(jsonrpc_calls, min_size=1, max_size=4))
def test_batch_allowed_iff_every_call_allowed(calls: list[dict[str, Any]]) -> None:
    def allowed(body: Any) -> bool:
        return decide_http(POLICY, "default", "sig", "POST", "/api/v1/rpc", [],
                           json.dumps(body).encode()).allow

    assert allowed(calls) == all(allowed(call) for call in calls)


@settings(max_examples=300, deadline=None)
@given(targets)
def test_allowed_paths_never_traverse(target: str) -> None:
    decision = decide_http(POLICY, "default", "open", "GET", target, [], b"")
    if decision.allow:
        path = target.split("?", 1)[0].lower()
        assert path.startswith("/") and "//" not in path and "\\" not in path
        assert "%2e" not in path and "%2f" not in path and "%25" not in path
        assert all(seg not in (".", "..") for seg in path.split("/"))


_TARGET_PIECES = st.sampled_from(["/", "//", ".", "..", "%2e", "%2F", "%41", "%", "?", "#",
                                  ";", "a", "Z9", "~", "\\", " ", "\x00", "\x7f", "é", "'",
                                  "\"", "@", "=", "&"])


@given(st.lists(_TARGET_PIECES, max_size=12).map("".join))
def test_the_plain_target_fast_path_agrees_with_the_full_check(target: str) -> None:
    """The one-regex shortcut accepts only targets the detailed check accepts."""
    from carapace.server.policy.http import _target_problem, _target_problem_in_detail

    assert _target_problem(target) == _target_problem_in_detail(target)
    assert _target_problem("/" + target) == _target_problem_in_detail("/" + target)
