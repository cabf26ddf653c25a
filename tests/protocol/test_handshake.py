"""Mutual HMAC challenge–response: success, every failure, and what each side can tell."""

from __future__ import annotations

import hashlib
import hmac
import os

import msgpack
import pytest

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import decode_payload, encode_payload
from carapace.protocol.handshake import (
    NONCE_SIZE,
    PROOF_SIZE,
    AgentHandshake,
    HandshakeError,
    ServerHandshake,
    agent_proof,
    choose_version,
    server_proof,
    transcript,
)
from carapace.protocol.messages import PROTOCOL_VERSION, SUPPORTED_VERSIONS, Auth, Challenge, Hello

TOKEN = b"s3cret-token"
NONCE_A = b"a" * NONCE_SIZE
NONCE_S = b"s" * NONCE_SIZE
DECOY = b"d" * 32


def wire(msg: Hello | Challenge | Auth) -> Hello | Challenge | Auth:
    """Send a message through the real codec, as the link would."""
    out = decode_payload(encode_payload(msg))
    assert type(out) is type(msg)
    return out  # type: ignore[return-value]


def server_for(
    hello: Hello, token: bytes | None = TOKEN, nonce: bytes = NONCE_S
) -> ServerHandshake:
    return ServerHandshake(hello, token, nonce, DECOY)


def test_full_exchange() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    hello = wire(agent.hello())
    assert isinstance(hello, Hello)
    assert hello.versions == SUPPORTED_VERSIONS
    assert hello.agent == "vm1" and hello.nonce == NONCE_A
    assert hello.resume is None and hello.received == 0

    server = server_for(hello)
    challenge = wire(server.challenge())
    assert isinstance(challenge, Challenge)
    assert len(challenge.proof) == PROOF_SIZE

    auth = wire(agent.on_challenge(challenge))
    assert isinstance(auth, Auth)
    server.verify(auth)  # does not raise
    assert agent.version == server.version == challenge.version == PROTOCOL_VERSION
    assert server.agent == "vm1" and server.known


def test_token_never_crosses_the_wire() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    server = server_for(agent.hello())
    frames = [
        encode_payload(agent.hello()),
        encode_payload(server.challenge()),
        encode_payload(agent.on_challenge(server.challenge())),
    ]
    assert not any(TOKEN in f for f in frames)


def test_proofs_follow_the_spec() -> None:
    script = transcript(1, "vm1", NONCE_A, NONCE_S)
    assert script == msgpack.packb([1, "vm1", NONCE_A, NONCE_S], use_bin_type=True)
    expected_s = hmac.new(TOKEN, b"carapace-v1 server proof\x00" + script, hashlib.sha256).digest()
    expected_a = hmac.new(TOKEN, b"carapace-v1 agent proof\x00" + script, hashlib.sha256).digest()
    assert server_proof(TOKEN, script) == expected_s
    assert agent_proof(TOKEN, script) == expected_a
    server = server_for(Hello(versions=(1,), agent="vm1", nonce=NONCE_A))
    assert server.challenge().proof == expected_s


def test_resume_fields_pass_through_hello() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    hello = wire(agent.hello(resume=b"sess", received=12))
    assert isinstance(hello, Hello)
    assert (hello.resume, hello.received) == (b"sess", 12)


def test_fresh_nonces_give_fresh_proofs() -> None:
    hello = Hello(versions=(1,), agent="vm1", nonce=NONCE_A)
    p1 = server_for(hello, nonce=os.urandom(NONCE_SIZE)).challenge().proof
    p2 = server_for(hello, nonce=os.urandom(NONCE_SIZE)).challenge().proof
    assert p1 != p2


# --------------------------------------------------------------------------
# Authentication failures


def test_wrong_token_on_the_agent_side() -> None:
    agent = AgentHandshake("vm1", b"wrong", NONCE_A)
    server = server_for(agent.hello())
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(server.challenge())
    assert info.value.code == "auth"
    assert agent.version is None  # it never got to send its proof


def test_wrong_token_on_the_server_side() -> None:
    # The agent holds the right token; the server's file has a different one.
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    server = server_for(agent.hello(), token=b"other")
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(server.challenge())
    assert info.value.code == "auth"


def test_agent_proof_under_the_wrong_token_is_refused() -> None:
    # An attacker who somehow got past the agent check still cannot log in.
    hello = Hello(versions=(1,), agent="vm1", nonce=NONCE_A)
    server = server_for(hello)
    script = transcript(server.version, "vm1", NONCE_A, NONCE_S)
    with pytest.raises(HandshakeError) as info:
        server.verify(Auth(proof=agent_proof(b"wrong", script)))
    assert info.value.code == "auth"


def test_unknown_agent_looks_like_a_wrong_token() -> None:
    agent = AgentHandshake("ghost", TOKEN, NONCE_A)
    server = server_for(agent.hello(), token=None)
    assert not server.known
    with pytest.raises(HandshakeError) as unknown:
        agent.on_challenge(server.challenge())

    agent2 = AgentHandshake("vm1", TOKEN, NONCE_A)
    server2 = server_for(agent2.hello(), token=b"other")
    with pytest.raises(HandshakeError) as wrong:
        agent2.on_challenge(server2.challenge())

    assert unknown.value.code == wrong.value.code == "auth"
    assert str(unknown.value) == str(wrong.value)
    # Same shape on the wire too: a 32-byte proof either way.
    assert len(server.challenge().proof) == len(server2.challenge().proof) == PROOF_SIZE


