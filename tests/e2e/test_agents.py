"""Per-agent identity and grants, through real processes.

One server, two agents (``alice`` and ``bob``) with their own tokens and
grants: each reaches its own HTTP and CLI tools only, the other's are denied
and audited like any deny, and the agent names show in the audit trail,
``carapace-debug connections``, ``sniff`` and the metrics labels. Removing
or changing an agent's token and reloading (SIGHUP) cuts that agent off —
its live event stream ends and its local requests fail within a second —
and refuses its next handshake, while the other agent carries on.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.jsonlines import json_lines, read_records
from helpers.procs import (
    CapturedProcess,
    free_port,
    running,
    script,
    start_process,
    stop_process,
    wait_until,
)

AGENTS = ("alice", "bob")


@dataclass
class Agent:
    name: str
    token: str
    proc: CapturedProcess
    ports: dict[str, int]
    socket: Path
    bin: Path

    def url(self, tool: str, path: str = "/api/v1/check") -> str:
        return f"http://127.0.0.1:{self.ports[tool]}{path}"

    def shim(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=20, env={"CARAPACE_AGENT_SOCKET": str(self.socket),
                                               "PATH": "/usr/bin:/bin"})


@dataclass
class TwoAgents:
    tmp: Path
    server: CapturedProcess
    server_port: int
    debug: str
    audit: Path
    token_file: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    def audit_records(self) -> list[dict[str, Any]]:
        return read_records(self.audit)


POLICY = """\
agents:
  alice: {tools: [alice-http, alice-cli]}
  bob: {tools: [bob-http, bob-cli]}
tools:
  alice-http: {type: http, upstream: "http://127.0.0.1:UPSTREAM", timeout_secs: 10}
  bob-http: {type: http, upstream: "http://127.0.0.1:UPSTREAM", timeout_secs: 10}
  alice-cli: {type: cli, binary: /bin/echo, argv_allow_patterns: ["*"]}
  bob-cli: {type: cli, binary: /bin/echo, argv_allow_patterns: ["*"]}
