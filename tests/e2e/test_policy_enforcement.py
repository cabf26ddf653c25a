"""The attacks a hostile VM tries on the policy, through real upstream, server and agent processes.

Every attack is denied, leaves a decision record in the audit log, and never
reaches the upstream: the upstream's own ``/stats`` (read directly, not
through the tunnel) counts every request it receives, so "unchanged but for
the /stats call itself" proves nothing got through.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from carapace.protocol.messages import CliRequest, HttpRequest, RequestFailed
from helpers.deployment import Deployment, deployment, free_port, start_agent
from helpers.jsonlines import read_records
from helpers.procs import script, stop_process
from helpers.rawlink import RawLink

ANCHORS = Path(__file__).resolve().parents[3] / "shared" / "anchor-policies"
INJECTED = "Bearer " + secrets.token_hex(20)
"""The host-side credential of tool ``api``: the VM must never see it, nor the audit log."""

POLICY = """\
agents:
  default: {tools: [signal-cli, api, limited, quiet, other-type]}
  prober:
    tools: [signal-cli, api]
    rate_limit: {max_requests: 2, window_secs: 60}
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["POST /api/v1/rpc", "GET /api/v1/*"]
    jsonrpc_allow_methods: [send, version]
    jsonrpc_deny_methods: [deleteEverything]
    jsonrpc_param_filters:
      send: {field: recipient, allow_patterns: ["+1*"]}
    timeout_secs: 5
    audit: {log_body: true, redact_patterns: [recipient, recipients]}
  api:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["* /echo*", "GET /hang", "GET /api/v1/check"]
    headers_inject: {Authorization: "INJECTED"}
    timeout_secs: 20
    audit: {log_body: true}
  limited:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["GET /api/v1/check"]
    rate_limit: {max_requests: 3, window_secs: 30}
  quiet:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    allow_paths: ["GET /api/v1/check"]
    audit: {enabled: false}
  private:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
  other-type:
    type: cli
    binary: /bin/true
    argv_allow_patterns: ["*"]
""".replace("INJECTED", INJECTED)

TOOLS = ("signal-cli", "api", "limited", "quiet", "private", "nosuch", "other-type")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("enforce")
    audit = tmp / "audit.jsonl"
    with deployment(tmp, policy=POLICY, tools=TOOLS,
                    server_args=["--audit-log", str(audit)]) as d:
        d.extra["audit"] = audit
        yield d


# ---------------------------------------------------------------------------- helpers


class AuditReader:
    """The records appended to an audit log since this reader was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def records(self) -> list[dict[str, Any]]:
        """Records of requests decided since then (a completion record of an earlier
        request may still land after the reader was made: it is left out)."""
        out, decided = [], set()
        for rec in read_records(self.path, self.offset):
            if rec["event"] == "decision":
                decided.add(rec["request_id"])
            if rec["request_id"] in decided:
                out.append(rec)
        return out

    def wait_for(self, check: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records()
            if check(recs):
                return recs
            if time.monotonic() > deadline:
                raise AssertionError(f"audit records never matched: {recs}")
            time.sleep(0.02)

    def decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "decision"]

    def only_deny(self, **expected: Any) -> dict[str, Any]:
        """The single record written since the reader was made: a deny, with these fields."""
        recs = self.records()
        assert len(recs) == 1, recs
        rec = recs[0]
        assert rec["event"] == "decision" and rec["decision"] == "deny", rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec
        assert re.fullmatch(r"[\w.-]+-[0-9a-f]{8}-\d+", rec["request_id"]), rec
        for key, value in expected.items():
            assert rec[key] == value, (key, rec)
        assert rec["reason"] and rec["rule"], rec
        return rec


def upstream_total(d: Deployment) -> int:
    return int(httpx.get(d.upstream_url + "/stats").json()["total_requests"])


