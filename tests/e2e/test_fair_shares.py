"""Fair shares between agents, through real processes: one hostile VM cannot starve another.

One server, two agents (``vm1`` the hog, ``vm2`` the neighbour) with
``NAME:TOKEN`` tokens, small caps set by flag. Each test has vm1 exhaust
something — a tool's ``rate_limit``, CLI processes, upstream connections,
event streams — and checks that vm1 is refused at once with 429 and
``Retry-After`` (the shim: exit 75 and "retry in N s") while vm2 still gets
through, and that everyone together hits the host-wide cap as a 503
``server_busy`` (or the shared ``global_rate_limit``). Each test releases
what it held before it ends, so the next one starts from nothing.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.jsonlines import read_records
from helpers.procs import (
    CapturedProcess,
    free_port,
    poll,
    running,
    script,
    start_process,
    stop_process,
    wait_for_port,
)

AGENTS = ("vm1", "vm2")
HTTP_TOOLS = ("limited", "shared", "slow", "ev1", "ev2", "ev3")
CLI_TOOLS = ("sleep",)

POLICY = """\
tools:
  limited:
    type: http
    upstream: "http://127.0.0.1:UPSTREAM"
    rate_limit: {max_requests: 3, window_secs: 60}
  shared:
    type: http
    upstream: "http://127.0.0.1:UPSTREAM"
    global_rate_limit: {max_requests: 3, window_secs: 60}
  slow: {type: http, upstream: "http://127.0.0.1:UPSTREAM", timeout_secs: 30}
  ev1: {type: http, upstream: "http://127.0.0.1:UPSTREAM"}
  ev2: {type: http, upstream: "http://127.0.0.1:UPSTREAM"}
  ev3: {type: http, upstream: "http://127.0.0.1:UPSTREAM"}
  sleep: {type: cli, binary: /bin/sleep, argv_allow_patterns: ["*"], timeout_secs: 30}
"""

CAPS = [
    "--max-cli-processes-per-agent", "2", "--max-cli-processes", "3",
    "--max-upstream-connections-per-agent", "2", "--max-upstream-connections", "3",
    "--max-sse-streams-per-agent", "2", "--max-sse-streams", "3",
]


@dataclass
class Agent:
    name: str
    proc: CapturedProcess
    ports: dict[str, int]
    socket: Path
    bin: Path

    def url(self, tool: str, path: str = "/api/v1/check") -> str:
        return f"http://127.0.0.1:{self.ports[tool]}{path}"

    def shim_argv(self, tool: str, *args: str) -> tuple[list[str], dict[str, str]]:
        return [str(self.bin / tool), *args], {"CARAPACE_AGENT_SOCKET": str(self.socket),
                                              "PATH": "/usr/bin:/bin"}

    def shim(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv, env = self.shim_argv(tool, *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env)

    def shim_in_background(self, tool: str, *args: str) -> subprocess.Popen[bytes]:
        argv, env = self.shim_argv(tool, *args)
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


@dataclass
class Host:
    tmp: Path
    server: CapturedProcess
    debug: str
    audit: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    def metrics(self) -> str:
        return httpx.get(f"http://{self.debug}/metrics", timeout=5).text

    def in_use(self, limit: str) -> float:
        found = re.search(rf'^carapace_shares_in_use{{limit="{limit}"}} (\S+)$',
                          self.metrics(), re.M)
        assert found is not None, "no carapace_shares_in_use metric"
        return float(found.group(1))

    def wait_in_use(self, limit: str, count: int) -> None:
        poll(lambda: self.in_use(limit) == count, 10, f"{count} {limit} in use")

    def refusals(self, limit: str, scope: str, agent: str) -> float:
        found = re.search(rf'^carapace_share_refusals_total{{agent="{agent}",limit="{limit}",'
                          rf'scope="{scope}"}} (\S+)$', self.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    def decisions(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit) if r.get("event") == "decision"
                and all(r.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("shares")
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
            *CAPS])
        h = Host(tmp, server, f"127.0.0.1:{debug_port}", tmp / "audit.jsonl")
        try:
            wait_for_port("127.0.0.1", server_port, 15, proc=server)
            for name in AGENTS:
                h.agents[name] = start_agent(tmp, server_port, name, tokens[name])
            for agent in h.agents.values():
                poll(lambda a=agent: served(a.url("slow")), 15, f"agent {agent.name}'s tunnel")
            yield h
        finally:
            for agent in h.agents.values():
                stop_process(agent.proc)
                print(agent.proc.output())
            stop_process(server)
            print(server.output())


def start_agent(tmp: Path, server_port: int, name: str, token: str) -> Agent:
    token_file = tmp / f"{name}-token"
    token_file.write_text(f"{name}:{token}\n")
    token_file.chmod(0o600)
    ports = {tool: free_port() for tool in HTTP_TOOLS}
    sock = tmp / f"{name}-run" / "agent.sock"
    argv = [script("carapace-agent"), "--server", f"127.0.0.1:{server_port}",
            "--token-file", str(token_file), "--cli-socket", str(sock), "--link-wait", "0"]
    for tool, port in ports.items():
        argv += ["--expose", f"{tool}=127.0.0.1:{port}"]
    proc = start_process(argv)
    bin_dir = tmp / f"{name}-bin"
    done = subprocess.run([script("carapace-agent"), "shims", "install", "--dir", str(bin_dir),
                           *CLI_TOOLS], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return Agent(name, proc, ports, sock, bin_dir)


def served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert a refusal that tells the client when to come back; return its JSON body."""
    assert r.status_code == status, r.text
    assert r.headers.get("retry-after") is not None and int(r.headers["retry-after"]) >= 1
    body: dict[str, Any] = r.json()
    assert body["error"] == code, body
    return body