"""
HTTP_TOOLS = ("alice-http", "bob-http")
CLI_TOOLS = ("alice-cli", "bob-cli")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoAgents]:
    tmp = tmp_path_factory.mktemp("agents")
    upstream_port = free_port()
    tokens = {name: secrets.token_urlsafe(32) for name in AGENTS}
    token_file = tmp / "server-tokens"
    token_file.write_text("".join(f"{n}:{t}\n" for n, t in tokens.items()))
    token_file.chmod(0o600)
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.replace("UPSTREAM", str(upstream_port)))
    server_port, debug_port = free_port(), free_port()
    with running([sys.executable, "-m", "carapace.debug.upstream", "--port",
                  str(upstream_port)], port=upstream_port):
        server = start_process([
            script("carapace-server"), "--listen", f"127.0.0.1:{server_port}",
            "--policy", str(policy), "--token-file", str(token_file),
            "--debug-listen", f"127.0.0.1:{debug_port}", "--audit-log", str(tmp / "audit.jsonl"),
            "--log-level", "debug"])
        d = TwoAgents(tmp, server, server_port, f"127.0.0.1:{debug_port}", tmp / "audit.jsonl",
                      token_file)
        try:
            for name in AGENTS:
                d.agents[name] = start_agent(d, name, tokens[name])
            for agent in d.agents.values():
                wait_until(lambda a=agent: served(a.url(f"{a.name}-http")), 15,
                           f"agent {agent.name}'s tunnel")
            yield d
        finally:
            for agent in d.agents.values():
                stop_process(agent.proc)
                print(agent.proc.output())
            stop_process(server)
            print(server.output())


def start_agent(d: TwoAgents, name: str, token: str) -> Agent:
    token_file = d.tmp / f"{name}-token"
    token_file.write_text(f"{name}:{token}\n")
    token_file.chmod(0o600)
    ports = {tool: free_port() for tool in HTTP_TOOLS}
    sock = d.tmp / f"{name}-run" / "agent.sock"
    argv = [script("carapace-agent"), "--server", f"127.0.0.1:{d.server_port}",
            "--token-file", str(token_file), "--cli-socket", str(sock), "--link-wait", "0"]
    for tool, port in ports.items():
        argv += ["--expose", f"{tool}=127.0.0.1:{port}"]
    proc = start_process(argv)
    bin_dir = d.tmp / f"{name}-bin"
    done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir", str(bin_dir),
                           *CLI_TOOLS], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return Agent(name, token, proc, ports, sock, bin_dir)


def served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def debug_cli(d: TwoAgents, *args: str) -> Any:
    r = subprocess.run([script("carapace-debug"), *args, "--debug", d.debug, "--json"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def reload(d: TwoAgents) -> float:
    """SIGHUP the server; return when it was sent (time.monotonic)."""
    sent = time.monotonic()
    d.server.send_signal(signal.SIGHUP)
    return sent


# ------------------------------------------------------------------------------ grants


@pytest.mark.parametrize("me,other", [("alice", "bob"), ("bob", "alice")])
def test_each_agent_reaches_its_own_tools_only(two: TwoAgents, me: str, other: str) -> None:
    agent = two.agents[me]
    assert httpx.get(agent.url(f"{me}-http")).status_code == 200
    denied = httpx.get(agent.url(f"{other}-http"))
    assert denied.status_code == 403
    assert denied.json()["message"] == (f"denied by policy: tool '{other}-http' is not "
                                        f"available to agent '{me}'")
    mine = agent.shim(f"{me}-cli", "hello", me)
    assert (mine.returncode, mine.stdout) == (0, f"hello {me}\n")
    theirs = agent.shim(f"{other}-cli", "hello")
    assert theirs.returncode == 77 and theirs.stdout == ""  # EX_NOPERM, and nothing ran
    assert f"not available to agent '{me}'" in theirs.stderr


def test_denies_are_audited_with_the_agent_name(two: TwoAgents) -> None:
    two.agents["alice"].shim("bob-cli", "x")
    httpx.get(two.agents["bob"].url("alice-http"))

    def denies() -> set[tuple[str, str, str]]:
        return {(r["agent"], r["tool"], r["kind"]) for r in two.audit_records()
                if r["event"] == "decision" and r["decision"] == "deny"}

    wait_until(lambda: {("alice", "bob-cli", "cli"), ("bob", "alice-http", "http")} <= denies(),
               5, "the deny records")
    allowed = {(r["agent"], r["tool"]) for r in two.audit_records()
               if r["event"] == "decision" and r["decision"] == "allow"}
    assert {("alice", "alice-http"), ("bob", "bob-http")} <= allowed
    assert all(r["agent"] in AGENTS for r in two.audit_records())


def test_agent_names_in_connections_metrics_and_sniff(two: TwoAgents) -> None:
    connections = debug_cli(two, "connections")
    assert sorted(a["name"] for a in connections["agents"]) == ["alice", "bob"]
    metrics = httpx.get(f"http://{two.debug}/metrics").text
    for me, other in (("alice", "bob"), ("bob", "alice")):
        assert re.search(rf'carapace_requests_total{{[^}}]*agent="{me}"[^}}]*tool="{me}-http"',
                         metrics), metrics
        assert re.search(rf'carapace_denials_total{{[^}}]*agent="{me}"[^}}]*'
                         rf'tool="{other}-(http|cli)"', metrics), metrics
    sniff = start_process([script("carapace-debug"), "sniff", "--json", "--debug", two.debug])
    try:
        seen: set[tuple[str, str]] = set()

        def sniffed() -> bool:
            for name in AGENTS:  # keep making requests until the feed is attached
                httpx.get(two.agents[name].url(f"{name}-http"))
            for rec in json_lines(sniff):
                if rec.get("type") == "http_request":
                    seen.add((rec["agent"], rec["tool"]))
            return {("alice", "alice-http"), ("bob", "bob-http")} <= seen

        wait_until(sniffed, 10, "sniff records of both agents")
    finally:
        stop_process(sniff)


# --------------------------------------------------------------------------- revocation


class EventReader(threading.Thread):
    """Reads an endless event stream; records when each event came and when it ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[float] = []
        self.ended: float | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(5, read=60)) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(time.monotonic())
        except httpx.HTTPError:
            pass
        self.ended = time.monotonic()


def answer_within(url: str, timeout: float) -> int | None:
    """The status of a local request, 599 for a connection error, None if no answer."""
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.TimeoutException:
        return None
    except httpx.HTTPError:
        return 599


