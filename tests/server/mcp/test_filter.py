"""The sans-IO MCP filter: what passes, what Carapace answers itself, what ends a session."""

from __future__ import annotations

import json
from typing import Any

import pytest

from carapace.server.mcp.filter import DENIED, UNCHECKABLE, McpFilter, McpProtocolError
from carapace.server.policy import Decision, McpTool, load_policy

POLICY = """
tools:
  gh:
    type: mcp
    command: [/usr/bin/true]
    tools_allow: ["get_*", "echo"]
    tools_deny: ["get_secret*"]
    tool_param_filters:
      echo: {field: text, allow_patterns: ["hello*"]}
    resources_allow: ["file:///public/*"]
    prompts_allow: ["greet"]
    timeout_secs: 5
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tool() -> McpTool:
    found = load_policy(POLICY).tools["gh"]
    assert isinstance(found, McpTool)
    return found


def line(msg: Any) -> bytes:
    return json.dumps(msg).encode() + b"\n"


def req(rid: int, method: str, **params: Any) -> bytes:
    return line({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


def lines(data: bytes) -> list[Any]:
    return [json.loads(x) for x in data.splitlines()]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def filt(clock: Clock) -> McpFilter:
    return McpFilter(tool(), clock, max_message_bytes=1024, max_pending=4)


def test_allowed_call_passes_byte_for_byte(filt: McpFilter) -> None:
    data = req(1, "tools/call", name="get_time", arguments={})
    assert filt.from_client(data) == (data, b"")


def test_denied_call_is_answered_with_the_same_id(filt: McpFilter) -> None:
    to_server, replies = filt.from_client(req("a-7", "tools/call", name="get_secret_x"))  # type: ignore[arg-type]
    assert to_server == b""
    [reply] = lines(replies)
    assert reply["id"] == "a-7" and reply["error"]["code"] == DENIED
    assert "host policy" in reply["error"]["message"]
    assert filt.records[0].outcome == "denied" and filt.records[0].subject == "get_secret_x"


def test_param_filter_checks_arguments(filt: McpFilter) -> None:
    assert filt.from_client(req(1, "tools/call", name="echo", arguments={"text": "hello"}))[0]
    _, replies = filt.from_client(req(2, "tools/call", name="echo", arguments={"text": "bye"}))
    assert "arguments.text" in lines(replies)[0]["error"]["message"]


def test_messages_split_across_chunks_and_joined_in_one(filt: McpFilter) -> None:
    data = req(1, "ping") + req(2, "tools/call", name="nope")
    out, replies = filt.from_client(data[:7])
    assert (out, replies) == (b"", b"")
    out, replies = filt.from_client(data[7:])
    assert lines(out) == [json.loads(req(1, "ping"))]
    assert lines(replies)[0]["id"] == 2


def test_list_answers_are_filtered(filt: McpFilter) -> None:
    filt.from_client(req(1, "tools/list"))
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "get_time"}, {"name": "get_secret_key"}, {"name": "delete"}]}}
    [out] = lines(filt.from_server(line(answer)))
    assert [t["name"] for t in out["result"]["tools"]] == ["get_time"]


def test_a_list_answer_of_the_wrong_shape_is_withheld(filt: McpFilter) -> None:
    filt.from_client(req(1, "resources/list"))
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"resources": [{"name": "no uri"}]}}
    [out] = lines(filt.from_server(line(answer)))
    assert out["error"]["code"] == UNCHECKABLE and "result" not in out


def test_an_answer_to_an_id_nobody_asked_passes_unchanged(filt: McpFilter) -> None:
    answer = line({"jsonrpc": "2.0", "id": 99, "result": {"tools": [{"name": "x"}]}})
    assert filt.from_server(answer) == answer


def test_resource_update_notifications_only_for_readable_resources(filt: McpFilter) -> None:
    ok = line({"jsonrpc": "2.0", "method": "notifications/resources/updated",
               "params": {"uri": "file:///public/a"}})
    hidden = line({"jsonrpc": "2.0", "method": "notifications/resources/updated",
                   "params": {"uri": "file:///private/a"}})
    changed = line({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    assert filt.from_server(ok + hidden + changed) == ok + changed


def test_call_records_time_and_size(filt: McpFilter, clock: Clock) -> None:
    filt.from_client(req(1, "tools/call", name="get_time"))
    clock.now += 0.25
    answer = line({"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}})
    filt.from_server(answer)
    [record] = filt.records
    assert (record.outcome, record.duration, record.result_bytes) == ("error", 0.25,
                                                                       len(answer) - 1)


def test_timeout_answers_and_drops_the_late_answer(filt: McpFilter, clock: Clock) -> None:
    filt.from_client(req(1, "tools/call", name="get_time"))
    assert filt.next_deadline() == 105.0
    assert filt.expire() == b""
    clock.now = 105.0
    [reply] = lines(filt.expire())
    assert reply["id"] == 1 and "timeout_secs" in reply["error"]["message"]
    assert filt.from_server(line({"jsonrpc": "2.0", "id": 1, "result": {}})) == b""


def test_rate_limit_hook_can_deny(clock: Clock) -> None:
    def limit(d: Decision) -> Decision:
        return Decision(allow=False, reason="too many", rule="r", code="rate_limited")
    filt = McpFilter(tool(), clock, limit=limit)
    _, replies = filt.from_client(req(1, "tools/call", name="get_time"))
    assert "rate limited" in lines(replies)[0]["error"]["message"]
    assert filt.from_client(req(2, "tools/list"))[0]  # lists are not calls: not limited


@pytest.mark.parametrize("attack,reason", [
    (b"x" * 2000, "too_large"),  # no newline yet: never buffered past the cap
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "' + b"x" * 2000 + b'"}\n',
     "too_large"),
    (b"{nope}\n", "not_jsonrpc"),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}\n', "not_jsonrpc"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}\n', "not_jsonrpc"),
    (b'{"jsonrpc": "2.0", "id": 1}\n', "not_jsonrpc"),
    (b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "ping"}\n', "not_jsonrpc"),
    (b"[1]\n", "not_jsonrpc"),
])
def test_bad_client_input_ends_the_session(filt: McpFilter, attack: bytes, reason: str) -> None:
    with pytest.raises(McpProtocolError) as caught:
        filt.from_client(attack)
    assert caught.value.reason == reason
    assert "the session is closed" in str(caught.value)


def test_too_many_pending_requests_end_the_session(filt: McpFilter) -> None:
    for i in range(4):
        filt.from_client(req(i, "ping"))
    with pytest.raises(McpProtocolError) as caught:
        filt.from_client(req(4, "ping"))
    assert caught.value.reason == "too_many_pending"


def test_a_reused_pending_id_ends_the_session(filt: McpFilter) -> None:
    """Else the list answer could be taken for the ping's, and pass unfiltered."""
    filt.from_client(req(1, "ping"))
    with pytest.raises(McpProtocolError, match="reused request id"):
        filt.from_client(req(1, "tools/list"))


def test_oversized_server_line_ends_the_session(filt: McpFilter) -> None:
    with pytest.raises(McpProtocolError, match="host MCP server"):
        filt.from_server(b"y" * 2000)


def test_cancelled_request_is_not_timed_out_later(filt: McpFilter, clock: Clock) -> None:
    filt.from_client(req(1, "tools/call", name="get_time"))
    note = line({"jsonrpc": "2.0", "method": "notifications/cancelled",
                 "params": {"requestId": 1}})
    assert filt.from_client(note) == (note, b"")
    clock.now += 60
    assert filt.expire() == b""
    assert filt.records[0].outcome == "cancelled"


def test_last_line_without_newline_is_a_message(filt: McpFilter) -> None:
    data = req(1, "ping").rstrip(b"\n")
    assert filt.from_client(data) == (b"", b"")
    assert filt.client_closed() == (data + b"\n", b"")
