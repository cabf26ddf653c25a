"""Approvals end to end: real upstream, server, agent and shims; carapace-debug answers.

One deployment serves the module: the ``signal-cli`` tool gates ``send``
(10 s to answer), ``timed`` gates it with 1 s (for the timeout), ``echo`` (a
CLI tool) gates ``gated *``. ``--max-pending-approvals 2`` is the cap, and
``--approval-notify`` appends each notification to a file. Every call that
waits runs in a thread; the test answers it the way an operator would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.deployment import Deployment, deployment
from helpers.procs import free_port, poll, run_debug, script

HOST_SECRET = "hostsecret-" + secrets.token_hex(12)
"""A headers_inject value: a host secret that must not show in a summary."""

POLICY = textwrap.dedent(f"""\
    tools:
      signal-cli:
        type: http
        upstream: "http://127.0.0.1:{{upstream_port}}"
        timeout_secs: 10
        jsonrpc_allow_methods: [version, send, listAccounts]
        jsonrpc_deny_methods: [updateProfile]
        jsonrpc_approve_methods: [send]
        approval: {{timeout_secs: 15}}
        headers_inject:
          X-Upstream-Key: "{HOST_SECRET}"
      timed:
        type: http
        upstream: "http://127.0.0.1:{{upstream_port}}"
        jsonrpc_allow_methods: [version, send]
        jsonrpc_approve_methods: [send]
        approval: {{timeout_secs: 1}}
      echo:
        type: cli
        binary: /bin/echo
        argv_allow_patterns: ["*"]
        approve_patterns: ["gated *"]
        approval: {{timeout_secs: 15}}
    """)


def _install_shims(directory: Path) -> None:
    done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                           str(directory), "echo"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("approvals")
    debug_port = free_port()
    audit_log = tmp / "audit.log"
    notified = tmp / "notified.jsonl"
    sock = tmp / "run" / "agent.sock"
    with deployment(
        tmp, policy=POLICY, tools=("signal-cli", "timed"),
        server_args=["--debug-listen", f"127.0.0.1:{debug_port}", "--audit-log",
                     str(audit_log), "--max-pending-approvals", "2",
                     "--approval-notify", f"cat >> {notified}"],
        agent_args=["--cli-socket", str(sock)],
    ) as d:
        d.debug_port = debug_port
        d.extra.update(audit_log=audit_log, notified=notified, socket=sock, bin=tmp / "bin")
        _install_shims(tmp / "bin")
        yield d


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


# -- helpers -------------------------------------------------------------------------


def debug(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_debug(*args, "--debug", f"127.0.0.1:{d.debug_port}")


def listing(d: Deployment) -> list[dict[str, Any]]:
    """What ``carapace-debug approvals --json`` prints, read from the API (no process per poll)."""
    token = d.extra.get("debug_token")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    doc = httpx.get(f"http://127.0.0.1:{d.debug_port}/debug/approvals", timeout=5,
                    headers=headers).json()
    return [*doc["pending"], *doc["grants"]]


def pending(d: Deployment, tool: str | None = None) -> list[dict[str, Any]]:
    return [p for p in listing(d) if p["kind"] == "pending" and tool in (None, p["tool"])]


def wait_pending(d: Deployment, count: int = 1, tool: str | None = None
                 ) -> list[dict[str, Any]]:
    return poll(lambda: (lambda found: found if len(found) >= count else None)(
        pending(d, tool)), 15, f"{count} pending approval(s)")


def wait_none_pending(d: Deployment) -> None:
    poll(lambda: not pending(d), 15, "no pending approvals")


def call(d: Deployment, method: str, params: Any = None, tool: str = "signal-cli",
         batch: list[dict[str, Any]] | None = None) -> httpx.Response:
    body: Any = batch if batch is not None else {
        "jsonrpc": "2.0", "method": method, "id": 1,
        **({"params": params} if params is not None else {})}
    return httpx.post(d.url("/api/v1/rpc", tool), json=body, timeout=30)


def upstream_calls(d: Deployment, method: str) -> int:
    stats = httpx.get(f"{d.upstream_url}/stats", timeout=5).json()
    return int(stats.get("rpc_calls", {}).get(method, 0))


def audit_records(d: Deployment, event: str) -> list[dict[str, Any]]:
    path = d.extra["audit_log"]
    assert isinstance(path, Path)
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def approval_record(d: Deployment, approval_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in audit_records(d, "approval")
                     if str(r.get("approval_id")) == approval_id), None)
    return poll(find, 10, f"the approval record of {approval_id}")


def in_thread(pool: ThreadPoolExecutor, fn: Callable[[], Any]) -> Future[Any]:
    return pool.submit(fn)


def shim(d: Deployment, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CARAPACE_AGENT_SOCKET": str(d.extra["socket"])}
    return subprocess.Popen([str(Path(str(d.extra["bin"])) / "echo"), *args], env=env,
                            **kwargs)


# -- approve, deny, timeout -------------------------------------------------------------


def test_an_approved_call_reaches_the_upstream_only_after_approval(
        dep: Deployment, pool: ThreadPoolExecutor) -> None:
    before = upstream_calls(dep, "send")
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550001"],
                                                        "message": "hi"}))
    item = wait_pending(dep, tool="signal-cli")[0]
    printed = debug(dep, "approvals", "--json")
    assert printed.returncode == 0, printed.stderr
    doc = json.loads(printed.stdout)
    assert isinstance(doc, list) and [p["id"] for p in doc] == [item["id"]]
    assert set(doc[0]) >= {"id", "agent", "tool", "summary", "waiting_s"}
    assert item["agent"] == "default" and item["tool"] == "signal-cli"
    assert "send" in item["summary"] and "+15550001" in item["summary"]
    assert upstream_calls(dep, "send") == before, "the call ran before anyone approved it"
    assert not future.done()

    done = debug(dep, "approve", item["id"], "--as", "alice", "--reason", "expected")
    assert done.returncode == 0, done.stderr
    response = future.result(timeout=15)
    assert response.status_code == 200, response.text
    assert response.json()["result"]["results"][0]["type"] == "SUCCESS"
    assert upstream_calls(dep, "send") == before + 1

    record = approval_record(dep, item["id"])
    assert record["outcome"] == "approved"
    assert record["by"] == "alice" and record["by_source"] == "operator-asserted"
    assert record["reason"] == "expected" and record["waited_ms"] > 0
    decision = next(r for r in audit_records(dep, "decision")
                    if r["request_id"] == record["request_id"])
    assert decision["decision"] == "allow" and decision["approval_required"] is True
    assert "jsonrpc_approve_methods" in decision["approval_rule"]
    # Written in this order: decision, approval, completion.
    kinds = [r["event"] for r in map(json.loads, Path(str(dep.extra["audit_log"]))
                                     .read_text().splitlines())
             if r.get("request_id") == record["request_id"]]
    assert kinds == ["decision", "approval", "completion"]


def test_a_denied_call_never_reaches_the_upstream(dep: Deployment,
                                                  pool: ThreadPoolExecutor) -> None:
    before = upstream_calls(dep, "send")
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550002"]}))
    item = wait_pending(dep, tool="signal-cli")[0]
    done = debug(dep, "deny", item["id"], "--as", "bob", "--reason", "not today")
    assert done.returncode == 0, done.stderr
    response = future.result(timeout=15)
    assert response.status_code == 403
    assert response.json() == {"error": "not_approved", "message": "denied by bob: not today"}
    assert upstream_calls(dep, "send") == before
    record = approval_record(dep, item["id"])
    assert record["outcome"] == "denied" and record["by"] == "bob"
    # The id is decided now: a second answer is refused with a clear message.
    again = debug(dep, "approve", item["id"])
    assert again.returncode == 1
    assert "no pending approval" in again.stderr


def test_an_unknown_id_is_refused_with_exit_1(dep: Deployment) -> None:
    for command in ("approve", "deny"):
        done = debug(dep, command, "999999")
        assert done.returncode == 1
        assert "no pending approval 999999" in done.stderr


def test_a_call_nobody_answers_times_out(dep: Deployment) -> None:
    before = upstream_calls(dep, "send")
    response = call(dep, "send", {"recipient": ["+15550003"]}, tool="timed")
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "not_approved"
    assert "nobody answered within 1 s" in body["message"]
    assert upstream_calls(dep, "send") == before
    record = next(r for r in reversed(audit_records(dep, "approval"))
                  if r["tool"] == "timed")
    assert record["outcome"] == "timeout" and record["waited_ms"] >= 900


def test_a_denied_call_never_asks_and_an_ungated_call_does_not_wait(dep: Deployment) -> None:
    assert call(dep, "updateProfile", {"name": "x"}).status_code == 403
    assert call(dep, "version").status_code == 200
    assert not pending(dep)


# -- the client going away ------------------------------------------------------------


def _raw_post(d: Deployment, body: dict[str, Any], tool: str = "signal-cli") -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", d.tool_ports[tool]), timeout=10)
    sock.sendall(b"POST /api/v1/rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def test_a_client_that_goes_away_withdraws_its_approval(dep: Deployment) -> None:
    before = upstream_calls(dep, "send")
    sock = _raw_post(dep, {"jsonrpc": "2.0", "method": "send", "id": 7,
                           "params": {"recipient": ["+15550004"]}})
    item = wait_pending(dep)[0]
    sock.close()
    wait_none_pending(dep)
    record = approval_record(dep, item["id"])
    assert record["outcome"] == "withdrawn"
    completion = poll(lambda: next((r for r in audit_records(dep, "completion")
                                    if r["request_id"] == record["request_id"]), None),
                      10, "the completion record")
    assert completion["outcome"] == "cancelled"
    assert debug(dep, "approve", item["id"]).returncode == 1
    assert upstream_calls(dep, "send") == before


def test_pending_approvals_per_agent_are_capped(dep: Deployment) -> None:
    socks = [_raw_post(dep, {"jsonrpc": "2.0", "method": "send", "id": i,
                             "params": {"recipient": [f"+1555010{i}"]}}) for i in range(2)]
    try:
        wait_pending(dep, 2)
        response = call(dep, "send", {"recipient": ["+15550109"]})
        assert response.status_code == 503
        assert response.json()["error"] == "too_many_requests"
        assert "--max-pending-approvals" in response.json()["message"]
        assert len(pending(dep)) == 2
        limits = [r for r in audit_records(dep, "limit")
                  if r["limit"] == "max_pending_approvals"]
        assert limits and limits[-1]["agent"] == "default"
    finally:
        for sock in socks:
            sock.close()
    wait_none_pending(dep)


# -- remembering ----------------------------------------------------------------------


def test_approve_for_remembers_the_same_call_until_it_expires(
        dep: Deployment, pool: ThreadPoolExecutor) -> None:
    params = {"recipient": ["+15550005"], "message": "again"}
    future = in_thread(pool, lambda: call(dep, "send", params))
    item = wait_pending(dep)[0]
    assert debug(dep, "approve", item["id"], "--for", "3").returncode == 0
    assert future.result(timeout=15).status_code == 200

    grants = [g for g in listing(dep) if g["kind"] == "grant"]
    assert len(grants) == 1 and grants[0]["expires_in_s"] > 0
    assert grants[0]["summary"] == item["summary"]
    before = upstream_calls(dep, "send")
    # The same call again (another JSON-RPC id) runs at once; a different one still asks.
    again = httpx.post(dep.url("/api/v1/rpc"), timeout=10, json={
        "jsonrpc": "2.0", "method": "send", "id": 99, "params": params})
    assert again.status_code == 200
    assert upstream_calls(dep, "send") == before + 1
    assert audit_records(dep, "approval")[-1]["outcome"] == "remembered"
    other = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550006"]}))
    other_item = wait_pending(dep)[0]
    assert debug(dep, "deny", other_item["id"]).returncode == 0
    assert other.result(timeout=15).status_code == 403

    # Expired: the grant leaves the listing and the same call asks again.
    poll(lambda: not [g for g in listing(dep) if g["kind"] == "grant"], 15,
         "the grant to expire")
    third = in_thread(pool, lambda: call(dep, "send", params))
    third_item = wait_pending(dep)[0]
    assert debug(dep, "deny", third_item["id"]).returncode == 0
    assert third.result(timeout=15).status_code == 403


def test_a_reload_forgets_remembered_approvals(dep: Deployment,
                                               pool: ThreadPoolExecutor) -> None:
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550007"]}))
    item = wait_pending(dep)[0]
    assert debug(dep, "approve", item["id"], "--for", "600").returncode == 0
    assert future.result(timeout=15).status_code == 200
    assert [g for g in listing(dep) if g["kind"] == "grant"]
    assert dep.server is not None
    dep.server.send_signal(signal.SIGHUP)
    poll(lambda: not [g for g in listing(dep) if g["kind"] == "grant"], 10,
         "the reload to forget the grant")


# -- batches, shims, summaries, notifications -------------------------------------------------


def test_one_gated_call_holds_the_whole_batch(dep: Deployment, pool: ThreadPoolExecutor) -> None:
    versions = upstream_calls(dep, "version")
    batch = [{"jsonrpc": "2.0", "method": "version", "id": 1},
             {"jsonrpc": "2.0", "method": "send", "id": 2,
              "params": {"recipient": ["+15550008"]}}]
    future = in_thread(pool, lambda: call(dep, "", batch=batch))
    item = wait_pending(dep)[0]
    assert item["summary"].startswith("batch of 2: version; send")
    assert upstream_calls(dep, "version") == versions, "part of the batch ran before approval"
    assert debug(dep, "approve", item["id"]).returncode == 0
    answers = future.result(timeout=15).json()
    assert [a["id"] for a in answers] == [1, 2]
    assert upstream_calls(dep, "version") == versions + 1


def test_a_shim_says_it_waits_then_runs_once_approved(dep: Deployment, tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    with err.open("wb") as err_file:
        proc = shim(dep, "gated", "hello", stdout=subprocess.PIPE, stderr=err_file)
    try:
        item = wait_pending(dep, tool="echo")[0]
        assert item["summary"] == "echo gated hello"
        poll(lambda: "waiting for approval on the host" in err.read_text(), 15,
             "the shim's waiting line")
        assert f"(request {item['id']})" in err.read_text()
        assert debug(dep, "approve", item["id"]).returncode == 0
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out == b"gated hello\n"
    assert err.read_text().count("\n") == 1


def test_a_denied_shim_exits_77_and_ctrl_c_withdraws(dep: Deployment) -> None:
    proc = shim(dep, "gated", "no", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    item = wait_pending(dep, tool="echo")[0]
    assert debug(dep, "deny", item["id"], "--as", "carol", "--reason", "no").returncode == 0
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 77 and out == b""
    assert b"denied by carol: no" in err

    proc = shim(dep, "gated", "interrupted", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    item = wait_pending(dep, tool="echo")[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130 and out == b""
    wait_none_pending(dep)
    assert approval_record(dep, item["id"])["outcome"] == "withdrawn"


def test_secrets_are_masked_in_summaries(dep: Deployment, pool: ThreadPoolExecutor) -> None:
    params = {"recipient": ["+15550009"], "message": f"leak {HOST_SECRET}",
              "password": "hunter2-hunter2", "note": "x" * 500}
    future = in_thread(pool, lambda: call(dep, "send", params))
    item = wait_pending(dep)[0]
    try:
        summary = item["summary"]
        assert HOST_SECRET not in summary and "hunter2" not in summary
        assert summary.count("[REDACTED]") == 2
        assert "x" * 81 not in summary and len(summary) <= 420
        notified = Path(str(dep.extra["notified"])).read_text()
        assert HOST_SECRET not in notified and "hunter2" not in notified
    finally:
        debug(dep, "deny", item["id"])
    assert future.result(timeout=15).status_code == 403
    cli = shim(dep, "gated", "--token", "tok-123456789", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    item = wait_pending(dep, tool="echo")[0]
    assert item["summary"] == "echo gated --token '[REDACTED]'"
    debug(dep, "deny", item["id"])
    cli.communicate(timeout=15)


def test_each_new_approval_runs_the_notify_command(dep: Deployment,
                                                   pool: ThreadPoolExecutor) -> None:
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550010"]}))
    item = wait_pending(dep)[0]
    path = Path(str(dep.extra["notified"]))

    def notice() -> dict[str, Any] | None:
        docs = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        return next((doc for doc in docs if doc["id"] == item["id"]), None)

    doc = poll(notice, 10, "the notify command's line")
    assert doc["event"] == "approval_pending" and doc["tool"] == "signal-cli"
    assert doc["approve"] == f"carapace-debug approve {item['id']}"
    debug(dep, "approve", item["id"])
    assert future.result(timeout=15).status_code == 200


def test_metrics_count_approvals_by_outcome(dep: Deployment) -> None:
    text = httpx.get(f"http://127.0.0.1:{dep.debug_port}/metrics", timeout=5).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("carapace_approvals_total", "carapace_approval_wait"))}
    for outcome in ("approved", "denied", "timeout", "withdrawn", "remembered", "refused"):
        assert values[f'carapace_approvals_total{{outcome="{outcome}"}}'] > 0, outcome
    assert values["carapace_approval_wait_seconds_count"] > 0


def test_the_watch_table_and_the_api_behind_the_token(dep: Deployment,
                                                      pool: ThreadPoolExecutor) -> None:
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550011"]}))
    item = wait_pending(dep)[0]
    table = debug(dep, "approvals")
    assert table.returncode == 0
    assert "1 call waiting for approval" in table.stdout and "signal-cli" in table.stdout
    bad = httpx.post(f"http://127.0.0.1:{dep.debug_port}/debug/approvals/{item['id']}/approve",
                     json={"for_secs": -1}, timeout=5)
    assert bad.status_code == 400 and "for_secs" in bad.json()["error"]
    ok = httpx.post(f"http://127.0.0.1:{dep.debug_port}/debug/approvals/{item['id']}/approve",
                    json={"by": "api", "reason": "scripted"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["outcome"] == "approved"
    assert future.result(timeout=15).status_code == 200


# -- a restart fails pending approvals cleanly --------------------------------------------


def test_a_server_shutdown_fails_pending_approvals_at_once(tmp_path: Path,
                                                            pool: ThreadPoolExecutor) -> None:
    debug_port = free_port()
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "debug-token"
    token_file.write_text(token + "\n")
    with deployment(tmp_path, policy=POLICY,
                    server_args=["--debug-listen", f"127.0.0.1:{debug_port}",
                                 "--debug-token-file", str(token_file),
                                 "--drain-timeout", "30"]) as d:
        d.debug_port = debug_port
        d.extra["debug_token"] = token
        future = in_thread(pool, lambda: call(d, "send", {"recipient": ["+15550012"]}))
        item = wait_pending(d)[0]
        # The approval endpoints are behind the debug token like every other.
        base = f"http://127.0.0.1:{debug_port}/debug/approvals"
        assert httpx.get(base, timeout=5).status_code == 401
        assert httpx.post(f"{base}/{item['id']}/approve", timeout=5).status_code == 401
        assert debug(d, "approve", item["id"]).returncode == 2
        assert pending(d), "an unauthorised answer was taken"
        started = time.monotonic()
        assert d.server is not None
        d.server.terminate()
        response = future.result(timeout=20)
        assert time.monotonic() - started < 10, "the shutdown waited for the drain timeout"
        assert response.status_code == 403
        assert response.json()["error"] == "not_approved"
        assert "shutting down" in response.json()["message"]


def test_approvals_watch_json_prints_one_list_per_refresh(dep: Deployment,
                                                          pool: ThreadPoolExecutor) -> None:
    future = in_thread(pool, lambda: call(dep, "send", {"recipient": ["+15550013"]}))
    item = wait_pending(dep)[0]
    watch = subprocess.Popen([script("carapace-debug"), "approvals", "--watch", "--json",
                              "--every", "0.2", "--debug", f"127.0.0.1:{dep.debug_port}"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        first, second = json.loads(watch.stdout.readline()), json.loads(watch.stdout.readline())
        assert [p["id"] for p in first if p["kind"] == "pending"] == [item["id"]]
        assert second[0]["waiting_s"] >= first[0]["waiting_s"]
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=10)
        debug(dep, "deny", item["id"])
    assert watch.returncode == 0
    assert future.result(timeout=15).status_code == 403
