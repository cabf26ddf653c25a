"""Hot reload through running processes: SIGHUP and ``carapace-server reload``.

A new tool appears, a removed one is denied, a broken file is rejected while
the old policy keeps serving, requests in flight that the new policy allows
finish under the policy they began with (those it denies are ended:
test_reload_revokes.py), and an agent whose token is revoked is cut off within
a second and refused at its next handshake.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake, HandshakeError
from carapace.protocol.messages import Challenge
from helpers.deployment import Deployment, deployment, free_port, start_agent
from helpers.jsonlines import read_records
from helpers.procs import script, stop_process
from helpers.rawlink import RawLink

BASE = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    timeout_secs: 10
"""
EXTRA = """\
  extra:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    timeout_secs: 10
"""


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check``; return how long it took, fail after ``timeout`` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("reload")
    pid_file = tmp / "server.pid"
    with deployment(tmp, policy=BASE, tools=("signal-cli", "extra"),
                    server_args=["--pid-file", str(pid_file),
                                 "--audit-log", str(tmp / "audit.jsonl")]) as d:
        d.extra["pid_file"] = pid_file
        d.extra["template"] = BASE
        yield d
    assert not pid_file.exists(), "the pid file outlived the server"


def write_policy(d: Deployment, text: str) -> None:
    d.policy_file.write_text(text.replace("{upstream_port}", str(d.upstream_port)))


