"""Bad input on the server's agent port: the offender is cut off, everyone else carries on."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carapace.protocol.framing import encode
from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake
from carapace.protocol.messages import (
    Challenge,
    Credit,
    Hello,
    Ping,
    Pong,
    Reject,
    Welcome,
)
from helpers.deployment import Deployment, deployment, free_port, start_agent
from helpers.rawlink import RawLink

POLICY = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    timeout_secs: 1
  nowhere:
    type: http
    upstream: "http://127.0.0.1:PORT"
""".replace("PORT", str(free_port()))


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("hostile"), policy=POLICY,
                    server_args=["--handshake-timeout", "0.5"],
                    tools=("signal-cli", "nowhere")) as d:
        yield d


def still_serving(d: Deployment) -> None:
    r = httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": "version", "id": 1})
    assert r.status_code == 200, r.text
    assert d.server is not None and d.server.poll() is None


def test_garbage_bytes_close_only_that_connection(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    link.send_raw(os.urandom(4096))
    assert link.closed_by_peer()
    still_serving(dep)


def test_huge_length_prefix_is_refused_before_the_payload(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    link.send_raw(struct.pack(">I", 0xFFFFFFFF))
    assert link.closed_by_peer()
    still_serving(dep)


def test_malformed_msgpack_after_handshake(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    link.handshake("prober", dep.prober_token.encode())
    link.send_raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert link.closed_by_peer()
    still_serving(dep)


def test_second_handshake_closes_the_link(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    link.handshake("prober", dep.prober_token.encode())
    link.send(Hello(versions=(1,), agent="default", nonce=os.urandom(NONCE_SIZE)))
    assert link.closed_by_peer()
    still_serving(dep)


def test_frame_for_unknown_request_is_dropped_and_link_lives(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    link.handshake("prober", dep.prober_token.encode())
    link.send(Credit(id=999_999, amount=100))
    link.send(Ping(nonce=42))
    while True:
        msg = link.receive()
        assert msg is not None, "server closed the link"
        if isinstance(msg, Pong):
            assert msg.nonce == 42
            break
    link.close()
    still_serving(dep)


def test_stalled_handshake_is_closed_by_the_timeout(dep: Deployment) -> None:
    link = RawLink(dep.server_port, timeout=10)
    start = time.monotonic()
    assert link.closed_by_peer()
    assert time.monotonic() - start < 5
    still_serving(dep)


def test_wrong_token_is_rejected_and_never_welcomed(dep: Deployment) -> None:
    link = RawLink(dep.server_port)
    hs = AgentHandshake("default", b"not-the-token-at-all!", os.urandom(NONCE_SIZE))
    link.send(hs.hello())
    challenge = link.receive()
    assert isinstance(challenge, Challenge)
    # The server's proof does not verify under the wrong token...
    with pytest.raises(Exception, match="could not prove"):
        hs.on_challenge(challenge)
    # ...and a forged auth from us is refused.
    forged = AgentHandshake("default", b"not-the-token-at-all!", os.urandom(NONCE_SIZE))
    link2 = RawLink(dep.server_port)
    link2.send(forged.hello())
    c2 = link2.receive()
    assert isinstance(c2, Challenge)
    from carapace.protocol.handshake import agent_proof, transcript
    from carapace.protocol.messages import Auth

    script = transcript(c2.version, "default", forged.hello().nonce, c2.nonce)
    link2.send(Auth(proof=agent_proof(b"not-the-token-at-all!", script)))
    answer = link2.receive()
    assert isinstance(answer, Reject) and answer.code == "auth"
    assert not isinstance(link2.receive(), Welcome)
    still_serving(dep)


def test_replayed_auth_is_refused(dep: Deployment) -> None:
    first = RawLink(dep.server_port)
    hs = AgentHandshake("default", dep.token.encode(), os.urandom(NONCE_SIZE))
    first.send(hs.hello())
    challenge = first.receive()
    assert isinstance(challenge, Challenge)
    auth = hs.on_challenge(challenge)
    first.close()
    # Replay the same hello and auth on a new link: the server's nonce is fresh.
    second = RawLink(dep.server_port)
    second.send(hs.hello())
    assert isinstance(second.receive(), Challenge)
    second.send(auth)
    answer = second.receive()
    assert isinstance(answer, Reject) and answer.code == "auth"
    still_serving(dep)


def test_unreachable_upstream_is_a_clear_502(dep: Deployment) -> None:
    r = httpx.get(dep.url("/anything", tool="nowhere"))
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unavailable"
    assert "nowhere" in r.json()["message"]


def test_upstream_timeout_is_a_504(dep: Deployment) -> None:
    r = httpx.get(dep.url("/hang"), timeout=10)
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"


def test_tunnel_down_fails_fast_with_502(tmp_path: Path) -> None:
    with deployment(tmp_path, agent_args=["--link-wait", "0.2"]) as d:
        assert d.server is not None
        d.server.kill()
        d.server.wait()
        deadline = time.monotonic() + 20
        while True:
            start = time.monotonic()
            r = httpx.get(d.url("/api/v1/check"), timeout=10)
            if r.status_code == 502:
                break
            assert time.monotonic() < deadline
        assert time.monotonic() - start < 3
        assert r.json()["error"] == "tunnel_down"
        assert "reconnecting" in r.json()["message"]


def test_agent_with_wrong_token_never_connects(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        bad = tmp_path / "bad-token"
        bad.write_text("default:" + "x" * 40 + "\n")
        d.tool_ports = {"signal-cli": free_port()}
        agent = start_agent(d, ["--link-wait", "0.1"], token_file=bad)
        try:
            r = httpx.get(d.url("/api/v1/check"))
            assert r.status_code == 502
            deadline = time.monotonic() + 10
            while "refused" not in agent.stderr_text() and "could not prove" not in (
                agent.stderr_text()
            ):
                assert time.monotonic() < deadline, agent.output()
                time.sleep(0.05)
        finally:
            agent.terminate()
            agent.wait()


def test_many_garbage_connections_do_not_take_the_server_down(dep: Deployment) -> None:
    for n in range(50):
        with socket.create_connection(("127.0.0.1", dep.server_port)) as s:
            s.sendall(encode(Ping(nonce=n)) if n % 2 else os.urandom(64))
    still_serving(dep)
