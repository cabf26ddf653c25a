"""Who may use the debug listener, and what the daemons log (--log-json included)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx

from helpers.deployment import deployment, rpc
from helpers.jsonlines import complete_lines
from helpers.operator import token_file
from helpers.procs import free_port, poll, run_debug, script, start_process, stop_process


def test_non_loopback_debug_listen_without_token_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("tools: {}\n")
    proc = start_process([script("carapace-server"), "--listen", f"127.0.0.1:{free_port()}",
                          "--policy", str(policy), "--token-file", str(tokens),
                          "--debug-listen", f"0.0.0.0:{free_port()}"])
    try:
        assert proc.wait(timeout=15) == 2, proc.output()
        err = proc.stderr_text()
        assert "not a loopback address" in err and "--debug-token-file" in err
        assert "Traceback" not in err
    finally:
        stop_process(proc)


def test_debug_token_is_required_when_configured(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    tfile = token_file(tmp_path, token)
    debug_port = free_port()
    with deployment(tmp_path, server_args=["--debug-listen", f"127.0.0.1:{debug_port}",
                                           "--debug-token-file", str(tfile)]) as d:
        url = f"http://127.0.0.1:{debug_port}"
        for path in ("/debug/health", "/debug/connections", "/metrics", "/debug/sniff"):
            r = httpx.get(url + path, timeout=5)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = httpx.get(url + path, headers={"Authorization": "Bearer wrong-" + token},
                          timeout=5)
            assert r.status_code == 401, path
        r = httpx.get(url + "/debug/health", headers={"Authorization": f"Bearer {token}"},
                      timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        refused = run_debug("health", "--debug", f"127.0.0.1:{debug_port}")
        assert refused.returncode == 2 and "--debug-token-file" in refused.stderr
        ok = run_debug("connections", "--json", "--debug", f"127.0.0.1:{debug_port}",
                       "--debug-token-file", str(tfile))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["agents"][0]["name"] == "default"
        ok = run_debug("health", "--json", "--debug", f"127.0.0.1:{debug_port}",
                       env={"CARAPACE_DEBUG_TOKEN_FILE": str(tfile)})
        assert ok.returncode == 0, ok.stderr
        assert d.server is not None
        assert token not in d.server.stderr_text()


def test_log_json_lines_from_both_daemons(tmp_path: Path) -> None:
    with deployment(tmp_path, server_args=["--log-json"], agent_args=["--log-json"]) as d:
        assert d.server is not None and d.agent is not None
        assert rpc(d, "version").status_code == 200  # the default policy has no JSON-RPC rules
        # a failed handshake: one warning line, as JSON
        import socket

        with socket.create_connection(("127.0.0.1", d.server_port)) as s:
            s.sendall(b"\x00\x00\x00\x03abc")
            s.settimeout(5)
            while s.recv(4096):
                pass
        poll(lambda: "handshake" in d.server.stderr_text(), 5, "the handshake failure line")
        server_lines = complete_lines(d.server.stderr_text())
        agent_lines = complete_lines(d.agent.stderr_text())
    for lines, needle in ((server_lines, "agent default connected"),
                          (agent_lines, "connected to the Carapace server")):
        docs = [json.loads(line) for line in lines]
        for doc in docs:
            assert {"ts", "level", "logger", "message"} <= set(doc)
            assert doc["ts"].endswith("Z")
        assert any(needle in doc["message"] for doc in docs), docs
    failures = [doc for doc in map(json.loads, server_lines)
                if "failed" in doc["message"] and "handshake" in doc["message"]]
    assert len(failures) == 1 and failures[0]["level"] == "warning"