class Guard:
    """Asserts, on exit, that the upstream saw nothing (beyond the two /stats reads)."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.audit = AuditReader(d.extra["audit"])  # type: ignore[arg-type]
        self.before = upstream_total(d)

    def __enter__(self) -> AuditReader:
        return self.audit

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert upstream_total(self.d) == self.before + 1, "a denied request reached upstream"


def rpc(method: str, **params: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params:
        call["params"] = params
    return call


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to a local agent port (httpx would normalise them); the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length:\s*(\d+)", head)
        while match and len(body) < int(match.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ---------------------------------------------------------------------------- JSON-RPC attacks


def test_allowed_call_is_audited_with_decision_then_completion(dep: Deployment) -> None:
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    r = httpx.post(dep.url("/api/v1/rpc"), json=rpc("send", recipient=["+15551234567"],
                                                    message="hi"))
    assert r.status_code == 200, r.text
    recs = audit.wait_for(lambda rs: len(rs) == 2)
    decision, completion = recs
    assert decision["event"] == "decision" and completion["event"] == "completion"
    assert decision["request_id"] == completion["request_id"]
    assert decision["decision"] == "allow" and decision["kind"] == "http"
    assert decision["rule"] == 'tools.signal-cli.jsonrpc_allow_methods[0] "send"'
    # log_body with redact_patterns: the recipients are not in the trail.
    assert decision["body"]["params"] == {"recipient": "[REDACTED]", "message": "hi"}
    assert "5551234567" not in audit.path.read_text()
    assert completion["status"] == 200 and completion["outcome"] == "completed"
    assert completion["bytes_out"] == len(r.content) and completion["bytes_in"] > 0
    assert completion["duration_ms"] >= 0


def test_batch_smuggling_a_denied_method_is_denied(dep: Deployment) -> None:
    batch = [rpc("version"), rpc("deleteEverything")]
    with Guard(dep) as audit:
        r = httpx.post(dep.url("/api/v1/rpc"), json=batch)
        assert r.status_code == 403
        assert "batch call 1" in r.json()["message"]
        rec = audit.only_deny(tool="signal-cli", code="denied", method="POST",
                              path="/api/v1/rpc")
        assert "jsonrpc_deny_methods[0]" in rec["rule"]


def test_second_array_element_of_a_param_filter_is_checked(dep: Deployment) -> None:
    with Guard(dep) as audit:
        r = httpx.post(dep.url("/api/v1/rpc"),
                       json=rpc("send", recipient=["+15551234567", "+447700900123"]))
        assert r.status_code == 403
        rec = audit.only_deny(tool="signal-cli")
        assert "params.recipient[1]" in rec["reason"]
        assert rec["body"]["params"]["recipient"] == "[REDACTED]"


@pytest.mark.parametrize("body", [b"this is not json", b'{"method": "send"', b"\xff\xfe",
                                  b'"send"', b"42", b"null", b"[]", b"[1]",
                                  b'{"method":"version","method":"deleteEverything"}'])
def test_non_json_and_non_object_bodies_are_denied(dep: Deployment, body: bytes) -> None:
    with Guard(dep) as audit:
        r = httpx.post(dep.url("/api/v1/rpc"), content=body,
                       headers={"content-type": "application/json"})
        assert r.status_code == 403, r.text
        rec = audit.only_deny(tool="signal-cli", code="denied")
        assert "JSON-RPC" in rec["rule"] or "JSON" in rec["reason"]


def test_path_not_in_allow_paths_is_denied(dep: Deployment) -> None:
    with Guard(dep) as audit:
        r = httpx.get(dep.url("/stats"))  # the upstream has it; the policy does not
        assert r.status_code == 403
        rec = audit.only_deny(path="/stats", method="GET")
        assert "allow_paths" in rec["rule"]
        r = httpx.delete(dep.url("/api/v1/rpc"))  # right path, wrong method
        assert r.status_code == 403


@pytest.mark.parametrize("target", [
    b"/api/v1/../../stats",
    b"/api/v1/%2e%2e/%2e%2e/stats",
    b"/api/v1/%2E%2E/x",
    b"/api/v1/.%2e/x",
    b"/api/v1//stats",
    b"/api/v1/%2fstats",
    b"/api/v1/%252e%252e/stats",
    b"/api/v1/..;x/stats",
    b"/api/v1/.\\..\\stats",
])
def test_path_traversal_is_denied(dep: Deployment, target: bytes) -> None:
    with Guard(dep) as audit:
        answer = raw_http(dep.tool_ports["signal-cli"],
                          b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 400, answer
        rec = audit.only_deny(code="bad_request", method="GET")
        assert "malformed or unsafe" in rec["rule"]


@pytest.mark.parametrize("header", [
    b"X-Evil: a\rInjected: yes",
    b"X-Evil: a\x00b",
    b"X-Evil: a\x01b",
    b"X-Evil: a\x7fb",
    b"X-Evil\r: a",
    b"X Evil: a",
])
def test_control_characters_in_headers_never_reach_upstream(dep: Deployment,
                                                            header: bytes) -> None:
    """The agent's h11 may refuse these itself (400); either way nothing gets through."""
    with Guard(dep) as audit:
        answer = raw_http(dep.tool_ports["api"],
                          b"GET /echo HTTP/1.1\r\nHost: x\r\n" + header
                          + b"\r\nConnection: close\r\n\r\n")
        assert answer == b"\r\n\r\n" or status_of(answer) == 400, answer
        for rec in audit.records():  # if it got to the server, it was denied and audited
            assert rec["decision"] == "deny" and rec["code"] == "bad_request", rec


