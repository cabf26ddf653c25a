"""A raw agent link over trio for the noisy-neighbour attacker: frames, handshake, nothing else.

The same job as the tests' hand-driven link (``tests/helpers/rawlink.py``), but
async, so one attacker process can send and read at once (or pointedly not
read). It speaks the wire protocol through :mod:`carapace.protocol` and keeps
none of the real agent's manners: no flow control, no pongs, no limits.
"""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import trio

from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake
from carapace.protocol.messages import Challenge, Message, Reject, Welcome

READ = 256 * 1024


class LinkClosed(Exception):
    """The server closed the link (or refused the handshake); ``str`` says how."""


class Wire:
    """One TCP connection to the server, frames in and out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        # The server's own frames are small; a generous cap keeps a bad one visible.
        self.decoder = FrameDecoder(max_frame=64 * 1024 * 1024)
        self.sent_bytes = 0

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> Wire:
        """Dial the server on loopback, from ``source`` (any 127.x.y.z) if given."""
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream)

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode(msg))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.sent_bytes += len(data)

    async def receive(self) -> Message:
        """The next message; :class:`LinkClosed` once the server has closed the link."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise LinkClosed(f"reset ({type(exc).__name__})") from None
            if not data:
                raise LinkClosed("closed")
            self.decoder.feed(data)

    async def handshake(self, agent: str, token: bytes) -> Welcome:
        hs = AgentHandshake(agent, token, os.urandom(NONCE_SIZE))
        await self.send(hs.hello())
        challenge = await self.receive()
        if isinstance(challenge, Reject):
            raise LinkClosed(f"rejected: {challenge.code}")
        if not isinstance(challenge, Challenge):
            raise LinkClosed(f"expected a challenge, got {challenge.TYPE}")
        await self.send(hs.on_challenge(challenge))
        welcome = await self.receive()
        if isinstance(welcome, Reject):
            raise LinkClosed(f"rejected: {welcome.code}")
        if not isinstance(welcome, Welcome):
            raise LinkClosed(f"expected welcome, got {welcome.TYPE}")
        return welcome

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


def huge_hello(agent: str, payload: int) -> bytes:
    """A ``hello`` frame of about ``payload`` bytes: a ``versions`` array of that many 1s.

    Built as bytes (msgpack's array32 header, then one byte per entry) rather than
    through a 16-million-entry tuple, so making it costs the attacker nothing.
    """
    head = b"\x84" + b"".join(msgpack.packb(x, use_bin_type=True) for x in (
        "t", "hello", "agent", agent, "nonce", os.urandom(NONCE_SIZE), "versions"))
    count = max(1, payload - len(head) - 5)
    body = head + b"\xdd" + struct.pack(">I", count) + b"\x01" * count
    return struct.pack(">I", len(body)) + body
