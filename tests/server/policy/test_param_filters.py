"""Param filters that mean what signal-cli means: every recipient, no host files, one account."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.server.policy import (
    Decision,
    Policy,
    PolicyError,
    decide_http,
    lint_policy,
    load_policy,
    load_policy_file,
)
from carapace.server.policy.params import normalize_phone

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "policies" / "signal-cli.yaml"
ACCOUNT = "+15550100"
EXAMPLE_POLICY = load_policy_file(EXAMPLE)


@pytest.fixture(scope="module")
def example() -> Policy:
    return load_policy_file(EXAMPLE)


def call(policy: Policy, method: str, params: Any) -> Decision:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    return decide_http(policy, "default", "signal-cli", "POST", "/api/v1/rpc", [],
                       body.encode())


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        # Other ways to name who receives it: denied, or checked like recipient.
        ("send", {"groupId": "aGVsbG8=", "message": "hi"}, "groupId is denied"),
        ("send", {"recipient": ["+15551234567"], "groupId": ["x"]}, "groupId is denied"),
        ("send", {"username": ["alice.01"], "message": "hi"}, "username is denied"),
        ("send", {"noteToSelf": True, "message": "hi"}, "noteToSelf is denied"),
        ("send", {"recipient": ["+15551234567"], "recipients": ["+447700900123"]},
         "recipients[0] matches no allow pattern"),
        ("send", {"recipients": ["+447700900123"], "message": "hi"}, "recipients[0]"),
        ("send", {"group-id": "x", "recipient": ["+15551234567"]}, '"group-id" is not'),
        # Host files.
        ("send", {"recipient": ["+15551234567"], "attachment": ["/etc/carapace/tokens"]},
         "attachment is denied"),
        ("send", {"recipient": ["+15551234567"], "attachments": ["/etc/passwd"]},
         '"attachments" is not an allowed field'),
        ("send", {"recipient": ["+15551234567"], "previewImage": "/etc/passwd",
                  "previewUrl": "https://x"}, "previewImage is denied"),
        ("send", {"recipient": ["+15551234567"], "quoteAttachment": ["image/png:a:/etc/x"],
                  "quoteTimestamp": 1}, "quoteAttachment is denied"),
        ("send", {"recipient": ["+15551234567"], "messageFromStdin": True}, "not an allowed"),
        # The deny pattern, however the number is written.
        ("send", {"recipient": ["+1 900 555 0000"], "message": "hi"}, "deny pattern"),
        ("send", {"recipient": ["+1(900)5550000"], "message": "hi"}, "deny pattern"),
        ("send", {"recipient": ["+1-900-555-0000"], "message": "hi"}, "deny pattern"),
        ("send", {"recipient": "+1.900.555.0000", "message": "hi"}, "deny pattern"),
        # Not written as a number: signal-cli reads a username or a UUID.
        ("send", {"recipient": ["u:alice+15551234567"], "message": "hi"}, "not a phone number"),
        ("send", {"recipient": ["+１５５５"], "message": "hi"}, "not a phone number"),
        # The sending identity.
        ("send", {"account": "+15559999", "recipient": ["+15551234567"], "message": "hi"},
         "account matches no pattern"),
        ("send", {"account": 15550100, "recipient": ["+15551234567"], "message": "hi"},
         "account must be a string"),
        # getAttachment: signal-cli builds a file path from the id.
        ("getAttachment", {"id": "../../../etc/passwd"}, "id"),
        ("getAttachment", {"id": "x/../../y"}, "id"),
        ("getAttachment", {"id": "/etc/passwd"}, "id"),
        ("getAttachment", {"id": ".."}, "id"),
        ("getAttachment", {"id": "abc", "recipient": "+15551234567"}, "not an allowed"),
        # sendReaction: signal-cli reads recipient, which the old filter never checked.
        ("sendReaction", {"recipient": ["+447700900123"], "emoji": "x",
                          "targetAuthor": "+15551234567", "targetTimestamp": 1}, "recipient[0]"),
        ("sendReaction", {"recipients": ["+15551234567"], "recipient": ["+447700900123"],
                          "emoji": "x", "targetAuthor": "+1555", "targetTimestamp": 1},
         "recipient[0]"),
        ("sendTyping", {"groupId": "x"}, "not an allowed"),
    ],
)
def test_example_denies(example: Policy, method: str, params: dict[str, Any],
                        words: str) -> None:
    decision = call(example, method, params)
    assert not decision.allow, (params, decision.reason)
    assert words in decision.reason, decision.reason


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("send", {"account": ACCOUNT, "recipient": ["+15550100"], "message": "hello"}),
        ("send", {"recipient": "+1 555 123 4567", "message": "hi", "textStyle": ["0:2:BOLD"]}),
        ("send", {"recipients": ["+15551234567"], "message": "hi"}),
        ("sendTyping", {"account": ACCOUNT, "recipient": ["+15551234567"]}),
        ("sendReceipt", {"recipient": "+15551234567", "targetTimestamp": [1], "type": "read"}),
        ("sendReaction", {"recipient": ["+15551234567"], "emoji": "👍",
                          "targetAuthor": "+15551234567", "targetTimestamp": 1}),
        ("getAttachment", {"id": "Jx0d9sNs2BJHbCfSvHIb.png"}),
        ("getAttachment", {"account": ACCOUNT, "id": "abc"}),
    ],
)
def test_example_allows(example: Policy, method: str, params: dict[str, Any]) -> None:
    decision = call(example, method, params)
    assert decision.allow, decision.reason


SINGLE = """
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:1"
    jsonrpc_param_filters:
      send: {field: recipient, allow_patterns: ["+1*"], deny_patterns: ["+1900*"]}
      sendTyping: {fields: [recipient, groupId], allow_patterns: ["+1*", "grp=="]}