def reload_cli(d: Deployment, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([script("carapace-server"), "reload", *extra], capture_output=True,
                          text=True, timeout=30,
                          env={**os.environ, "CARAPACE_PID_FILE": str(d.extra["pid_file"])})


def hup(d: Deployment) -> dict[str, object]:
    """SIGHUP the server and wait for its reload status (what `reload` prints, minus a
    process start per call)."""
    assert d.server is not None
    status_file = Path(f"{d.extra['pid_file']}.reload")
    before = status_file.read_text() if status_file.exists() else ""
    d.server.send_signal(signal.SIGHUP)
    wait_until(lambda: status_file.exists() and status_file.read_text() != before, 5,
               "the reload status")
    status: dict[str, object] = json.loads(status_file.read_text())
    return status


def test_pid_file_holds_the_server_pid(dep: Deployment) -> None:
    assert dep.server is not None
    assert Path(str(dep.extra["pid_file"])).read_text().strip() == str(dep.server.pid)


def test_new_tool_appears_and_removed_tool_is_denied(dep: Deployment) -> None:
    assert httpx.get(dep.url("/api/v1/check", "extra")).status_code == 403
    write_policy(dep, BASE + EXTRA)
    done = reload_cli(dep)
    assert done.returncode == 0, done.stderr
    assert "reloaded policy" in done.stdout and "(2 tools)" in done.stdout
    assert httpx.get(dep.url("/api/v1/check", "extra")).status_code == 200
    write_policy(dep, BASE)
    assert hup(dep)["ok"] is True
    r = httpx.get(dep.url("/api/v1/check", "extra"))
    assert r.status_code == 403
    assert r.json()["message"] == ("denied by policy: tool 'extra' is not available to agent "
                                   "'default'")


def test_sighup_reloads_too(dep: Deployment) -> None:
    assert dep.server is not None
    write_policy(dep, BASE + EXTRA)
    dep.server.send_signal(signal.SIGHUP)
    wait_until(lambda: httpx.get(dep.url("/api/v1/check", "extra")).status_code == 200, 5,
               "the SIGHUP reload")
    write_policy(dep, BASE)
    dep.server.send_signal(signal.SIGHUP)
    wait_until(lambda: httpx.get(dep.url("/api/v1/check", "extra")).status_code == 403, 5,
               "the second SIGHUP reload")


@pytest.mark.parametrize("broken", [
    "tools: [unclosed",
    "tools:\n  extra:\n    type: http\n    upstream: 'http://x'\n    surprise: 1\n",
    "",
])
def test_broken_policy_is_rejected_and_the_old_one_stays(dep: Deployment, broken: str) -> None:
    assert dep.server is not None
    write_policy(dep, BASE + EXTRA)
    assert hup(dep)["ok"] is True
    dep.policy_file.write_text(broken)
    status = hup(dep)
    assert status["ok"] is False
    message = str(status["message"])
    assert "reload rejected, the previous policy and tokens stay in force" in message
    assert str(dep.policy_file) in message
    wait_until(lambda: "reload rejected" in dep.server.stderr_text(), 5, "the log line")
    # Still serving, still under the old policy (extra allowed).
    assert httpx.get(dep.url("/api/v1/check", "extra")).status_code == 200
    assert dep.server.poll() is None
    write_policy(dep, BASE)
    assert hup(dep)["ok"] is True


def test_unknown_key_is_named_in_the_rejection(dep: Deployment) -> None:
    dep.policy_file.write_text(
        (BASE + "    surprise: 1\n").replace("{upstream_port}", str(dep.upstream_port)))
    done = reload_cli(dep)  # the command line says why, and exits 1
    assert done.returncode == 1 and "tools.signal-cli.surprise" in done.stderr
    assert "reload rejected" in done.stderr
    write_policy(dep, BASE)
    assert hup(dep)["ok"] is True


def test_request_in_flight_finishes_under_the_policy_it_began_with(dep: Deployment) -> None:
    write_policy(dep, BASE + EXTRA)
    assert hup(dep)["ok"] is True
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", dep.url("/slow?delay_ms=1000", "extra")) as slow:
            # The head arrives only after the delay, so the request is mid-flight now.
            write_policy(dep, BASE)
            assert hup(dep)["ok"] is True
            assert httpx.get(dep.url("/api/v1/check", "extra")).status_code == 403
            slow.read()
            assert slow.status_code == 200


def test_reload_without_a_running_server_fails_clearly(tmp_path: Path) -> None:
    missing = subprocess.run([script("carapace-server"), "reload", "--pid-file",
                              str(tmp_path / "none.pid")], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 1
    assert "no carapace-server is running" in missing.stderr
    stale = tmp_path / "stale.pid"
    proc = subprocess.Popen(["sleep", "30"])
    try:
        stale.write_text(f"{proc.pid}\n")
        done = subprocess.run([script("carapace-server"), "reload", "--pid-file", str(stale)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "not a running carapace-server" in done.stderr
        assert proc.poll() is None  # it was not sent SIGHUP (which would have killed it)
    finally:
        proc.kill()
        proc.wait()
    no_flag = subprocess.run([script("carapace-server"), "reload"], capture_output=True,
                             text=True, timeout=30,
                             env={k: v for k, v in os.environ.items()
                                  if k != "CARAPACE_PID_FILE"})
    assert no_flag.returncode == 2 and "--pid-file" in no_flag.stderr


def served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_revoked_token_cuts_the_agent_off_within_a_second(dep: Deployment) -> None:
    """Removing an agent's token and reloading ends its live session at once."""
    assert dep.server is not None
    prober = dep.tmp / "prober-token"
    prober.write_text(f"prober:{dep.prober_token}\n")
    saved, port = dep.tool_ports, free_port()
    dep.tool_ports = {"signal-cli": port}
    try:
        agent = start_agent(dep, ["--link-wait", "0"], token_file=prober)
    finally:
        dep.tool_ports = saved
    url = f"http://127.0.0.1:{port}/api/v1/check"
    tokens = dep.server_token_file.read_text()
    raw_token = secrets.token_urlsafe(32)
    raw = RawLink(dep.server_port, timeout=1.0)
    try:
        # A third agent, "raw", driven by hand: its socket shows exactly when the server
        # cuts it off (the real agent only logs it once its own link task notices).
        dep.server_token_file.write_text(tokens + f"raw:{raw_token}\n")
        assert hup(dep)["ok"] is True
        raw.handshake("raw", raw_token.encode())
        wait_until(lambda: served(url), 10, "the prober agent's link")
        dep.server_token_file.write_text(tokens.replace(f"prober:{dep.prober_token}\n", ""))
        assert "prober" not in dep.server_token_file.read_text()
        start = time.monotonic()
        dep.server.send_signal(signal.SIGHUP)
        assert raw.closed_by_peer(), "the revoked agent's link was not closed within 1 s"
        took = time.monotonic() - start
        print(f"revoked agent's link closed {took * 1000:.0f} ms after SIGHUP")
        assert took < 1.0
        assert not served(url)
        server_log = dep.server.stderr_text()
        assert "token of agent prober was revoked" in server_log
        assert "token of agent raw was revoked" in server_log
        # The real agent's reconnects fail the handshake: the server no longer holds its
        # token (and proves nothing to it); a hand-driven handshake shows the same.
        wait_until(lambda: "agent 'prober'" in dep.server.stderr_text()
                   and "refused our proof" in dep.server.stderr_text(), 5,
                   "the revoked agent's next handshake to fail")
        again = RawLink(dep.server_port)
        try:
            hs = AgentHandshake("raw", raw_token.encode(), os.urandom(NONCE_SIZE))
            again.send(hs.hello())
            challenge = again.receive()
            assert isinstance(challenge, Challenge)
            with pytest.raises(HandshakeError) as refused:
                hs.on_challenge(challenge)
            assert refused.value.code == "auth"
        finally:
            again.close()
        assert not served(url)
        # Everyone else carries on.
        assert httpx.get(dep.url("/api/v1/check")).status_code == 200
    finally:
        raw.close()
        dep.server_token_file.write_text(tokens)
        assert hup(dep)["ok"] is True
        stop_process(agent)
        print(agent.output())


def test_reload_events_are_not_audit_records(dep: Deployment) -> None:
    """Reloads go to the server log; the audit trail holds request records only."""
    audit = dep.tmp / "audit.jsonl"
    for record in read_records(audit):
        assert record["event"] in ("decision", "completion")
