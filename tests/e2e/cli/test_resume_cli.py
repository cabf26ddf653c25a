"""A CLI command keeps all its output when the agent's link drops and resumes."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from pathlib import Path

from helpers.forwarder import Forwarder
from helpers.procs import free_port, script, start_process, stop_process

from .conftest import install_shims, policy_yaml, start_agent, wait_until


def test_cli_output_survives_two_link_cuts(tmp_path: Path) -> None:
    wrappers = tmp_path / "host-bin"
    wrappers.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(wrappers, "s3cr3t-" + secrets.token_hex(16)))
    token = tmp_path / "token"
    token.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    port = free_port()
    server = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{port}",
                            "--policy", str(policy), "--token-file", str(token)])
    forwarder = Forwarder(port)
    sock = tmp_path / "run" / "agent.sock"
    agent = start_agent(sock, forwarder.port, token)
    try:
        wait_until(lambda: "connected to the Carapace server" in agent.stderr_text(), 15,
                   "the agent to connect")
        assert install_shims(tmp_path / "bin", ["ticker"]).returncode == 0
        # 150 lines, one every 20 ms: about 3 s of output, cut twice for 1 s.
        proc = subprocess.Popen([str(tmp_path / "bin" / "ticker"), "150", "0.02"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"CARAPACE_AGENT_SOCKET": str(sock), "PATH": "/usr/bin:/bin"})
        lines: list[bytes] = []
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))  # type: ignore[arg-type]
        reader.start()
        for cut_at in (20, 80):
            wait_until(lambda n=cut_at: len(lines) >= n, 20, f"{cut_at} lines")
            with forwarder.outage():
                time.sleep(1)  # the outage itself, not synchronisation
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
        reader.join(10)
        assert lines == [f"tick {i}\n".encode() for i in range(150)]
        assert agent.stderr_text().count("resumed the session") >= 2, agent.output()
    finally:
        stop_process(agent)
        stop_process(server)
        print(agent.output(), server.output())
        forwarder.close()