"""


def test_single_field_keeps_its_meaning() -> None:
    """``field``: required, every array element checked, no normalizing, other params free."""
    policy = load_policy(SINGLE)
    assert call(policy, "send", {"recipient": ["+1555", "+1556"], "attachment": "x"}).allow
    assert not call(policy, "send", {"recipient": ["+1555", "+44"]}).allow
    assert not call(policy, "send", {"groupId": "x"}).allow
    assert not call(policy, "send", {"recipient": []}).allow
    assert call(policy, "send", {"recipient": ["+1 900 555"]}).allow  # no normalize asked
    assert policy.tools["signal-cli"].jsonrpc_param_filters["send"].field == "recipient"  # type: ignore[union-attr]


def test_several_fields_need_one_and_check_all() -> None:
    policy = load_policy(SINGLE)
    assert call(policy, "sendTyping", {"groupId": "grp=="}).allow
    assert call(policy, "sendTyping", {"recipient": "+1555"}).allow
    missing = call(policy, "sendTyping", {"stop": True})
    assert not missing.allow and "params.recipient or params.groupId is missing" in missing.reason
    assert not call(policy, "sendTyping", {"recipient": "+1555", "groupId": "other"}).allow
    assert not call(policy, "sendTyping", {"recipient": "+1555", "groupId": None}).allow


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{field: a, fields: [b]}", "not both"),
        ("{allow_patterns: ['x']}", "field: is required"),
        ("{fields: []}", "fields: is empty"),
        ("{field: a, normalize: email}", "unknown normalization"),
        ("{field: a, field_patterns: {account: '+1'}}", "field_patterns.account: must be a list"),
        ("{field: a, deny_field: [x]}", "unknown key"),
    ],
)
def test_filter_mistakes_are_errors(spec: str, words: str) -> None:
    text = f"tools: {{s: {{type: http, upstream: 'http://127.0.0.1:1', " \
           f"jsonrpc_param_filters: {{send: {spec}}}}}}}"
    with pytest.raises(PolicyError, match=words):
        load_policy(text)


def lint_filter(spec: str) -> list[str]:
    policy = load_policy(
        "tools: {s: {type: http, upstream: 'http://127.0.0.1:1', allow_paths: ['POST /rpc'], "
        "timeout_secs: 5, jsonrpc_allow_methods: [send], "
        f"jsonrpc_param_filters: {{send: {spec}}}}}}}"
    )
    return [w.message for w in lint_policy(policy)]


def test_lint_warns_on_filters_that_let_params_or_numbers_through() -> None:
    open_ = lint_filter("{field: recipient, allow_patterns: ['+1*'], deny_fields: [attachment]}")
    assert any("has no allow_fields" in m for m in open_), open_
    assert any("without normalize: phone" in m for m in open_), open_
    dead = lint_filter("{field: r, normalize: phone, allow_patterns: ['+1 555*'], "
                       "allow_fields: []}")
    assert dead == ['jsonrpc_param_filters.send: pattern "+1 555*" can never match a '
                    "normalized number (digits and '+' only)"], dead
    assert lint_filter("{field: r, normalize: phone, allow_patterns: ['+1[2-9]*'], "
                       "deny_patterns: ['+1900*'], allow_fields: [message]}") == []


@settings(deadline=None)
@given(st.text(max_size=20))
def test_property_normalized_phone_is_digits_and_plus(value: str) -> None:
    normalized = normalize_phone(value)
    if normalized is not None:
        assert set(normalized) <= set("0123456789+")
        # Only separators were dropped: the digits and pluses keep their order.
        assert normalized == "".join(c for c in value if c in "0123456789+")


@settings(deadline=None)
@given(st.text(alphabet="0123456789 ()-./", max_size=12))
def test_property_a_denied_prefix_is_denied_however_written(rest: str) -> None:
    decision = call(EXAMPLE_POLICY, "send", {"recipient": [f"+1 (900) {rest}"], "message": "x"})
    assert not decision.allow


json_params = st.dictionaries(
    st.sampled_from(["recipient", "recipients", "groupId", "account", "attachment", "message",
                     "id", "emoji"]) | st.text(max_size=5),
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.lists(st.text(max_size=12) | st.integers(), max_size=3),
    max_size=5,
)


@settings(deadline=None)
@given(st.sampled_from(["send", "sendTyping", "sendReceipt", "sendReaction", "getAttachment"]),
       json_params | st.lists(st.integers(), max_size=2) | st.text(max_size=5))
def test_property_the_example_filters_never_raise(method: str, params: Any) -> None:
    decision = call(EXAMPLE_POLICY, method, params)
    assert isinstance(decision, Decision)