@contextlib.contextmanager
def hanging(url: str) -> Iterator[socket.socket]:
    """An HTTP request that the upstream never answers, held open until the block ends."""
    port = int(url.split(":")[2].split("/")[0])
    path = "/" + url.split("/", 3)[3]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield s


def stream_refused(client: httpx.Client, url: str, status: int, code: str) -> dict[str, Any]:
    """Like :func:`refused`, for an event stream (which must not be read if it was not refused)."""
    with client.stream("GET", url) as r:
        assert r.status_code == status, (r.status_code, r.headers)
        r.read()
        return refused(r, status, code)


@contextlib.contextmanager
def event_stream(client: httpx.Client, url: str) -> Iterator[httpx.Response]:
    """An open event stream whose first event has arrived."""
    with client.stream("GET", url) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = r.iter_raw()  # kept: a dropped iterator closes the stream
        next(events)
        yield r


# ------------------------------------------------------------------------- rate limits


def test_one_agent_exhausting_a_tools_rate_limit_leaves_the_other_its_own(host: Host) -> None:
    vm1, vm2 = host.agents["vm1"], host.agents["vm2"]
    for _ in range(3):
        assert httpx.get(vm1.url("limited")).status_code == 200
    body = refused(httpx.get(vm1.url("limited")), 429, "rate_limited")
    assert "each agent" in body["message"]
    for _ in range(3):  # vm2 was not locked out by vm1's calls
        assert httpx.get(vm2.url("limited")).status_code == 200
    refused(httpx.get(vm2.url("limited")), 429, "rate_limited")
    denies = host.decisions(tool="limited", decision="deny")
    assert {r["agent"] for r in denies} == {"vm1", "vm2"}
    assert all(r["rule"] == "tools.limited.rate_limit" for r in denies)


def test_global_rate_limit_is_one_budget_for_all_agents(host: Host) -> None:
    vm1, vm2 = host.agents["vm1"], host.agents["vm2"]
    assert httpx.get(vm1.url("shared")).status_code == 200
    assert httpx.get(vm1.url("shared")).status_code == 200
    assert httpx.get(vm2.url("shared")).status_code == 200
    for agent in (vm2, vm1):
        body = refused(httpx.get(agent.url("shared")), 429, "rate_limited")
        assert "all agents together" in body["message"]
    rules = {r["rule"] for r in host.decisions(tool="shared", decision="deny")}
    assert rules == {"tools.shared.global_rate_limit"}


# ------------------------------------------------------------------------- CLI processes


