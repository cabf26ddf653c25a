"""A whole Carapace deployment on loopback, as real processes, for end-to-end tests.

    with deployment(tmp_path) as d:
        httpx.get(d.url("/api/v1/check"))

starts the test upstream, ``carapace-server`` and ``carapace-agent`` (exposing
the HTTP tool ``signal-cli`` on a local port) and waits, polling with a
deadline, until a request crosses the tunnel.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .procs import (
    CapturedProcess,
    free_port,
    running,
    script,
    start_process,
    stop_process,
    wait_for_port,
)


@dataclass
class Deployment:
    tmp: Path
    token: str
    token_file: Path
    server_token_file: Path
    prober_token: str
    """Token of agent ``prober``, for tests that drive a raw link beside the real agent."""
    policy_file: Path
    server_port: int
    upstream_port: int
    tool_ports: dict[str, int]
    server: CapturedProcess | None = None
    agent: CapturedProcess | None = None
    upstream: CapturedProcess | None = None
    debug_port: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def url(self, path: str = "/", tool: str = "signal-cli") -> str:
        return f"http://127.0.0.1:{self.tool_ports[tool]}{path}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


def default_policy(upstream_port: int, timeout: float = 5) -> str:
    return textwrap.dedent(
        f"""\
        tools:
          signal-cli:
            type: http
            upstream: "http://127.0.0.1:{upstream_port}"
            timeout_secs: {timeout}
        """
    )


def rpc(d: Deployment, method: str, **extra: Any) -> httpx.Response:
    """A JSON-RPC call of ``method`` through the agent's ``signal-cli`` port."""
    return httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": method, "id": 1},
                      timeout=10, **extra)


def wait_until_tunnel_up(url: str, timeout: float = 15.0) -> None:
    """Poll ``url`` through the agent until it answers with something other than 502."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code != 502:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"tunnel not up within {timeout} s: {last}")


def start_server(d: Deployment, args: Sequence[str] = ()) -> CapturedProcess:
    argv = [
        script("carapace-server"),
        "--listen", f"127.0.0.1:{d.server_port}",
        "--policy", str(d.policy_file),
        "--token-file", str(d.server_token_file),
        *args,
    ]
    proc = start_process(argv)
    wait_for_port("127.0.0.1", d.server_port, 15, proc=proc)
    return proc


def start_agent(
    d: Deployment, args: Sequence[str] = (), token_file: Path | None = None,
    server_port: int | None = None,
) -> CapturedProcess:
    argv = [
        script("carapace-agent"),
        "--server", f"127.0.0.1:{server_port or d.server_port}",
        "--token-file", str(token_file or d.token_file),
    ]
    for tool, port in d.tool_ports.items():
        argv += ["--expose", f"{tool}=127.0.0.1:{port}"]
    proc = start_process([*argv, *args])
    for port in d.tool_ports.values():
        wait_for_port("127.0.0.1", port, 15, proc=proc)
    return proc


@contextlib.contextmanager
def deployment(
    tmp: Path,
    *,
    policy: str | None = None,
    server_args: Sequence[str] = (),
    agent_args: Sequence[str] = (),
    tools: Sequence[str] = ("signal-cli",),
    wait: bool = True,
) -> Iterator[Deployment]:
    """Upstream, server and agent on fresh loopback ports; everything stopped on exit.

    ``policy`` is a YAML template in which ``{upstream_port}`` is replaced.
    """
    token = secrets.token_urlsafe(32)
    prober_token = secrets.token_urlsafe(32)
    token_file = tmp / "token"
    token_file.write_text(f"default:{token}\n")
    token_file.chmod(0o600)
    server_tokens = tmp / "server-tokens"
    server_tokens.write_text(f"default:{token}\nprober:{prober_token}\n")
    server_tokens.chmod(0o600)
    upstream_port = free_port()
    policy_file = tmp / "policy.yaml"
    template = policy if policy is not None else default_policy(upstream_port)
    policy_file.write_text(template.replace("{upstream_port}", str(upstream_port)))
    d = Deployment(
        tmp=tmp,
        token=token,
        token_file=token_file,
        server_token_file=server_tokens,
        prober_token=prober_token,
        policy_file=policy_file,
        server_port=free_port(),
        upstream_port=upstream_port,
        tool_ports={tool: free_port() for tool in tools},
    )
    with running(
        [sys.executable, "-m", "carapace.debug.upstream", "--port", str(upstream_port)],
        port=upstream_port,
    ) as upstream:
        d.upstream = upstream
        d.server = start_server(d, server_args)
        try:
            d.agent = start_agent(d, agent_args)
            try:
                if wait:
                    wait_until_tunnel_up(d.url("/api/v1/check", tools[0]))
                yield d
            finally:
                stop_process(d.agent)
                print(d.agent.output())
        finally:
            if d.server is not None:
                stop_process(d.server)
                print(d.server.output())


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
