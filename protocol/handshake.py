"""Mutual challenge–response authentication over one shared token per agent.

Sans-IO: the caller supplies the nonces (``os.urandom``) and moves the
messages. The token never crosses the wire; each side proves it holds the
token with an HMAC-SHA256 over a transcript that binds the chosen version,
the agent's name and both fresh nonces, under a label per direction so a
proof from one side can never be replayed as the other's.

    agent                                   server
      Hello(versions, agent, nonce_a)  →
                                       ←  Challenge(version, nonce_s, proof_s)
      Auth(proof_a)                    →
                                       ←  Welcome(...) | Reject(...)
"""

from __future__ import annotations

import hashlib
import hmac

import msgpack

from .errors import ProtocolError
from .messages import SUPPORTED_VERSIONS, Auth, Challenge, Hello

NONCE_SIZE = 32
PROOF_SIZE = 32

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
"""Seconds a link may take from its opening to ``welcome`` (the spec's 5 s): a
round trip and two HMACs take milliseconds, so this only bounds a peer that stalls."""
MAX_HANDSHAKE_FRAME = 4096
"""Default cap on a frame before ``welcome``: a hello (a few versions, a name of at
most 128 characters, two nonces' worth of ids) or an auth is a few hundred bytes,
so 4 KiB leaves room for new fields while an unauthenticated peer cannot make the
server buffer or decode anything big."""

_SERVER_LABEL = b"carapace-v1 server proof\x00"
_AGENT_LABEL = b"carapace-v1 agent proof\x00"


class HandshakeError(ProtocolError):
    """Authentication or version negotiation failed; ``code`` goes in the Reject."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def transcript(version: int, agent: str, agent_nonce: bytes, server_nonce: bytes) -> bytes:
    """Unambiguous encoding of everything both proofs cover."""
    packed: bytes = msgpack.packb([version, agent, agent_nonce, server_nonce], use_bin_type=True)
    return packed


def server_proof(token: bytes, script: bytes) -> bytes:
    return hmac.new(token, _SERVER_LABEL + script, hashlib.sha256).digest()


def agent_proof(token: bytes, script: bytes) -> bytes:
    return hmac.new(token, _AGENT_LABEL + script, hashlib.sha256).digest()


def choose_version(offered: tuple[int, ...]) -> int:
    common = set(offered) & set(SUPPORTED_VERSIONS)
    if not common:
        raise HandshakeError(
            "version",
            f"no common protocol version: peer speaks {sorted(offered)[:8]}, "
            f"this side speaks {list(SUPPORTED_VERSIONS)}; upgrade the older side",
        )
    return max(common)


class AgentHandshake:
    """The agent's half: ``hello()``, then ``on_challenge()`` returns the Auth to send."""

    def __init__(self, agent: str, token: bytes, nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        self.agent = agent
        self._token = token
        self._nonce = nonce
        self.version: int | None = None

    def hello(self, resume: bytes | None = None, received: int = 0) -> Hello:
        return Hello(
            versions=SUPPORTED_VERSIONS,
            agent=self.agent,
            nonce=self._nonce,
            resume=resume,
            received=received,
        )

    def on_challenge(self, msg: Challenge) -> Auth:
        if msg.version not in SUPPORTED_VERSIONS:
            raise HandshakeError("version", f"server chose unsupported version {msg.version}")
        if len(msg.nonce) != NONCE_SIZE:
            raise HandshakeError("malformed", "server nonce has the wrong size")
        script = transcript(msg.version, self.agent, self._nonce, msg.nonce)
        if not hmac.compare_digest(server_proof(self._token, script), msg.proof):
            raise HandshakeError(
                "auth",
                "the server could not prove it holds this agent's token: "
                "check that both sides use the same token file (or that nothing sits in between)",
            )
        self.version = msg.version
        return Auth(proof=agent_proof(self._token, script))


class ServerHandshake:
    """The server's half for one link.

    ``token`` is the agent's token, or None if the name is unknown: the server
    then answers with a proof under a random key (supplied by the caller) so
    that an unknown name looks exactly like a wrong token to the peer.
    """

    def __init__(self, hello: Hello, token: bytes | None, nonce: bytes, decoy_key: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        if len(hello.nonce) != NONCE_SIZE:
            raise HandshakeError("malformed", "agent nonce has the wrong size")
        if not hello.agent or len(hello.agent) > 128:
            raise HandshakeError("malformed", "agent name must be 1 to 128 characters")
        self.agent = hello.agent
        self.version = choose_version(hello.versions)
        self.known = token is not None
        self._token = token if token is not None else decoy_key
        self._script = transcript(self.version, hello.agent, hello.nonce, nonce)
        self._nonce = nonce

    def challenge(self) -> Challenge:
        return Challenge(
            version=self.version,
            nonce=self._nonce,
            proof=server_proof(self._token, self._script),
        )

    def verify(self, msg: Auth) -> None:
        """Raise HandshakeError unless ``msg`` proves the agent holds its token."""
        good = hmac.compare_digest(agent_proof(self._token, self._script), msg.proof)
        if not (good and self.known):
            raise HandshakeError(
                "auth", "authentication failed: unknown agent or wrong token"
            )
