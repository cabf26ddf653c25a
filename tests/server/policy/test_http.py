"""HTTP decisions: the signal-cli anchor means what it says, and the attacks on it fail."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from carapace.server.policy import (
    Decision,
    HttpTool,
    Policy,
    decide_cli,
    decide_http,
    load_policy,
    load_policy_file,
    prepare_http_headers,
)

ANCHORS = Path(__file__).resolve().parents[3].parent / "shared" / "anchor-policies"
TOKEN = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"

# The signal-cli anchor, inlined so these tests run without ../shared, plus a
# variant with allow_paths and headers_inject.
SIGNAL = """
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:18080"
    jsonrpc_allow_methods: [send, sendTyping, sendReceipt, sendReaction, getAttachment, version]
    jsonrpc_deny_methods: [deleteEverything, removeAccount, unregister]
    jsonrpc_param_filters:
      send: {field: "recipient", allow_patterns: ["+1*"], deny_patterns: []}
      sendTyping: {field: "recipient", allow_patterns: ["+1*"], deny_patterns: []}
      sendReceipt: {field: "recipient", allow_patterns: ["+1*"], deny_patterns: []}
      sendReaction: {field: "recipients", allow_patterns: ["+1*"], deny_patterns: []}
    rate_limit: {max_requests: 100, window_secs: 60}
    timeout_secs: 30
"""

GUARDED = f"""
tools:
  sig:
    type: http
    upstream: "http://127.0.0.1:18080/base"
    allow_paths: ["POST /api/v1/rpc", "GET /api/v1/events", "* /api/v1/check",
                  "GET /files/*"]
    jsonrpc_deny_methods: [unregister]
    jsonrpc_param_filters:
      send: {{field: recipient, allow_patterns: ["+1*"], deny_patterns: ["+1900*"]}}
    headers_inject: {{Authorization: "Bearer {TOKEN}"}}
  open:
    type: http
    upstream: "http://127.0.0.1:9"
  op: {{type: cli, binary: /usr/bin/op, argv_allow_patterns: ["*"]}}
