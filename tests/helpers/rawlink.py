"""A blocking, hand-driven agent link for poking the server with bad input in tests."""

from __future__ import annotations

import os
import socket

from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.handshake import NONCE_SIZE, AgentHandshake
from carapace.protocol.messages import Challenge, Message, Welcome


class RawLink:
    def __init__(self, port: int, timeout: float = 5.0, *, unix_path: str | None = None) -> None:
        """To ``127.0.0.1:port``, or with ``unix_path`` to that unix socket (port unused)."""
        if unix_path is None:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix_path)
        self.decoder = FrameDecoder()

    def send(self, msg: Message) -> None:
        self.sock.sendall(encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> Message | None:
        """The next message, or None once the server has closed the link."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def closed_by_peer(self) -> bool:
        """Drain until the server closes the link (True) or the timeout hits (False)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
            if not data:
                return True

    def handshake(self, agent: str, token: bytes) -> Welcome:
        hs = AgentHandshake(agent, token, os.urandom(NONCE_SIZE))
        self.send(hs.hello())
        challenge = self.receive()
        assert isinstance(challenge, Challenge), challenge
        self.send(hs.on_challenge(challenge))
        welcome = self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def close(self) -> None:
        self.sock.close()