def test_unknown_agent_is_refused_even_with_the_decoy_key() -> None:
    # Proving with the decoy key must not let anyone in.
    hello = Hello(versions=(1,), agent="ghost", nonce=NONCE_A)
    server = server_for(hello, token=None)
    script = transcript(server.version, "ghost", NONCE_A, NONCE_S)
    with pytest.raises(HandshakeError) as info:
        server.verify(Auth(proof=agent_proof(DECOY, script)))
    assert info.value.code == "auth"


def test_replayed_auth_fails_against_a_new_server_nonce() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    hello = agent.hello()
    old_auth = agent.on_challenge(server_for(hello).challenge())

    new_server = server_for(hello, nonce=b"n" * NONCE_SIZE)
    with pytest.raises(HandshakeError) as info:
        new_server.verify(old_auth)
    assert info.value.code == "auth"


def test_replayed_challenge_fails_against_a_new_agent_nonce() -> None:
    old_challenge = server_for(Hello(versions=(1,), agent="vm1", nonce=NONCE_A)).challenge()
    agent = AgentHandshake("vm1", TOKEN, b"b" * NONCE_SIZE)
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(old_challenge)
    assert info.value.code == "auth"


def test_server_proof_is_not_an_agent_proof() -> None:
    hello = Hello(versions=(1,), agent="vm1", nonce=NONCE_A)
    server = server_for(hello)
    reflected = Auth(proof=server.challenge().proof)
    with pytest.raises(HandshakeError) as info:
        server.verify(reflected)
    assert info.value.code == "auth"


def test_agent_proof_is_not_a_server_proof() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    script = transcript(1, "vm1", NONCE_A, NONCE_S)
    forged = Challenge(version=1, nonce=NONCE_S, proof=agent_proof(TOKEN, script))
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(forged)
    assert info.value.code == "auth"


def test_proof_is_bound_to_the_agent_name() -> None:
    # A proof for "vm1" does not authenticate "vm2" even under the same token.
    server = server_for(Hello(versions=(1,), agent="vm2", nonce=NONCE_A))
    script_vm1 = transcript(1, "vm1", NONCE_A, NONCE_S)
    with pytest.raises(HandshakeError):
        server.verify(Auth(proof=agent_proof(TOKEN, script_vm1)))


@pytest.mark.parametrize("proof", [b"", b"x", b"\x00" * 31, b"\x00" * 33, b"\x00" * 32])
def test_malformed_proofs_fail_cleanly(proof: bytes) -> None:
    server = server_for(Hello(versions=(1,), agent="vm1", nonce=NONCE_A))
    with pytest.raises(HandshakeError):
        server.verify(Auth(proof=proof))
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    with pytest.raises(HandshakeError):
        agent.on_challenge(Challenge(version=1, nonce=NONCE_S, proof=proof))


# --------------------------------------------------------------------------
# Versions


def test_choose_version_picks_the_highest_common() -> None:
    assert choose_version((1,)) == 1
    assert choose_version((0, 1, 7, 99)) == max(SUPPORTED_VERSIONS)


@pytest.mark.parametrize("offered", [(), (0,), (2, 3), (-1, 99)])
def test_no_common_version(offered: tuple[int, ...]) -> None:
    with pytest.raises(HandshakeError) as info:
        choose_version(offered)
    assert info.value.code == "version"
    with pytest.raises(HandshakeError) as info:
        server_for(Hello(versions=offered, agent="vm1", nonce=NONCE_A))
    assert info.value.code == "version"


def test_agent_refuses_a_version_it_does_not_speak() -> None:
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    script = transcript(2, "vm1", NONCE_A, NONCE_S)
    # Even a correctly proven challenge for an unknown version is refused.
    challenge = Challenge(version=2, nonce=NONCE_S, proof=server_proof(TOKEN, script))
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(challenge)
    assert info.value.code == "version"


def test_handshake_error_is_a_protocol_error() -> None:
    assert issubclass(HandshakeError, ProtocolError)


# --------------------------------------------------------------------------
# Malformed handshake values


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_bad_nonce_sizes(size: int) -> None:
    bad = b"n" * size
    with pytest.raises(ValueError):
        AgentHandshake("vm1", TOKEN, bad)
    hello = Hello(versions=(1,), agent="vm1", nonce=NONCE_A)
    with pytest.raises(ValueError):
        ServerHandshake(hello, TOKEN, bad, DECOY)
    with pytest.raises(HandshakeError) as info:
        server_for(Hello(versions=(1,), agent="vm1", nonce=bad))
    assert info.value.code == "malformed"
    agent = AgentHandshake("vm1", TOKEN, NONCE_A)
    with pytest.raises(HandshakeError) as info:
        agent.on_challenge(Challenge(version=1, nonce=bad, proof=b"p" * PROOF_SIZE))
    assert info.value.code == "malformed"


@pytest.mark.parametrize("name", ["", "x" * 129])
def test_bad_agent_names(name: str) -> None:
    with pytest.raises(HandshakeError) as info:
        server_for(Hello(versions=(1,), agent=name, nonce=NONCE_A))
    assert info.value.code == "malformed"


def test_longest_agent_name_is_accepted() -> None:
    name = "x" * 128
    agent = AgentHandshake(name, TOKEN, NONCE_A)
    server = server_for(agent.hello())
    server.verify(agent.on_challenge(server.challenge()))