def prober_link(d: Deployment) -> RawLink:
    link = RawLink(d.server_port)
    link.handshake("prober", d.prober_token.encode())
    return link


def test_server_refuses_control_characters_even_from_a_hostile_agent(dep: Deployment) -> None:
    """The agent runs in the VM: the server must not rely on its HTTP parser."""
    link = prober_link(dep)
    try:
        with Guard(dep) as audit:
            for n, headers in enumerate([
                ((b"X-Evil", b"a\r\nInjected: yes"),),
                ((b"X-Evil", b"a\nb"),),
                ((b"X-Evil", b"a\x00b"),),
                ((b"X-Ev\ril", b"a"),),
                ((b"Host", b"x\r\n\r\nGET /stats HTTP/1.1"),),
            ], start=1):
                link.send(HttpRequest(id=n, tool="api", method="GET", target="/echo",
                                      headers=headers, body=b""))
                answer = link.receive()
                assert isinstance(answer, RequestFailed), answer
                assert (answer.status, answer.code) == (400, "bad_request")
            for target in ("/echo\r\nX: y", "/echo/../stats", "/ech%00o", "echo"):
                n += 1
                link.send(HttpRequest(id=n, tool="api", method="GET", target=target,
                                      headers=(), body=b""))
                answer = link.receive()
                assert isinstance(answer, RequestFailed) and answer.status == 400, answer
            recs = audit.records()
            assert len(recs) == n
            assert all(r["decision"] == "deny" and r["agent"] == "prober" for r in recs)
    finally:
        link.close()


# ---------------------------------------------------------------------------- headers_inject


def test_injected_header_overrides_the_vm_and_stays_out_of_the_audit(dep: Deployment) -> None:
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    r = httpx.post(dep.url("/echo/x?q=1", "api"), content=b"payload",
                   headers=[("Authorization", "Bearer vm-chosen"),
                            ("authorization", "Basic dm06Y2hvc2Vu"),
                            ("X-Other", "kept")])
    assert r.status_code == 200, r.text
    seen = [(k.lower(), v) for k, v in r.json()["headers"]]
    # Exactly one Authorization reached the upstream, the injected one: the echo that
    # brings it back to the VM is masked (injected secrets are), which shows it was the secret.
    assert [v for k, v in seen if k == "authorization"] == ["[REDACTED]"]
    assert INJECTED not in r.text
    assert ("x-other", "kept") in seen
    assert "vm-chosen" not in r.text
    # Even when the VM echoes the secret back in a logged body and query, the trail
    # carries [REDACTED] (every string of every record is scrubbed).
    secret_hex = INJECTED.split()[1]
    r = httpx.post(dep.url(f"/echo/y?leak={secret_hex}", "api"),
                   json={"note": INJECTED, secret_hex: 1})
    assert r.status_code == 200
    recs = audit.wait_for(lambda rs: len(rs) == 4)
    text = audit.path.read_text()
    assert secret_hex not in text and INJECTED not in text
    second = [r for r in recs if r["event"] == "decision"][1]
    assert second["query"] == "leak=[REDACTED]"
    assert second["body"] == {"note": "[REDACTED]", "[REDACTED]": 1}


# ---------------------------------------------------------------------------- grants and denies


def test_unknown_and_ungranted_tools_look_the_same_to_the_vm(dep: Deployment) -> None:
    with Guard(dep) as audit:
        answers = {tool: httpx.get(dep.url("/api/v1/check", tool))
                   for tool in ("nosuch", "private", "other-type")}
        for tool, r in answers.items():
            assert r.status_code == 403, (tool, r.text)
            assert r.json() == {
                "error": "denied",
                "message": f"denied by policy: tool '{tool}' is not available to agent "
                           "'default'",
            }
        codes = {r["tool"]: r["code"] for r in audit.records()}
        assert codes == {"nosuch": "unknown_tool", "private": "not_granted",
                         "other-type": "wrong_type"}


