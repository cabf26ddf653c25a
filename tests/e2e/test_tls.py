"""TLS on the agent link, with certificates from trustme; the token handshake stays on top."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trustme

from helpers.deployment import deployment, free_port, start_agent
from helpers.procs import CapturedProcess, wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("agent.default")
    other_ca = trustme.CA()
    paths = {
        "ca": root / "ca.pem",
        "other_ca": root / "other-ca.pem",
        "server": root / "server.pem",
        "client": root / "client.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other_ca.cert_pem.write_to_path(str(paths["other_ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["client"]))
    return {k: str(v) for k, v in paths.items()}


def logs(proc: CapturedProcess, text: str) -> None:
    wait_until(lambda: text in proc.stderr_text(), 10, f"the agent to log {text!r}")


def test_tunnel_over_tls(tmp_path: Path, pki: dict[str, str]) -> None:
    with deployment(
        tmp_path,
        server_args=["--tls-cert", pki["server"], "--tls-key", pki["server"]],
        agent_args=["--tls-ca", pki["ca"]],
    ) as d:
        r = httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version", "id": 1})
        assert r.json()["result"]["version"] == "0.13.x-fake"
        events = httpx.get(d.url("/sse?count=20&interval_ms=1"), timeout=10).text
        assert events.count("id: ") == 20


def test_plaintext_agent_cannot_talk_to_a_tls_server(tmp_path: Path, pki: dict[str, str]) -> None:
    with deployment(
        tmp_path,
        server_args=["--tls-cert", pki["server"], "--tls-key", pki["server"]],
        agent_args=["--link-wait", "0.1"],
        wait=False,
    ) as d:
        assert httpx.get(d.url("/api/v1/check")).status_code == 502
        assert d.agent is not None
        logs(d.agent, "reconnecting")


def test_agent_refuses_a_server_certificate_from_another_ca(
    tmp_path: Path, pki: dict[str, str]
) -> None:
    with deployment(
        tmp_path,
        server_args=["--tls-cert", pki["server"], "--tls-key", pki["server"]],
        agent_args=["--tls-ca", pki["other_ca"], "--link-wait", "0.1"],
        wait=False,
    ) as d:
        assert d.agent is not None
        logs(d.agent, "CERTIFICATE_VERIFY_FAILED")
        assert httpx.get(d.url("/api/v1/check")).status_code == 502


def test_client_certificate_required_when_configured(
    tmp_path: Path, pki: dict[str, str]
) -> None:
    server_args = ["--tls-cert", pki["server"], "--tls-key", pki["server"],
                   "--tls-client-ca", pki["ca"]]
    with deployment(tmp_path, server_args=server_args,
                    agent_args=["--tls-ca", pki["ca"], "--tls-cert", pki["client"],
                                "--tls-key", pki["client"]]) as d:
        assert httpx.get(d.url("/api/v1/check")).status_code == 200
        # Without a client certificate the same agent is turned away.
        d.tool_ports = {"signal-cli": free_port()}
        token = tmp_path / "prober-token"
        token.write_text(f"prober:{d.prober_token}\n")
        agent = start_agent(d, ["--tls-ca", pki["ca"], "--link-wait", "0.1"], token_file=token)
        try:
            assert httpx.get(d.url("/api/v1/check")).status_code == 502
            logs(agent, "reconnecting")
        finally:
            agent.terminate()
            agent.wait()
