"""The sans-IO MCP filter with ``tools_approve``: a held call is neither forwarded nor lost."""

from __future__ import annotations

import json
from typing import Any

import pytest

from carapace.server.mcp.filter import DENIED, McpFilter, McpProtocolError
from carapace.server.policy import McpTool, load_policy

POLICY = """
tools:
  gh:
    type: mcp
    command: [/usr/bin/true]
    tools_allow: ["get_*", "echo", "delete_*"]
    tools_deny: ["delete_*"]
    tools_approve: ["echo", "delete_*"]
    timeout_secs: 5
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def req(rid: Any, name: str, **arguments: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                       "params": {"name": name, "arguments": arguments}}).encode() + b"\n"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def filt(clock: Clock) -> McpFilter:
    tool = load_policy(POLICY).tools["gh"]
    assert isinstance(tool, McpTool)
    return McpFilter(tool, clock, max_pending=3)


def test_a_held_call_is_not_forwarded_and_others_pass(filt: McpFilter) -> None:
    to_server, replies = filt.from_client(req(1, "echo", text="hi") + req(2, "get_time"))
    assert json.loads(to_server)["id"] == 2 and replies == b""
    [gated] = filt.take_gated()
    assert (gated.msg_id, gated.name, gated.arguments) == (1, "echo", {"text": "hi"})
    assert gated.decision.needs_approval
    assert filt.take_gated() == [] and "1" in filt.waiting and "1" not in filt.pending


def test_released_call_goes_to_the_server_and_its_timeout_starts_then(
        filt: McpFilter, clock: Clock) -> None:
    filt.from_client(req(1, "echo", text="hi"))
    [gated] = filt.take_gated()
    clock.now += 60  # waited a minute for a person
    line = filt.release(gated)
    assert json.loads(line)["params"]["arguments"] == {"text": "hi"}
    assert filt.next_deadline() == clock.now + 5
    filt.from_server(b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n')
    [record] = filt.records
    assert (record.outcome, record.approval) == ("answered", "approved")


def test_refused_call_gets_carapaces_error(filt: McpFilter) -> None:
    filt.from_client(req("a", "echo"))
    [gated] = filt.take_gated()
    reply = json.loads(filt.refuse(gated, "denied by bob: no", "denied"))
    assert reply == {"jsonrpc": "2.0", "id": "a",
                     "error": {"code": DENIED, "message": "denied by bob: no"}}
    [record] = filt.records
    assert (record.outcome, record.approval) == ("not_approved", "denied")
    assert filt.release(gated) == b"" and filt.refuse(gated, "x", "denied") == b""


def test_a_denied_call_is_not_held(filt: McpFilter) -> None:
    _, replies = filt.from_client(req(1, "delete_everything"))
    assert json.loads(replies)["error"]["code"] == DENIED
    assert filt.take_gated() == [] and not filt.waiting


def test_a_held_id_cannot_be_reused_and_counts_as_pending(filt: McpFilter) -> None:
    filt.from_client(req(1, "echo"))
    with pytest.raises(McpProtocolError):
        filt.from_client(req(1, "get_time"))
    filt.from_client(req(2, "echo") + req(3, "echo"))
    with pytest.raises(McpProtocolError) as err:
        filt.from_client(req(4, "get_time"))
    assert err.value.reason == "too_many_pending"


def test_the_session_ending_records_held_calls_as_withdrawn(filt: McpFilter) -> None:
    filt.from_client(req(1, "echo"))
    filt.session_ended()
    [record] = filt.records
    assert (record.outcome, record.approval) == ("not_approved", "withdrawn")
    assert not filt.waiting and not filt.gated


def test_a_client_cancel_of_a_held_call_is_not_forwarded(filt: McpFilter) -> None:
    filt.from_client(req(7, "echo"))
    [gated] = filt.take_gated()
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
              "params": {"requestId": 7}}
    to_server, replies = filt.from_client(json.dumps(cancel).encode() + b"\n")
    assert (to_server, replies) == (b"", b"")
    assert filt.withdrawn == ["7"]
    filt.refuse(gated, "", "withdrawn", "cancelled")
    [record] = filt.records
    assert (record.outcome, record.approval) == ("cancelled", "withdrawn")