def test_tool_with_audit_disabled_records_denies_only(dep: Deployment) -> None:
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    assert httpx.get(dep.url("/api/v1/check", "quiet")).status_code == 200
    assert httpx.get(dep.url("/stats", "quiet")).status_code == 403
    recs = audit.wait_for(lambda rs: len(rs) >= 1)
    assert [(r["tool"], r["decision"]) for r in recs] == [("quiet", "deny")]


# ---------------------------------------------------------------------------- rate limits


def test_tool_rate_limit_answers_429_with_retry_after_and_is_audited(dep: Deployment) -> None:
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    for _ in range(3):
        assert httpx.get(dep.url("/api/v1/check", "limited")).status_code == 200
    with Guard(dep):
        r = httpx.get(dep.url("/api/v1/check", "limited"))
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert r.json()["error"] == "rate_limited"
    deny = [rec for rec in audit.records() if rec["decision"] == "deny"]
    assert len(deny) == 1
    assert deny[0]["code"] == "rate_limited" and deny[0]["rule"] == "tools.limited.rate_limit"
    assert deny[0]["retry_after"] == int(r.headers["retry-after"])


def test_per_agent_rate_limit(dep: Deployment) -> None:
    prober = dep.tmp / "prober-token"
    prober.write_text(f"prober:{dep.prober_token}\n")
    saved = dep.tool_ports
    dep.tool_ports = {"signal-cli": free_port(), "api": free_port()}
    try:
        agent = start_agent(dep, token_file=prober)
    finally:
        ports, dep.tool_ports = dep.tool_ports, saved
    try:
        audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while True:  # the first allowed request is the first one the link is up for
            r = httpx.get(f"http://127.0.0.1:{ports['api']}/api/v1/check")
            if r.status_code != 502 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        r = httpx.post(f"http://127.0.0.1:{ports['signal-cli']}/api/v1/rpc", json=rpc("version"))
        assert r.status_code == 200
        # Two requests per minute for this agent, across all its tools.
        r = httpx.get(f"http://127.0.0.1:{ports['api']}/api/v1/check")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        deny = audit.wait_for(lambda rs: any(x["decision"] == "deny" for x in rs))[-1]
        assert deny["agent"] == "prober" and deny["rule"] == "agents.prober.rate_limit"
        # The default agent is not affected.
        assert httpx.get(dep.url("/echo", "api")).status_code == 200
    finally:
        stop_process(agent)


# ---------------------------------------------------------------------------- completion records


def test_sse_completion_counts_events(dep: Deployment) -> None:
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    r = httpx.get(dep.url("/api/v1/events?count=4&interval_ms=1"), timeout=10)
    assert r.status_code == 200
    recs = audit.wait_for(lambda rs: len(rs) == 2)
    assert recs[1]["events"] == 4 and recs[1]["status"] == 200
    assert recs[0]["path"] == "/api/v1/events"
    assert recs[0]["query"] == "count=4&interval_ms=1"  # log_body: on for this tool


def test_decision_is_recorded_before_the_upstream_is_called(dep: Deployment) -> None:
    """A request hanging upstream already has its decision record; the completion
    record comes when the VM gives up, marked cancelled."""
    audit = AuditReader(dep.extra["audit"])  # type: ignore[arg-type]
    before = httpx.get(dep.upstream_url + "/stats").json()["paths"].get("/hang", 0)
    with socket.create_connection(("127.0.0.1", dep.tool_ports["api"]), timeout=5) as sock:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while httpx.get(dep.upstream_url + "/stats").json()["paths"].get("/hang", 0) == before:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        recs = audit.records()
        assert [r["event"] for r in recs] == ["decision"]
        assert recs[0]["path"] == "/hang"
    recs = audit.wait_for(lambda rs: len(rs) == 2)
    assert recs[1]["event"] == "completion" and recs[1]["outcome"] == "cancelled"


# ---------------------------------------------------------------------------- anchor policies