"""


@pytest.fixture(scope="module")
def signal() -> Policy:
    path = ANCHORS / "signal-cli.yaml"
    if path.is_file():
        return load_policy_file(path)
    return load_policy(SIGNAL)


@pytest.fixture(scope="module")
def guarded() -> Policy:
    return load_policy(textwrap.dedent(GUARDED))


def rpc(method: str, **params: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params:
        call["params"] = params
    return call


def post(policy: Policy, body: Any, tool: str = "signal-cli", target: str = "/api/v1/rpc",
         raw: bytes | None = None) -> Decision:
    data = raw if raw is not None else json.dumps(body).encode()
    return decide_http(policy, "default", tool, "POST", target,
                       [(b"Content-Type", b"application/json")], data)


# -- the anchor's comments ----------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        rpc("send", recipient=["+15551234567"], message="hi"),
        rpc("send", recipient="+15551234567", message="hi"),
        rpc("sendTyping", recipient=["+12025550100"]),
        rpc("sendReceipt", recipient=["+12025550100"], targetTimestamp=1),
        rpc("sendReaction", recipients=["+12025550100"], emoji="👍"),
        rpc("getAttachment", id="abc"),
        rpc("version"),
    ],
)
def test_signal_allowed_examples(signal: Policy, call: dict[str, Any]) -> None:
    decision = post(signal, call)
    assert decision.allow, decision
    assert decision.rule.startswith("tools.signal-cli.jsonrpc_allow_methods[")
    assert decision.code == ""


@pytest.mark.parametrize("method", ["deleteEverything", "removeAccount", "unregister"])
def test_signal_denied_methods(signal: Policy, method: str) -> None:
    decision = post(signal, rpc(method))
    assert not decision.allow
    assert decision.rule.startswith("tools.signal-cli.jsonrpc_deny_methods[")
    assert method in decision.rule


@pytest.mark.parametrize("method", ["updateGroup", "listContacts", "register", "Send"])
def test_signal_unlisted_methods_denied_by_default(signal: Policy, method: str) -> None:
    decision = post(signal, rpc(method))
    assert not decision.allow
    assert decision.rule.startswith("default deny:")
    assert "jsonrpc_allow_methods" in decision.rule


@pytest.mark.parametrize(
    "call",
    [
        rpc("send", recipient=["+447700900123"], message="hi"),
        rpc("sendTyping", recipient="+33612345678"),
        rpc("sendReaction", recipients=["+447700900123"], emoji="x"),
        # the plural field is what sendReaction is filtered on
        rpc("sendReaction", recipient=["+15551234567"], emoji="x"),
    ],
)
def test_signal_non_us_recipients_denied(signal: Policy, call: dict[str, Any]) -> None:
    assert not post(signal, call).allow


# -- attacks: batch smuggling --------------------------------------------------


def test_batch_smuggling_denied_method(signal: Policy) -> None:
    batch = [rpc("send", recipient=["+15551234567"], message="hi"), rpc("deleteEverything")]
    decision = post(signal, batch)
    assert not decision.allow
    assert "batch call 1" in decision.reason
    assert "jsonrpc_deny_methods" in decision.rule


def test_batch_smuggling_unlisted_method(signal: Policy) -> None:
    decision = post(signal, [rpc("version"), rpc("updateAccount")])
    assert not decision.allow


def test_batch_smuggling_bad_recipient(signal: Policy) -> None:
    batch = [rpc("version"), rpc("send", recipient=["+447700900123"], message="x")]
    assert not post(signal, batch).allow


def test_batch_all_allowed(signal: Policy) -> None:
    batch = [rpc("version"), rpc("send", recipient=["+15551234567"], message="x")]
    decision = post(signal, batch)
    assert decision.allow
    assert "2 calls" in decision.reason


@pytest.mark.parametrize("body", [[], [1], ["send"], [rpc("version"), None], [[rpc("version")]]])
def test_bad_batches(signal: Policy, body: Any) -> None:
    assert not post(signal, body).allow


# -- attacks: array params, every element ---------------------------------------


def test_param_filter_checks_second_element(signal: Policy) -> None:
    decision = post(signal, rpc("send", recipient=["+15551234567", "+447700900123"], message="x"))
    assert not decision.allow
    assert "recipient[1]" in decision.reason
    assert "447700900123" not in decision.reason + decision.rule  # values stay out of audit


def test_param_filter_checks_last_of_many(signal: Policy) -> None:
    numbers = [f"+1555000{i:04d}" for i in range(50)] + ["+861234"]
    assert not post(signal, rpc("send", recipient=numbers, message="x")).allow
    assert post(signal, rpc("send", recipient=numbers[:-1], message="x")).allow


@pytest.mark.parametrize(
    "params",
    [
        None,  # params absent
        {"message": "x", "groupId": "abc"},  # field missing: would send to a group
        {"recipient": [], "groupId": "abc"},  # empty array: nothing to check
        {"recipient": 15551234567},
        {"recipient": ["+15551234567", 5]},
        {"recipient": [["+15551234567"]]},
        {"recipient": {"number": "+15551234567"}},
        {"recipient": None},
    ],
)
def test_param_filter_shapes_denied(signal: Policy, params: Any) -> None:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": "send", "id": 1}
    if params is not None:
        call["params"] = params
    assert not post(signal, call).allow


def test_params_as_array_denied(signal: Policy) -> None:
    call = {"jsonrpc": "2.0", "method": "send", "params": ["+15551234567"], "id": 1}
    assert not post(signal, call).allow


def test_param_deny_patterns_win(guarded: Policy) -> None:
    ok = post(guarded, rpc("send", recipient=["+15551234567"]), tool="sig")
    assert ok.allow
    bad = post(guarded, rpc("send", recipient=["+15551234567", "+19005550100"]), tool="sig")
    assert not bad.allow
    assert bad.rule == 'tools.sig.jsonrpc_param_filters.send.deny_patterns[0] "+1900*"'


# -- attacks: non-JSON and non-object bodies -------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"method=deleteEverything",
        b"{not json",
        b'"send"',
        b"42",
        b"null",
        b"true",
        b'{"method": "send"',
        b"\xff\xfe{}",
        '\ufeff{"method":"version"}'.encode(),
        '{"method":"version"}'.encode("utf-16"),
        b'{"method": "version", "id": NaN}',
        b'{"method": "version", "method": "deleteEverything"}',
        b'{"method": "version", "params": {"a": 1, "a": 2}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"method": 5}',
        b'{"params": {}}',
        b'{"method": null}',
    ],
)
def test_non_jsonrpc_bodies_denied(signal: Policy, raw: bytes) -> None:
    decision = post(signal, None, raw=raw)
    assert not decision.allow
    assert decision.rule.startswith("default deny:")


def test_duplicate_key_reason(signal: Policy) -> None:
    decision = post(signal, None, raw=b'{"method":"version","method":"unregister"}')
    assert "repeats a key" in decision.reason


def test_get_without_body_is_not_jsonrpc(signal: Policy) -> None:
    for target in ("/api/v1/events?account=%2B15551234567", "/api/v1/check"):
        decision = decide_http(signal, "default", "signal-cli", "GET", target, [], b"")
        assert decision.allow, decision
    # ...but a GET that carries a body is checked like any other request
    decision = decide_http(signal, "default", "signal-cli", "GET", "/api/v1/rpc", [],
                           json.dumps(rpc("deleteEverything")).encode())
    assert not decision.allow
    # and a POST without a body is not a JSON-RPC request
    assert not decide_http(signal, "default", "signal-cli", "POST", "/api/v1/rpc", [], b"").allow


def test_tool_without_jsonrpc_rules_passes_any_body(guarded: Policy) -> None:
    decision = decide_http(guarded, "default", "open", "PUT", "/anything", [], b"\x00binary")
    assert decision.allow
    assert "every path is open" in decision.rule


# -- attacks: paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "rule_index"),
    [
        ("POST", "/api/v1/rpc", 0),
        ("GET", "/api/v1/events", 1),
        ("GET", "/api/v1/events?account=%2B1555", 1),
        ("GET", "/api/v1/check", 2),
        ("HEAD", "/api/v1/check", 2),
        ("GET", "/files/a.txt", 3),
        ("GET", "/files/sub/dir/a.txt", 3),
    ],
)
def test_allow_paths_allow(guarded: Policy, method: str, target: str, rule_index: int) -> None:
    body = json.dumps(rpc("version")).encode() if method == "POST" else b""
    decision = decide_http(guarded, "default", "sig", method, target, [], body)
    assert decision.allow, decision
    if method != "POST":
        assert decision.rule.startswith(f"tools.sig.allow_paths[{rule_index}]")


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/api/v1/rpc"),
        ("POST", "/api/v1/events"),
        ("POST", "/api/v1/rpc/"),
        ("POST", "/API/v1/rpc"),
        ("post", "/api/v1/rpc"),
        ("GET", "/api/v1/accounts"),
        ("GET", "/"),
        ("GET", "/files"),
    ],
)
def test_allow_paths_deny(guarded: Policy, method: str, target: str) -> None:
    body = json.dumps(rpc("version")).encode() if method.upper() == "POST" else b""
    decision = decide_http(guarded, "default", "sig", method, target, [], body)
    assert not decision.allow
    assert decision.rule == "default deny: no tools.sig.allow_paths entry matches"


@pytest.mark.parametrize(
    "target",
    [
        "/files/../api/v1/accounts",
        "/files/..",
        "/files/./a",
        "/files/..;x/secret",
        "/files/%2e%2e/admin",
        "/files/%2E%2E/admin",
        "/files/.%2e/admin",
        "/files/%252e%252e/admin",
        "/files/%25%32%65/admin",
        "/files/a%2fb",
        "/files/a%2Fb",
        "/files/a%5cb",
        "/files/a%5C..%5Cb",
        "/files/a\\..\\b",
        "/files//etc/passwd",
        "//files/a",
        "/files/a%00",
        "/files/a%0d%0aX-Injected:%201",
        "/files/a%zz",
        "/files/a%2",
        "files/a",
        "http://evil.example/files/a",
        "*",
        "",
        "/files/a b",
        "/files/a\r\nX-Injected: 1",
        "/files/a\nb",
        "/files/a\x00",
        "/files/a\x7f",
        "/files/é",
        "/files/a#frag",
        "/files/a?x=\r\n",
    ],
)
def test_traversal_and_control_characters_denied(guarded: Policy, target: str) -> None:
    decision = decide_http(guarded, "default", "sig", "GET", target, [], b"")
    assert not decision.allow, target
    assert decision.code == "bad_request"


def test_query_may_hold_encoded_slashes(guarded: Policy) -> None:
    decision = decide_http(guarded, "default", "sig", "GET", "/files/a?path=%2Fetc%2E", [], b"")
    assert decision.allow


@pytest.mark.parametrize("method", ["", "GET /x", "GE\tT", "GET\r\n", "G\x00", "GÉT", "(GET)"])
def test_bad_methods_denied(guarded: Policy, method: str) -> None:
    decision = decide_http(guarded, "default", "open", method, "/x", [], b"")
    assert not decision.allow
    assert decision.code == "bad_request"


@pytest.mark.parametrize(
    "header",
    [
        (b"X-Test", b"a\r\nX-Injected: 1"),
        (b"X-Test", b"a\nb"),
        (b"X-Test", b"a\rb"),
        (b"X-Test", b"a\x00b"),
        (b"X-Test", b"a\x7fb"),
        (b"X-Test", b"a\x1bb"),
        (b"X-Te st", b"a"),
        (b"X-Test\r\nX-Injected", b"a"),
        (b"X-Test:", b"a"),
        (b"", b"a"),
    ],
)
def test_header_control_characters_denied(guarded: Policy, header: tuple[bytes, bytes]) -> None:
    decision = decide_http(guarded, "default", "open", "GET", "/x", [header], b"")
    assert not decision.allow
    assert decision.code == "bad_request"


def test_header_tab_and_obs_text_allowed(guarded: Policy) -> None:
    headers = [(b"X-Test", b"a\tb"), (b"X-Utf8", "é".encode())]
    assert decide_http(guarded, "default", "open", "GET", "/x", headers, b"").allow


# -- default deny: tools, types, grants -------------------------------------------------


def test_unknown_tool_and_wrong_type(guarded: Policy) -> None:
    unknown = decide_http(guarded, "default", "nope", "GET", "/", [], b"")
    assert not unknown.allow and unknown.code == "unknown_tool"
    assert "nope" in unknown.rule
    wrong = decide_http(guarded, "default", "op", "GET", "/", [], b"")
    assert not wrong.allow and "cli tool" in wrong.reason
    assert wrong.rule == "default deny: tools.op.type is cli"
    wrong_cli = decide_cli(guarded, "default", "sig", [b"x"], b"/", [])
    assert not wrong_cli.allow and "http tool" in wrong_cli.reason


GRANTS = """
agents:
  alice: {tools: [sig]}
  bob: {tools: [sig, other]}