def test_cli_process_cap_refuses_the_hog_and_then_the_host_is_full(host: Host) -> None:
    vm1, vm2 = host.agents["vm1"], host.agents["vm2"]
    held = [vm1.shim_in_background("sleep", "30") for _ in range(2)]
    try:
        host.wait_in_use("cli_processes", 2)
        over = vm1.shim("sleep", "0")
        assert over.returncode == 75, over.stderr  # EX_TEMPFAIL: 429 too_many_requests
        assert "--max-cli-processes-per-agent" in over.stderr
        assert "retry in 1 s" in over.stderr
        ok = vm2.shim("sleep", "0")  # the neighbour still runs a command
        assert ok.returncode == 0, ok.stderr
        held.append(vm2.shim_in_background("sleep", "30"))
        host.wait_in_use("cli_processes", 3)
        busy = vm2.shim("sleep", "0")  # all three host-wide slots are taken
        assert busy.returncode == 75 and "(--max-cli-processes)" in busy.stderr
        assert host.refusals("cli_processes", "agent", "vm1") >= 1
        assert host.refusals("cli_processes", "host", "vm2") >= 1
        denies = host.decisions(tool="sleep", decision="deny")
        assert {(r["agent"], r["code"], r["retry_after"]) for r in denies} == {
            ("vm1", "too_many_requests", 1), ("vm2", "server_busy", 1)}
    finally:
        for proc in held:
            proc.terminate()
            proc.wait(10)
    host.wait_in_use("cli_processes", 0)
    assert vm1.shim("sleep", "0").returncode == 0  # freed slots are given again


# -------------------------------------------------------------------- upstream connections


def test_upstream_connection_cap_per_agent_and_per_tool(host: Host) -> None:
    vm1, vm2 = host.agents["vm1"], host.agents["vm2"]
    with hanging(vm1.url("slow", "/hang")), hanging(vm1.url("slow", "/hang")):
        host.wait_in_use("upstream_connections", 2)
        body = refused(httpx.get(vm1.url("slow"), timeout=5), 429, "too_many_requests")
        assert "--max-upstream-connections-per-agent" in body["message"]
        assert httpx.get(vm1.url("ev1"), timeout=5).status_code == 200  # another tool
        with hanging(vm2.url("slow", "/hang")):
            host.wait_in_use("upstream_connections", 3)
            body = refused(httpx.get(vm2.url("slow"), timeout=5), 503, "server_busy")
            assert "--max-upstream-connections" in body["message"]
        host.wait_in_use("upstream_connections", 2)
        assert httpx.get(vm2.url("slow"), timeout=5).status_code == 200
    host.wait_in_use("upstream_connections", 0)
    assert host.refusals("upstream_connections", "agent", "vm1") >= 1
    denies = host.decisions(tool="slow", decision="deny")
    assert {(r["agent"], r["code"], r["rule"]) for r in denies} == {
        ("vm1", "too_many_requests", "--max-upstream-connections-per-agent"),
        ("vm2", "server_busy", "--max-upstream-connections")}


# ------------------------------------------------------------------------- event streams


def test_event_stream_cap_refuses_the_hog_and_then_the_host_is_full(host: Host) -> None:
    vm1, vm2 = host.agents["vm1"], host.agents["vm2"]
    sse = "/sse-forever?interval_ms=50"
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as held:
        held.enter_context(event_stream(client, vm1.url("ev1", sse)))
        held.enter_context(event_stream(client, vm1.url("ev2", sse)))
        body = stream_refused(client, vm1.url("ev3", sse), 429, "too_many_requests")
        assert "--max-sse-streams-per-agent" in body["message"]
        assert client.get(vm1.url("ev3")).status_code == 200  # plain requests still pass
        # A client that says it wants a stream is refused before its request goes upstream.
        asked = client.get(vm1.url("ev3", sse), headers={"Accept": "text/event-stream"})
        refused(asked, 429, "too_many_requests")
        early = host.decisions(agent="vm1", tool="ev3", decision="deny")
        assert [r["rule"] for r in early] == ["--max-sse-streams-per-agent"]
        held.enter_context(event_stream(client, vm2.url("ev3", sse)))  # the neighbour's
        host.wait_in_use("sse_streams", 3)
        body = stream_refused(client, vm2.url("ev2", sse), 503, "server_busy")
        assert "--max-sse-streams" in body["message"]
        assert host.refusals("sse_streams", "agent", "vm1") >= 1
        assert host.refusals("sse_streams", "host", "vm2") >= 1
    host.wait_in_use("sse_streams", 0)
    with httpx.Client(timeout=10) as client, event_stream(client, vm1.url("ev3", sse)):
        pass
    assert "refused request" in host.server.stderr_text()  # the log line of an SSE refusal
    # Known to be a stream only once its upstream answered: the completion record says it.
    ended = {(r["agent"], r["status"], r.get("error")) for r in read_records(host.audit)
             if r.get("event") == "completion" and r.get("outcome") == "failed"
             and r.get("tool", "").startswith("ev")}
    assert ended == {("vm1", 429, "too_many_requests"), ("vm2", 503, "server_busy")}