def anchor_policy(recorder: Path) -> str:
    """The three anchor files as one policy, unchanged but for where they point:
    signal-cli's upstream is the test upstream, op's and gog's binary a recorder."""
    signal_cli = (ANCHORS / "signal-cli.yaml").read_text()
    op = (ANCHORS / "1password.yaml").read_text()
    gog = (ANCHORS / "gogcli.yaml").read_text()
    assert '"http://127.0.0.1:18080"' in signal_cli
    assert "binary: /usr/bin/op\n" in op and "binary: /usr/local/bin/gog\n" in gog
    assert op.startswith("tools:\n") and gog.startswith("tools:\n")
    # Unconfined: the recorder and its log live under /tmp, which a confined tool does not
    # share (confinement has its own tests, test_confinement.py).
    return "settings: {sandbox: none}\n" + (
        signal_cli.replace("http://127.0.0.1:18080", "http://127.0.0.1:{upstream_port}")
            + op.replace("/usr/bin/op", str(recorder)).removeprefix("tools:\n")
            + gog.replace("/usr/local/bin/gog", str(recorder)).removeprefix("tools:\n"))


@pytest.fixture(scope="module")
def anchor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not ANCHORS.is_dir():  # the same convention as tests/server/policy/test_load.py
        pytest.skip(f"anchor policies not found at {ANCHORS}")
    tmp = tmp_path_factory.mktemp("anchor")
    calls = tmp / "binary-calls"
    recorder = tmp / "recorder"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n')
    recorder.chmod(0o755)
    sock = tmp / "agent.sock"
    with deployment(tmp, policy=anchor_policy(recorder), wait=False,
                    server_args=["--audit-log", str(tmp / "audit.jsonl")],
                    agent_args=["--cli-socket", str(sock)]) as d:
        d.extra.update(audit=tmp / "audit.jsonl", calls=calls, sock=sock, bin=tmp / "bin")
        deadline = time.monotonic() + 15
        while httpx.post(d.url("/api/v1/rpc"), json=rpc("version")).status_code == 502:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                               str(tmp / "bin"), "op", "gog"], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        yield d


@pytest.mark.parametrize(("call", "allowed"), [
    # "Allow signal-cli operations called by OpenClaw"
    (rpc("version"), True),
    (rpc("send", recipient=["+15551234567"], message="hi"), True),
    (rpc("sendTyping", recipient=["+15551234567"]), True),
    (rpc("sendReceipt", recipient="+15551234567"), True),
    (rpc("sendReaction", recipients=["+15551234567"], emoji="x"), True),
    (rpc("getAttachment", id="abc"), True),
    # "Deny dangerous operations"
    (rpc("deleteEverything"), False),
    (rpc("removeAccount"), False),
    (rpc("unregister"), False),
    # not in the allow list at all
    (rpc("listGroups"), False),
    # "Allow all US numbers": anything else is denied, in every element
    (rpc("send", recipient=["+447700900123"]), False),
    (rpc("send", recipient=["+15551234567", "+447700900123"]), False),
    (rpc("sendTyping", recipient=["+447700900123"]), False),
    (rpc("sendReaction", recipients=["+15551234567", "+33123456789"]), False),
    # "reactions use plural recipients": the singular field does not satisfy the filter
    (rpc("sendReaction", recipient=["+15551234567"]), False),
    ([rpc("version"), rpc("unregister")], False),
])
def test_anchor_signal_cli_policy_decides_as_its_comments_say(
    anchor: Deployment, call: Any, allowed: bool
) -> None:
    audit = AuditReader(anchor.extra["audit"])  # type: ignore[arg-type]
    before = upstream_total(anchor)
    r = httpx.post(anchor.url("/api/v1/rpc"), json=call)
    after = upstream_total(anchor)
    if allowed:
        assert r.status_code == 200, r.text
        assert after == before + 2
    else:
        assert r.status_code == 403, r.text
        assert after == before + 1
        rec = audit.only_deny(tool="signal-cli")
        assert "body" not in rec  # the anchor has log_body: false