tools:
  sig: {type: http, upstream: "http://h:1"}
  other: {type: http, upstream: "http://h:2", agents: [alice]}
"""


def test_agent_grants() -> None:
    policy = load_policy(GRANTS)
    ok = decide_http(policy, "alice", "sig", "GET", "/", [], b"")
    assert ok.allow
    not_listed = decide_http(policy, "mallory", "sig", "GET", "/", [], b"")
    assert not not_listed.allow and "agents" in not_listed.rule
    not_granted = decide_http(policy, "alice", "other", "GET", "/", [], b"")
    assert not not_granted.allow
    assert not_granted.rule == 'default deny: "other" is not in agents.alice.tools'
    # bob's agents entry grants "other", but the tool's own list does not name bob
    both = decide_http(policy, "bob", "other", "GET", "/", [], b"")
    assert not both.allow
    assert both.rule == 'default deny: "bob" is not in tools.other.agents'
    assert policy.is_granted("alice", "sig") and not policy.is_granted("alice", "nope")


def test_per_tool_agents_without_section() -> None:
    policy = load_policy("tools:\n  s: {type: http, upstream: 'http://h:1', agents: [vm1]}\n")
    assert decide_http(policy, "vm1", "s", "GET", "/", [], b"").allow
    assert not decide_http(policy, "default", "s", "GET", "/", [], b"").allow


# -- headers upstream -----------------------------------------------------------------


def test_prepare_headers_strips_and_injects(guarded: Policy) -> None:
    tool = guarded.tools["sig"]
    assert isinstance(tool, HttpTool)
    vm_headers = [
        (b"Host", b"evil.example"),
        (b"Connection", b"keep-alive, X-Drop-Me"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Anything", b"x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Content-Length", b"999"),
        (b"x-drop-me", b"1"),
        (b"authorization", b"Bearer vm-forged"),
        (b"AUTHORIZATION", b"Bearer vm-forged-2"),
        (b"Accept", b"text/event-stream"),
        (b"Last-Event-ID", b"42"),
        (b"Content-Type", b"application/json"),
    ]
    out = prepare_http_headers(tool, vm_headers)
    assert out == [
        (b"Accept", b"text/event-stream"),
        (b"Last-Event-ID", b"42"),
        (b"Content-Type", b"application/json"),
        (b"Authorization", f"Bearer {TOKEN}".encode()),
    ]


def test_decision_json_shape(signal: Policy) -> None:
    decision = post(signal, rpc("unregister"))
    assert decision.as_dict() == {
        "decision": "deny",
        "reason": decision.reason,
        "rule": 'tools.signal-cli.jsonrpc_deny_methods[2] "unregister"',
    }
