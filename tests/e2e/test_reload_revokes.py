"""A reload reaches what is already open: real server, agents, upstream and shims.

After a successful reload, every open request that the new policy would deny
— its tool is gone, its agent's grant was removed, its path is no longer
allowed — is ended at once: the VM gets ``failed`` ``denied`` saying the
policy changed, a process group is killed, and a ``revoked`` audit record
names the rule. What the new policy still allows keeps running untouched.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.deployment import Deployment, deployment, free_port, start_agent
from helpers.jsonlines import read_records
from helpers.procs import CapturedProcess, stop_process, wait_until

from .cli.conftest import HOSTPROC, install_shims, pid_gone, read_pids

# The sleeper writes the host pids of its process group under pytest's /tmp, which a
# confined tool sees neither (private /tmp, own pid namespace); the subject here is
# revocation, not confinement.
POLICY = """\
settings:
  sandbox: none
agents:
  default: {{tools: [signal-cli, extra, sleeper]}}
  prober: {{tools: [signal-cli, extra]}}
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{{upstream_port}}"
    allow_paths: [{paths}]
    timeout_secs: 60
  extra:
    type: http
    upstream: "http://127.0.0.1:{{upstream_port}}"
    timeout_secs: 60
  sleeper:
    type: cli
    binary: "{sleeper}"
    argv_allow_patterns: ["*"]
    timeout_secs: 60
"""
ALL_PATHS = '"GET /api/*", "GET /sse", "GET /sse-forever"'
NO_FOREVER = '"GET /api/*", "GET /sse"'

REVOKE_WITHIN = 5.0
"""Generous for a loaded CI machine; the server acts on the reload itself, without timers."""


def policy(d: Deployment, paths: str = ALL_PATHS, default_tools: str = "signal-cli, extra, "
           "sleeper", without_sleeper: bool = False) -> str:
    text = POLICY.format(paths=paths, sleeper=d.extra["sleeper"])
    text = text.replace("default: {tools: [signal-cli, extra, sleeper]}",
                        f"default: {{tools: [{default_tools}]}}")
    if without_sleeper:
        text = text.split("  sleeper:\n")[0].replace(", sleeper]", "]")
    return text.replace("{upstream_port}", str(d.upstream_port))


def reload_with(d: Deployment, text: str) -> None:
    """Write the policy, SIGHUP the server, wait until it says the reload took."""
    assert d.server is not None
    d.policy_file.write_text(text)
    before = d.server.stderr_text().count("reloaded policy")
    d.server.send_signal(signal.SIGHUP)
    wait_until(lambda: d.server is not None
               and d.server.stderr_text().count("reloaded policy") > before, 10,
               "the reload to be accepted")


class EventReader:
    """Reads one SSE response on a thread: its events' ids, and when it ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids: list[int] = []
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.status: int | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=30))
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self.url) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("id:"):
                        self.ids.append(int(line[3:].strip()))
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended.set()

    def wait_events(self, count: int, timeout: float = 10) -> None:
        wait_until(lambda: len(self.ids) >= count or self.ended.is_set(), timeout,
                   f"{count} events on {self.url}")
        assert len(self.ids) >= count, (self.ids, self.error)

    def close(self) -> None:
        self._client.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("revoke")
    sleeper = tmp / "pidsleep"
    sleeper.write_text(f'#!/bin/sh\nexec python3 {HOSTPROC} pidsleep "$@"\n')
    sleeper.chmod(0o755)
    socket_path = tmp / "run" / "agent.sock"
    template = POLICY.format(paths=ALL_PATHS, sleeper=sleeper)
    debug_port = free_port()
    with deployment(tmp, policy=template, tools=("signal-cli", "extra"),
                    server_args=["--audit-log", str(tmp / "audit.jsonl"),
                                 "--debug-listen", f"127.0.0.1:{debug_port}"],
                    agent_args=["--cli-socket", str(socket_path)]) as d:
        d.extra["sleeper"] = sleeper
        d.debug_port = debug_port
        d.extra["socket"] = socket_path
        shims = install_shims(tmp / "bin", ["sleeper"])
        assert shims.returncode == 0, shims.stderr
        d.extra["bin"] = tmp / "bin"
        yield d


@pytest.fixture
def base(dep: Deployment) -> Iterator[Deployment]:
    """Each test starts, and leaves the server, under the full policy."""
    reload_with(dep, policy(dep))
    yield dep
    reload_with(dep, policy(dep))