OP_CASES = [
    # "Allow read-only operations"
    (("item", "get", "login"), True),
    (("item", "get", "login", "--vault", "Private"), True),
    (("item", "list"), True),
    (("item", "list", "--vault", "Private"), True),
    (("vault", "list"), True),
    (("document", "get", "doc"), True),
    (("--version",), True),
    (("whoami",), True),
    # "Deny write/destructive operations"
    (("item", "create", "x"), False),
    (("item", "edit", "x"), False),
    (("item", "delete", "x"), False),
    (("item", "delete"), False),
    (("vault", "create", "v"), False),
    (("vault", "delete", "v"), False),
    (("document", "create", "d"), False),
    (("document", "edit", "d"), False),
    (("document", "delete", "d"), False),
    # and, by default, everything else
    (("signin",), False),
    (("whoami", "--format", "json"), False),
    (("item get login",), False),
]
GOG_CASES = [
    # "Calendar operations (read + write)", help, "Basic health/auth checks"
    *((tuple(line.split()), True) for line in [
        "calendar", "calendar events primary", "calendar list", "calendar list --max 5",
        "calendar create primary --summary x", "calendar update primary ev1", "calendar colors",
        "--help", "help", "calendar --help", "calendar help", "calendar events --help",
        "--version", "auth list", "auth status", "auth services"]),
    # "Safety belt": destructive calendar operations and auth management
    *((tuple(line.split()), False) for line in [
        "calendar delete primary ev1", "auth add me@example.com", "auth remove me@example.com",
        "auth credentials file.json", "auth tokens list", "auth service-account x"]),
    # "deny-by-default: commands only run if an allow pattern matches"
    *((tuple(line.split()), False) for line in [
        "gmail send", "calendar colors extra", "auth status --verbose", "drive ls"]),
]


@pytest.mark.parametrize(("tool", "cases"), [("op", OP_CASES), ("gog", GOG_CASES)])
def test_anchor_cli_policies_decide_as_their_comments_say(
    anchor: Deployment, tool: str, cases: list[tuple[tuple[str, ...], bool]]
) -> None:
    """Every case through the shim (concurrently: each shim is a process start)."""
    calls: Path = anchor.extra["calls"]  # type: ignore[assignment]
    calls.unlink(missing_ok=True)
    audit = AuditReader(anchor.extra["audit"])  # type: ignore[arg-type]
    env = {"PATH": os.environ["PATH"], "CARAPACE_AGENT_SOCKET": str(anchor.extra["sock"])}
    shim = str(Path(str(anchor.extra["bin"])) / tool)

    def run(argv: tuple[str, ...]) -> int:
        return subprocess.run([shim, *argv], capture_output=True, timeout=30,
                              env=env).returncode

    with ThreadPoolExecutor(8) as pool:
        codes = dict(zip([a for a, _ in cases], pool.map(run, [a for a, _ in cases]),
                         strict=True))
    assert codes == {a: 0 if ok else 77 for a, ok in cases}
    ran = sorted(calls.read_text().splitlines()) if calls.exists() else []
    assert ran == sorted(" ".join(a) for a, ok in cases if ok)  # denied: the binary never ran
    denied = sorted(tuple(r["argv"]) for r in audit.records()
                    if r["event"] == "decision" and r["decision"] == "deny")
    assert denied == sorted(a for a, ok in cases if not ok)  # each audited, argv logged
    assert all(r["tool"] == tool for r in audit.records())


def test_anchor_op_redacts_session_in_the_audit(anchor: Deployment) -> None:
    audit = AuditReader(anchor.extra["audit"])  # type: ignore[arg-type]
    r = subprocess.run([str(anchor.extra["bin"]) + "/op", "item", "get", "x", "--session",
                        "abcdef123456"], capture_output=True, timeout=30,
                       env={"PATH": os.environ["PATH"],
                            "CARAPACE_AGENT_SOCKET": str(anchor.extra["sock"])})
    assert r.returncode == 0, r.stderr
    decision = audit.wait_for(lambda rs: len(rs) >= 1)[0]
    assert decision["argv"] == ["item", "get", "x", "--session", "[REDACTED]"]
    assert "abcdef123456" not in audit.path.read_text()


def test_anchor_policy_gets_a_path_rule_free_pass_only_for_get(anchor: Deployment) -> None:
    """The anchor has no allow_paths (every path open, lint warns) but its JSON-RPC
    rules still apply to any body, on any path."""
    r = httpx.post(anchor.url("/echo"), json=rpc("deleteEverything"))
    assert r.status_code == 403
    r = httpx.post(anchor.url("/echo"), content=b"not json")
    assert r.status_code == 403
    assert httpx.get(anchor.url("/api/v1/check")).status_code == 200


def test_head_of_allowed_answer_passes(dep: Deployment) -> None:
    """Sanity: the guard itself is not what denies (an allowed call reaches upstream)."""
    before = upstream_total(dep)
    assert httpx.post(dep.url("/api/v1/rpc"), json=rpc("version")).status_code == 200
    assert upstream_total(dep) == before + 2


# ---------------------------------------------------------------------------- CLI tools (shims)

