"""Fuzz the handshake: whatever a peer sends, only HandshakeError/ProtocolError come out."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.protocol.errors import ProtocolError
from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake, ServerHandshake
from carapace.protocol.messages import Auth, Challenge, Hello

TOKEN = b"t" * 32

hellos = st.builds(
    Hello,
    versions=st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5).map(tuple),
    agent=st.text(max_size=200),
    nonce=st.binary(max_size=64),
    resume=st.none() | st.binary(max_size=32),
    received=st.integers(0, 2**63),
)
challenges = st.builds(
    Challenge,
    version=st.integers(-(2**63), 2**64 - 1),
    nonce=st.binary(max_size=64),
    proof=st.binary(max_size=64),
)


@settings(max_examples=300)
@given(hello=hellos, auth=st.binary(max_size=64), known=st.booleans())
def test_server_side_never_fails_otherwise(hello: Hello, auth: bytes, known: bool) -> None:
    try:
        hs = ServerHandshake(hello, TOKEN if known else None, os.urandom(NONCE_SIZE),
                             os.urandom(32))
        hs.challenge()
        hs.verify(Auth(proof=auth))
    except ProtocolError:
        return
    raise AssertionError("a random proof was accepted")


@settings(max_examples=300)
@given(challenge=challenges)
def test_agent_side_never_fails_otherwise(challenge: Challenge) -> None:
    hs = AgentHandshake("default", TOKEN, os.urandom(NONCE_SIZE))
    hs.hello()
    try:
        hs.on_challenge(challenge)
    except ProtocolError:
        return
    raise AssertionError("a random server proof was accepted")