def cut_off(two: TwoAgents, victim: str, new_tokens: str) -> dict[str, float | None]:
    """Revoke ``victim`` with ``new_tokens`` and SIGHUP, while both agents have a live stream.

    Returns milliseconds from the SIGHUP to: ``last_event`` (the last event the victim's
    live stream got), ``unserved`` (a new local request of the victim's first got no
    answer within 0.3 s, or an error), ``request_failed`` (a request made right after the
    SIGHUP ended with an error answer; None if it got none within 2.5 s) and
    ``stream_ended`` (the live stream ended; None if it was still open after 3 s).
    """
    agent = two.agents[victim]
    url = agent.url(f"{victim}-http")
    others = [a for a in two.agents.values() if a.name != victim]
    streams = {a.name: EventReader(a.url(f"{a.name}-http", "/sse-forever?interval_ms=20"))
               for a in [agent, *others]}
    for reader in streams.values():
        reader.start()
    wait_until(lambda: all(len(r.events) >= 3 for r in streams.values()), 10, "live streams")
    two.token_file.write_text(new_tokens)
    log_offset = len(two.server.stderr_text())
    sent = reload(two)
    failed: list[float] = []

    def one_request() -> None:
        if answer_within(url, 2.5) not in (None, 200):
            failed.append(time.monotonic())

    probe = threading.Thread(target=one_request, daemon=True)
    probe.start()
    wait_until(lambda: answer_within(url, 0.3) != 200, 10, f"{victim} to be served no more")
    unserved = time.monotonic()
    # Watch for 3 s, measured by the other agents' live streams: they go on meanwhile.
    for other in others:
        n = len(streams[other.name].events)
        wait_until(lambda o=other.name, n=n: len(streams[o].events) > n + 100
                   and time.monotonic() - sent > 3, 10, f"{other.name}'s stream to go on")
        assert streams[other.name].ended is None
        assert httpx.get(other.url(f"{other.name}-http")).status_code == 200
        assert other.shim(f"{other.name}-cli", "still here").stdout == "still here\n"
    probe.join(5)
    # Its next handshakes are refused, and it is served nothing.
    refused = re.compile(rf"agent '{victim}' at \S+ refused our proof|"
                         rf"handshake from \S+ \(agent '{victim}'\) failed")
    wait_until(lambda: refused.search(two.server.stderr_text()[log_offset:]) is not None, 10,
               f"{victim}'s next handshake to be refused")
    assert answer_within(url, 1.0) != 200
    assert agent.shim(f"{victim}-cli", "x").returncode != 0
    mine = streams[victim]
    took: dict[str, float | None] = {
        "last_event": (mine.events[-1] - sent) * 1000,
        "unserved": (unserved - sent) * 1000,
        "request_failed": (failed[0] - sent) * 1000 if failed else None,
        "stream_ended": (mine.ended - sent) * 1000 if mine.ended is not None else None,
    }
    print(f"{victim} after SIGHUP (ms): " + ", ".join(
        f"{k} {'-' if v is None else round(v)}" for k, v in took.items()))
    return took


def check_cut_off(took: dict[str, float | None]) -> None:
    # Nothing reaches the revoked agent any more within a second: no event, no answer.
    assert took["last_event"] is not None and took["last_event"] < 1000
    assert took["unserved"] is not None and took["unserved"] < 1000
    # ... and the VM is told at once: its open request fails and its stream ends,
    # instead of waiting for a resumption that will never come.
    for key in ("request_failed", "stream_ended"):
        ms = took[key]
        assert ms is not None and ms < 1000, (key, took)


def test_a_removed_token_cuts_the_agent_off_within_a_second(two: TwoAgents) -> None:
    took = cut_off(two, "bob", f"alice:{two.agents['alice'].token}\n")
    completions = [r for r in two.audit_records() if r["event"] == "completion"
                   and r["agent"] == "bob" and r["tool"] == "bob-http"]
    assert any(r["outcome"] == "cancelled" for r in completions)
    check_cut_off(took)


def test_a_changed_token_cuts_the_agent_off_too(two: TwoAgents) -> None:
    """Runs after the removal above: bob comes back with a new token and a new agent,
    then alice's token changes under her."""
    bob_token = secrets.token_urlsafe(32)
    two.token_file.write_text(f"alice:{two.agents['alice'].token}\nbob:{bob_token}\n")
    reload(two)
    stop_process(two.agents["bob"].proc)
    two.agents["bob"] = start_agent(two, "bob", bob_token)
    wait_until(lambda: served(two.agents["bob"].url("bob-http")), 15, "bob's new agent")
    check_cut_off(cut_off(two, "alice", f"alice:{secrets.token_urlsafe(32)}\nbob:{bob_token}\n"))