CLI_POLICY = """\
agents:
  default: {tools: [signal-cli, op, envdump, where, limited-cli, other-http]}
  prober: {tools: [where]}
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
  other-http:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
  op:
    type: cli
    binary: RECORDER
    argv_allow_patterns: ["item get *", "item list*", "whoami"]
    argv_deny_patterns: ["item delete *"]
    env_inject: {OP_SERVICE_ACCOUNT_TOKEN: "OPTOKEN"}
    audit: {log_argv: true, redact_patterns: ["--session"]}
  envdump:
    type: cli
    binary: /usr/bin/env
    argv_allow_patterns: [""]
    env_passthrough: [MY_VAR]
    env_inject: {TOOL_MODE: host-side}
  where:
    type: cli
    binary: /bin/pwd
    argv_allow_patterns: [""]
    cwd_allowed: [ALLOWED]
  limited-cli:
    type: cli
    binary: /bin/true
    argv_allow_patterns: [""]
    rate_limit: {max_requests: 1, window_secs: 30}
  private-cli:
    type: cli
    binary: /bin/true
    argv_allow_patterns: [""]
"""
CLI_SHIMS = ("op", "envdump", "where", "limited-cli", "private-cli", "nosuch-cli",
             "other-http")
OP_TOKEN = "ops_" + secrets.token_hex(20)


class CliDep:
    def __init__(self, d: Deployment, sock: Path, bin_dir: Path, calls: Path,
                 allowed: Path, outside: Path) -> None:
        self.d, self.sock, self.bin, self.calls = d, sock, bin_dir, calls
        self.allowed, self.outside = allowed, outside
        self.audit = AuditReader(d.extra["audit"])  # type: ignore[arg-type]

    def run(self, tool: str, *args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        base = {"PATH": os.environ["PATH"], "CARAPACE_AGENT_SOCKET": str(self.sock)}
        return subprocess.run([str(self.bin / tool), *args], capture_output=True, timeout=30,
                              cwd=cwd or self.allowed, env={**base, **(env or {})})

    def binary_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliDep]:
    tmp = tmp_path_factory.mktemp("cli-enforce")
    calls = tmp / "binary-calls"
    recorder = tmp / "recorder"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nprintf "%s\\n" "$*"\n')
    recorder.chmod(0o755)
    allowed, outside = tmp / "allowed", tmp / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    # Unconfined, as in anchor_policy: the recorder lives under /tmp.
    policy = ("settings: {sandbox: none}\n"
              + CLI_POLICY.replace("RECORDER", str(recorder)).replace("ALLOWED", str(allowed))
              .replace("OPTOKEN", OP_TOKEN))
    sock = tmp / "agent.sock"
    audit = tmp / "audit.jsonl"
    with deployment(tmp, policy=policy, server_args=["--audit-log", str(audit)],
                    agent_args=["--cli-socket", str(sock)]) as d:
        d.extra["audit"] = audit
        bin_dir = tmp / "bin"
        done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir",
                               str(bin_dir), *CLI_SHIMS], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        yield CliDep(d, sock, bin_dir, calls, allowed, outside)


def test_cli_env_is_clean_base_plus_passthrough_plus_inject(cli: CliDep) -> None:
    r = cli.run("envdump", env={
        "LD_PRELOAD": "/nonexistent/evil.so", "PATH": f"/tmp/evil:{os.environ['PATH']}",
        "GIT_SSH_COMMAND": "sh -c evil", "BASH_ENV": "/tmp/evil.sh", "PYTHONPATH": "/tmp/evil",
        "MY_VAR": "passed through", "TOOL_MODE": "vm-chosen", "HOME": "/home/vm",
    })
    assert r.returncode == 0, r.stderr
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "MY_VAR": "passed through", "TOOL_MODE": "host-side"}
    rec = next(x for x in cli.audit.records() if x["tool"] == "envdump")
    assert rec["decision"] == "allow"
    assert "LD_PRELOAD" not in json.dumps(rec) and "env" not in rec


def test_cli_argument_with_spaces_cannot_pose_as_several(cli: CliDep) -> None:
    before = cli.binary_calls()
    audit = AuditReader(cli.audit.path)
    r = cli.run("op", "item get", "x")  # naive " ".join would read "item get x"
    assert r.returncode == 77, r.stderr
    assert b"denied by policy" in r.stderr
    assert cli.binary_calls() == before  # the binary never ran
    rec = audit.only_deny(tool="op", kind="cli", code="denied")
    assert rec["argv"] == ["item get", "x"]
    assert "argv_allow_patterns" in rec["rule"]
    # Spaces inside one argument are fine where the pattern allows any argument.
    r = cli.run("op", "item", "get", "my login")
    assert r.returncode == 0 and r.stdout == b"item get my login\n", r.stderr


