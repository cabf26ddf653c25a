"""The approvals registry, the summaries and the policy keys, on trio's mock clock."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import trio
import trio.testing

from carapace.protocol.messages import CliRequest, HttpRequest
from carapace.protocol.summary import Redactor
from carapace.server.approval_gate import ApprovalGate, call_key, call_summary
from carapace.server.approvals import (
    ApprovalError,
    Approvals,
    Pending,
    TooManyPending,
)
from carapace.server.audit import AuditTrail
from carapace.server.operator_approvals import approvals_response
from carapace.server.policy import PolicyError, decide_cli, decide_http, load_policy

POLICY = """
tools:
  sig:
    type: http
    upstream: http://127.0.0.1:1
    jsonrpc_allow_methods: [send, version]
    jsonrpc_deny_methods: [updateProfile]
    jsonrpc_approve_methods: [send, updateProfile]
    approve_paths: ["/admin/*", "DELETE /things/*"]
    approval: {timeout_secs: 2, remember_secs: 30}
    audit: {redact_patterns: [recipient]}
  gh:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
    argv_deny_patterns: ["pr close *"]
    approve_patterns: ["pr merge *", "pr close *"]
"""


def _open(book: Approvals, agent: str = "vm1", key: str = "k", **extra: Any) -> Pending:
    return book.open(agent=agent, tool="sig", kind="http", summary="send", key=key,
                     request_id="r", rule="rule", **extra)


# -- the registry ------------------------------------------------------------------------


async def test_an_answer_ends_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    pending = _open(book)
    async def operator() -> None:
        await trio.sleep(30)
        book.decide(str(pending.id), approve=True, by="alice")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(operator)
        verdict = await book.wait(pending, 120)
    assert verdict.outcome == "approved" and verdict.by == "alice"
    assert not book.pending
    with pytest.raises(ApprovalError, match="no pending approval"):
        book.decide(str(pending.id), approve=False)


async def test_nobody_answering_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    pending = _open(book)
    start = trio.current_time()
    verdict = await book.wait(pending, 5)
    assert verdict.outcome == "timeout" and "within 5 s" in verdict.reason
    assert trio.current_time() - start == pytest.approx(5)
    assert not book.pending


async def test_a_cancelled_wait_is_withdrawn(autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    pending = _open(book)
    with trio.move_on_after(1):
        await book.wait(pending, 60)
    assert pending.verdict is not None and pending.verdict.outcome == "withdrawn"
    assert not book.pending


async def test_remembered_approvals_expire_on_the_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    pending = _open(book, remember_secs=30)  # the tool's remember_secs applies
    book.decide(str(pending.id), approve=True)
    assert book.remembered("vm1", "sig", "k") is not None
    assert book.remembered("vm2", "sig", "k") is None  # another agent asks for itself
    assert book.remembered("vm1", "sig", "other") is None
    await trio.sleep(29)
    assert book.listing()["grants"][0]["expires_in_s"] == pytest.approx(1)
    await trio.sleep(1)
    assert book.remembered("vm1", "sig", "k") is None
    assert book.listing()["grants"] == []


async def test_for_secs_overrides_remember_and_reload_clears(
        autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    first = _open(book, key="a", remember_secs=30)
    book.decide(str(first.id), approve=True, for_secs=5)
    await trio.sleep(5)
    assert book.remembered("vm1", "sig", "a") is None
    second = _open(book, key="b")
    book.decide(str(second.id), approve=True, for_secs=600)
    assert book.clear_grants() == 1
    assert book.remembered("vm1", "sig", "b") is None
    third = _open(book, key="c")
    book.decide(str(third.id), approve=True)  # no remember_secs, no --for: asks again
    assert book.grants == {}


async def test_a_grant_can_be_revoked(autojump_clock: trio.testing.MockClock) -> None:
    book = Approvals()
    pending = _open(book)
    book.decide(str(pending.id), approve=True, for_secs=60)
    grant_id = book.listing()["grants"][0]["id"]
    assert book.revoke(grant_id).key == "k"
    with pytest.raises(ApprovalError):
        book.revoke(grant_id)


def test_the_cap_counts_per_agent() -> None:
    book = Approvals(max_pending=2, clock=lambda: 0.0)
    _open(book)
    _open(book)
    with pytest.raises(TooManyPending, match="2 calls waiting"):
        _open(book)
    _open(book, agent="vm2")  # another agent is not held back


def test_shutdown_fails_every_pending_approval_and_every_later_one() -> None:
    book = Approvals(clock=lambda: 0.0)
    pending = _open(book)
    assert book.fail_all("stopping") == 1
    assert pending.verdict is not None and pending.verdict.outcome == "shutdown"
    assert pending.event.is_set()
    late = _open(book)
    assert late.verdict is not None and late.verdict.outcome == "shutdown"


def test_the_operator_endpoints_validate_their_input() -> None:
    book = Approvals(clock=lambda: 0.0)
    pending = _open(book)
    status, doc, _ = approvals_response(book, "POST", f"/debug/approvals/{pending.id}/approve",
                                        b'{"for_secs": "soon"}')
    assert status == 400 and "for_secs" in doc["error"]
    status, doc, _ = approvals_response(book, "POST", f"/debug/approvals/{pending.id}/deny",
                                        b'{"by": "x", "evil": 1}')
    assert status == 400 and "evil" in doc["error"]
    status, doc, _ = approvals_response(book, "POST", "/debug/approvals/abc/deny", b"")
    assert status == 404 and "not an approval id" in doc["error"]
    status, doc, _ = approvals_response(book, "GET", f"/debug/approvals/{pending.id}/deny", b"")
    assert status == 405
    status, doc, _ = approvals_response(
        book, "POST", f"/debug/approvals/{pending.id}/deny",
        json.dumps({"by": "eve\nforged line", "reason": "r" * 900}).encode())
    assert status == 200 and doc["by"] == "eve forged line" and len(doc["reason"]) == 500


async def test_a_failing_notify_command_is_logged_and_never_holds_anything(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[bytes] = []

    class Done:
        returncode = 3
        stderr = b"no route to ntfy"

    async def run_process(argv: list[str], *, stdin: bytes, **_: Any) -> Done:
        calls.append(stdin)
        return Done()

    book = Approvals()
    gate = ApprovalGate(book, AuditTrail(None), metrics=None,  # type: ignore[arg-type]
                        secrets=lambda: [], notify_command="ntfy", run_process=run_process)
    with caplog.at_level(logging.WARNING, logger="carapace.server"):
        async with trio.open_nursery() as nursery:
            gate.nursery = nursery
            pending = _open(book)
        assert json.loads(calls[0])["id"] == str(pending.id)
    assert "exited with status 3: no route to ntfy" in caplog.text


# -- what the operator is shown ---------------------------------------------------------


def test_summaries_mask_secrets_and_cut_long_values() -> None:
    policy = load_policy(POLICY)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "send", "params": {
        "recipient": ["+1555"], "apiToken": "tok", "message": "has SECRET-VALUE-1 inside",
        "long": "y" * 300}}).encode()
    req = HttpRequest(id=1, tool="sig", method="POST", target="/rpc", headers=(), body=body)
    text = call_summary(req, policy.tools["sig"], Redactor([b"SECRET-VALUE-1"], limit=400))
    assert "+1555" not in text and "tok" not in text and "SECRET-VALUE-1" not in text
    assert text.count("[REDACTED]") == 3
    assert "y" * 81 not in text
    cli = CliRequest(id=2, tool="gh", argv=(b"pr", b"merge", b"--password=abc", b"-t", b"1"),
                     cwd=b"/", env=(), tty=(False, False, False))
    shown = call_summary(cli, policy.tools["gh"], Redactor())
    assert shown == "gh pr merge '--password=[REDACTED]' -t 1"


def test_the_call_key_ignores_jsonrpc_ids_but_not_params() -> None:
    def req(rid: int, params: Any) -> HttpRequest:
        body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "send", "params": params})
        return HttpRequest(id=rid, tool="sig", method="POST", target="/rpc", headers=(),
                           body=body.encode())

    assert call_key(req(1, {"a": 1, "b": 2})) == call_key(req(2, {"b": 2, "a": 1}))
    assert call_key(req(1, {"a": 1})) != call_key(req(1, {"a": 2}))


# -- the policy keys ----------------------------------------------------------------------


def test_the_policy_marks_calls_that_wait_and_denials_never_ask() -> None:
    policy = load_policy(POLICY)

    def rpc(doc: Any) -> Any:
        return decide_http(policy, "vm1", "sig", "POST", "/rpc", [], json.dumps(doc).encode())

    assert rpc({"method": "send"}).needs_approval
    assert not rpc({"method": "version"}).needs_approval
    denied = rpc({"method": "updateProfile"})  # denied first: approve lists cannot allow
    assert not denied.allow and not denied.needs_approval
    batch = rpc([{"method": "version"}, {"method": "send"}])
    assert batch.allow and "jsonrpc_approve_methods[0]" in batch.approval
    assert decide_http(policy, "vm1", "sig", "GET", "/admin/x", [], b"").needs_approval
    assert not decide_http(policy, "vm1", "sig", "GET", "/things/1", [], b"").needs_approval
    merge = decide_cli(policy, "vm1", "gh", [b"pr", b"merge", b"1"], b"/", [])
    assert merge.needs_approval and "approve_patterns[0]" in merge.approval
    assert not decide_cli(policy, "vm1", "gh", [b"pr", b"close", b"1"], b"/", []).allow
    assert merge.as_dict()["approval"] == merge.approval
    tool = policy.tools["sig"]
    assert tool.approval.timeout_secs == 2 and tool.approval.remember_secs == 30


@pytest.mark.parametrize(("snippet", "message"), [
    ("approval: {timeout_secs: 0}", "approval.timeout_secs"),
    ("approval: {remember_secs: -1}", "approval.remember_secs"),
    ("approval: {wait: 3}", "unknown key"),
    ("approve_paths: [\"POST\"]", "approve_paths[0]"),
    ("approve_patterns: [\"x\"]", "belongs to cli tools"),
])
def test_bad_approval_keys_are_errors_that_name_them(snippet: str, message: str) -> None:
    text = f"tools:\n  sig:\n    type: http\n    upstream: http://127.0.0.1:1\n    {snippet}\n"
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(text)


def test_lint_warns_about_an_approve_method_that_is_denied() -> None:
    from carapace.server.policy import lint_policy

    warnings = [w.message for w in lint_policy(load_policy(POLICY))]
    assert any("jsonrpc_approve_methods lists \"updateProfile\"" in w for w in warnings)
    assert not any("\"send\", which is denied" in w for w in warnings)


async def test_notify_commands_are_bounded_and_killed_when_slow(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    from carapace.server.approval_gate import MAX_NOTIFY_RUNNING, NOTIFY_TIMEOUT

    started: list[int] = []

    async def hang(argv: list[str], **_: Any) -> None:
        started.append(1)
        await trio.sleep_forever()

    book = Approvals(max_pending=100)
    gate = ApprovalGate(book, AuditTrail(None), metrics=None,  # type: ignore[arg-type]
                        secrets=lambda: [], notify_command="page-me", run_process=hang)
    with caplog.at_level(logging.WARNING, logger="carapace.server"):
        async with trio.open_nursery() as nursery:
            gate.nursery = nursery
            for i in range(MAX_NOTIFY_RUNNING + 4):
                _open(book, key=str(i))
            await trio.testing.wait_all_tasks_blocked()
            assert len(started) == MAX_NOTIFY_RUNNING
            start = trio.current_time()
        assert trio.current_time() - start == pytest.approx(NOTIFY_TIMEOUT)
    assert "this one is skipped" in caplog.text and "killed" in caplog.text
    _open(book, key="after")  # the slots are free again
    assert gate._notifying == 0
