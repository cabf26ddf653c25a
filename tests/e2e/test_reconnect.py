"""The agent's link: reconnects forever, and notices a silent dead link by itself."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from helpers.deployment import deployment, free_port, start_agent, start_server
from helpers.forwarder import Forwarder


def wait_status(url: str, status: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == status:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered {status} within {timeout} s (last: {last})")


def test_agent_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    with deployment(tmp_path, agent_args=["--link-wait", "0"]) as d:
        assert d.server is not None
        d.server.kill()
        d.server.wait()
        wait_status(d.url("/api/v1/check"), 502)
        d.server = start_server(d)
        wait_status(d.url("/api/v1/check"), 200)
        assert d.agent is not None
        assert d.agent.stderr_text().count("connected to the Carapace server") >= 2


def test_silent_dead_link_is_detected_and_replaced(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        forwarder = Forwarder(d.server_port)
        d.tool_ports = {"signal-cli": free_port()}
        prober = tmp_path / "prober-token"
        prober.write_text(f"prober:{d.prober_token}\n")
        agent = start_agent(d, ["--idle-timeout", "1.5", "--link-wait", "0"],
                            server_port=forwarder.port, token_file=prober)
        try:
            wait_status(d.url("/api/v1/check"), 200)
            forwarder.freeze()
            # No FIN, no RST: only the keepalive can tell the link is dead.
            deadline = time.monotonic() + 10
            while "no frame from the server" not in agent.stderr_text():
                assert time.monotonic() < deadline, agent.output()
                time.sleep(0.05)
            forwarder.thaw()
            wait_status(d.url("/api/v1/check"), 200)
            assert forwarder.accepted >= 2
        finally:
            agent.terminate()
            agent.wait()
            print(agent.output())
            forwarder.close()