def test_cli_deny_pattern_wins_and_binary_never_runs(cli: CliDep) -> None:
    before = cli.binary_calls()
    audit = AuditReader(cli.audit.path)
    cases = {("item", "delete", "x"): 77, ("item", "delete"): 77, ("vault", "delete", "x"): 77,
             ("item", "get", "a\nb"): 64, ("item", "get", "\x1b[2J"): 64}
    for argv, status in cases.items():
        r = cli.run("op", *argv)
        assert r.returncode == status, (argv, r.stderr)
    assert cli.binary_calls() == before
    recs = audit.records()
    assert len(recs) == len(cases) and all(x["decision"] == "deny" for x in recs)
    assert recs[0]["rule"] == 'tools.op.argv_deny_patterns[0] "item delete *"'



def test_cli_argv_is_audited_with_session_redacted(cli: CliDep) -> None:
    audit = AuditReader(cli.audit.path)
    r = cli.run("op", "item", "get", "x", "--session", "SESSIONTOKEN1",
                "--session=SESSIONTOKEN2", OP_TOKEN)
    assert r.returncode == 0, r.stderr
    decision, completion = audit.wait_for(lambda rs: len(rs) == 2)
    assert decision["argv"] == ["item", "get", "x", "--session", "[REDACTED]",
                                "--session=[REDACTED]", "[REDACTED]"]
    assert decision["vm_claimed_peer_pid"] and decision["vm_claimed_peer_uid"] == os.getuid()
    assert completion["exit_code"] == 0 and completion["outcome"] == "completed"
    assert completion["bytes_out"] == len(r.stdout)
    text = audit.path.read_text()
    assert "SESSIONTOKEN" not in text and OP_TOKEN not in text


def test_cli_cwd_is_enforced_on_the_resolved_path(cli: CliDep) -> None:
    r = cli.run("where", cwd=cli.allowed / "sub")
    assert r.returncode == 0 and r.stdout.decode().strip() == str(cli.allowed / "sub")
    audit = AuditReader(cli.audit.path)
    r = cli.run("where", cwd=cli.outside)
    assert r.returncode == 77 and b"outside cwd_allowed" in r.stderr
    audit.only_deny(tool="where", code="denied")
    r = cli.run("where", cwd=cli.allowed / "escape")  # a symlink out of the allowed tree
    assert r.returncode == 77
    # A hostile agent can claim any path; the server resolves it on the host.
    link = prober_link(cli.d)
    try:
        for n, cwd in enumerate([cli.allowed / "escape", cli.allowed / ".." / "outside",
                                 Path("/"), Path("relative")], start=1):
            link.send(CliRequest(id=n, tool="where", argv=(), cwd=os.fsencode(str(cwd)),
                                 env=(), tty=(False, False, False)))
            answer = link.receive()
            assert isinstance(answer, RequestFailed), (cwd, answer)
            assert answer.status in (400, 403)
    finally:
        link.close()


def test_cli_unknown_and_ungranted_tools_look_the_same(cli: CliDep) -> None:
    audit = AuditReader(cli.audit.path)
    answers = {tool: cli.run(tool) for tool in ("nosuch-cli", "private-cli", "other-http")}
    for tool, r in answers.items():
        assert r.returncode == 77, (tool, r.stderr)
        assert (f"denied by policy: tool '{tool}' is not available to agent 'default'"
                in r.stderr.decode())
    assert {x["tool"]: x["code"] for x in audit.records()} == {
        "nosuch-cli": "unknown_tool", "private-cli": "not_granted", "other-http": "wrong_type"}


def test_cli_rate_limit_exits_75_and_is_audited(cli: CliDep) -> None:
    audit = AuditReader(cli.audit.path)
    assert cli.run("limited-cli").returncode == 0
    r = cli.run("limited-cli")
    assert r.returncode == 75, r.stderr
    assert b"retry in" in r.stderr
    deny = [x for x in audit.records() if x["decision"] == "deny"]
    assert len(deny) == 1 and deny[0]["code"] == "rate_limited"
    assert 1 <= deny[0]["retry_after"] <= 30