def revoked_metric(d: Deployment, kind: str) -> float:
    """``carapace_requests_revoked_total{kind=KIND}`` as the server's /metrics says."""
    text = httpx.get(f"http://127.0.0.1:{d.debug_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'carapace_requests_revoked_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def audit(d: Deployment) -> list[dict[str, Any]]:
    return read_records(d.tmp / "audit.jsonl")


def records_of(d: Deployment, request_id: str) -> list[dict[str, Any]]:
    return [r for r in audit(d) if r.get("request_id") == request_id]


def revoked_records(d: Deployment, path: str | None = None,
                    tool: str | None = None) -> list[dict[str, Any]]:
    """The ``revoked`` records, optionally of the request whose decision had ``path``."""
    records = audit(d)
    wanted = {r["request_id"] for r in records if r.get("event") == "decision"
              and (path is None or r.get("path") == path)
              and (tool is None or r.get("tool") == tool)}
    return [r for r in records if r.get("event") == "revoked" and r["request_id"] in wanted]


def test_open_stream_whose_path_is_no_longer_allowed_ends_with_denied(base: Deployment) -> None:
    d = base
    denied = EventReader(d.url("/sse-forever?interval_ms=50"))
    revoked_before = revoked_metric(d, "http")
    try:
        denied.wait_events(3)
        reload_with(d, policy(d, paths=NO_FOREVER))
        start = time.monotonic()
        assert denied.ended.wait(REVOKE_WITHIN), "the now-denied stream was not ended"
        print(f"revoked stream ended {(time.monotonic() - start) * 1000:.0f} ms after the "
              "reload was logged")
        assert denied.error is None, denied.error
        # A new request for it is denied too, as any would be.
        assert httpx.get(d.url("/sse-forever")).status_code == 403
        # The audit trail: decision, then revoked naming the rule, then the completion.
        revoked = poll_revoked(d, "/sse-forever")
        rid = revoked["request_id"]
        assert revoked["decision"] == "deny" and revoked["code"] == "denied"
        assert revoked["rule"] == "default deny: no tools.signal-cli.allow_paths entry matches"
        assert revoked["agent"] == "default" and revoked["tool"] == "signal-cli"
        wait_until(lambda: any(r["event"] == "completion" for r in records_of(d, rid)), 5,
                   "the completion record")
        events = [r["event"] for r in records_of(d, rid)]
        assert events == ["decision", "revoked", "completion"], events
        completion = records_of(d, rid)[-1]
        assert completion["outcome"] == "cancelled"
        assert "policy changed" in completion["cancelled"]
        assert completion["error"] == "denied"
        assert "revoked request" in d.server.stderr_text()
        assert revoked_metric(d, "http") == revoked_before + 1
    finally:
        denied.close()


def test_still_allowed_stream_keeps_flowing_with_no_event_lost(base: Deployment) -> None:
    """Beside a stream the reload revokes, one it still allows gets every event, in order."""
    d = base
    denied = EventReader(d.url("/sse-forever?interval_ms=50"))
    kept = EventReader(d.url("/sse?count=100&interval_ms=25", "extra"))
    try:
        denied.wait_events(3)
        kept.wait_events(5)
        assert not kept.ended.is_set(), "the allowed stream ended before the reload"
        reload_with(d, policy(d, paths=NO_FOREVER))
        assert denied.ended.wait(REVOKE_WITHIN), "the now-denied stream was not ended"
        assert not kept.ended.is_set(), "the allowed stream was ended with the denied one"
        assert kept.ended.wait(10)
        assert kept.error is None, kept.error
        first = kept.ids[0]
        assert kept.ids == list(range(first, first + len(kept.ids)))
        assert len(kept.ids) >= 100
        assert not revoked_records(d, tool="extra"), "the allowed stream was revoked"
    finally:
        denied.close()
        kept.close()


def poll_revoked(d: Deployment, path: str) -> dict[str, Any]:
    wait_until(lambda: revoked_records(d, path), 5, f"a revoked record for {path}")
    return revoked_records(d, path)[-1]


def test_running_cli_process_is_killed_when_its_tool_is_removed(base: Deployment,
                                                                tmp_path: Path) -> None:
    d = base
    pidfile = tmp_path / "pids"
    revoked_before = revoked_metric(d, "cli")
    shim = subprocess.Popen(
        [str(Path(str(d.extra["bin"])) / "sleeper"), str(pidfile)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin",
                                     "CARAPACE_AGENT_SOCKET": str(d.extra["socket"])})
    try:
        pids = read_pids(pidfile)
        assert all(not pid_gone(pid) for pid in pids)
        reload_with(d, policy(d, without_sleeper=True))
        _, err = shim.communicate(timeout=REVOKE_WITHIN)
        assert shim.returncode == 77, err
        assert b"policy changed" in err, err
        for pid in pids:  # the leader and its grandchild: the whole group
            wait_until(lambda p=pid: pid_gone(p), 10, f"host pid {pid} to be gone")
        revoked = [r for r in revoked_records(d, tool="sleeper")]
        assert revoked, "no revoked record"
        assert revoked[-1]["rule"] == 'default deny: "sleeper" is not in the policy\'s tools'
        rid = revoked[-1]["request_id"]
        wait_until(lambda: any(r["event"] == "completion" for r in records_of(d, rid)), 5,
                   "the completion record")
        completion = records_of(d, rid)[-1]
        assert completion["outcome"] == "cancelled" and completion["host_pid"] == pids[0]
        assert "policy changed" in completion["cancelled"]
        assert revoked_metric(d, "cli") == revoked_before + 1
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


@pytest.fixture
def prober(base: Deployment) -> Iterator[tuple[CapturedProcess, int]]:
    """A second agent, ``prober``, exposing ``extra`` on a port of its own."""
    d = base
    token_file = d.tmp / "prober-token"
    token_file.write_text(f"prober:{d.prober_token}\n")
    saved, port = d.tool_ports, free_port()
    d.tool_ports = {"extra": port}
    try:
        agent = start_agent(d, token_file=token_file)
    finally:
        d.tool_ports = saved
    try:
        wait_until(lambda: _served(f"http://127.0.0.1:{port}/api/v1/check"), 15,
                   "the prober agent's link")
        yield agent, port
    finally:
        stop_process(agent)
        print(agent.output())


def _served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_removed_grant_revokes_that_agents_requests_only(
        base: Deployment, prober: tuple[CapturedProcess, int]) -> None:
    d = base
    _, port = prober
    mine = EventReader(d.url("/sse-forever?interval_ms=50", "extra"))
    theirs = EventReader(f"http://127.0.0.1:{port}/sse-forever?interval_ms=50")
    try:
        mine.wait_events(3)
        theirs.wait_events(3)
        reload_with(d, policy(d, default_tools="signal-cli, sleeper"))
        assert mine.ended.wait(REVOKE_WITHIN), "the agent whose grant was removed kept its stream"
        seen = len(theirs.ids)
        theirs.wait_events(seen + 5)  # still flowing after the reload
        assert not theirs.ended.is_set()
        assert theirs.ids == list(range(theirs.ids[0], theirs.ids[0] + len(theirs.ids)))
        revoked = [r for r in revoked_records(d, tool="extra")]
        assert {r["agent"] for r in revoked} == {"default"}
        assert revoked[-1]["code"] == "not_granted"
        assert "agents.default" in revoked[-1]["rule"]
    finally:
        mine.close()
        theirs.close()


def test_call_waiting_for_its_upstream_is_answered_403_when_its_tool_is_removed(
        base: Deployment) -> None:
    """A plain call whose answer has not come yet gets Carapace's 403 instead, at once."""
    d = base
    answer: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answer.append(
        httpx.get(d.url("/slow?delay_ms=20000", "extra"), timeout=30)), daemon=True)
    caller.start()
    wait_until(lambda: any(r.get("path") == "/slow" and r["event"] == "decision"
                           for r in audit(d)), 10, "the slow call's decision")
    text = policy(d).replace("  extra:\n    type: http\n", "  gone:\n    type: http\n")
    reload_with(d, text.replace("signal-cli, extra", "signal-cli, gone"))
    caller.join(REVOKE_WITHIN)
    assert answer, "the call was not ended"
    assert answer[0].status_code == 403
    body = answer[0].json()
    assert body["message"] == ("the host's policy changed: denied by policy: tool 'extra' is "
                               "not available to agent 'default'")
    revoked = poll_revoked(d, "/slow")
    assert revoked["code"] == "unknown_tool"
