"""A forwarder between agent and server that a test can cut, freeze and refuse.

:class:`Forwarder` relays TCP; :class:`UnixForwarder` relays between unix sockets.

Threads and blocking sockets, so it runs beside trio or plain tests alike.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator


class Forwarder:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = self._listen()
        unix = self.listener.family == socket.AF_UNIX
        self.port: int = 0 if unix else self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._running = threading.Event()
        self._running.set()  # cleared while frozen
        self.refusing = False
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = self._dial()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            if client.family != socket.AF_UNIX:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _listen(self) -> socket.socket:
        return socket.create_server(("127.0.0.1", 0))

    def _dial(self) -> socket.socket:
        upstream = socket.create_connection(self.target, timeout=5)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._running.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every live connection at once (both directions, like a dropped link)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def freeze(self) -> None:
        """Stop relaying bytes but keep connections open (a silent dead link)."""
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Cut the link and refuse reconnections until the block ends."""
        self.refusing = True
        self.cut()
        try:
            yield
        finally:
            self.refusing = False

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.thaw()
        self.cut()


class UnixForwarder(Forwarder):
    """The same between unix sockets: agents dial ``path``, it dials ``target_path``."""

    def __init__(self, path: str, target_path: str) -> None:
        self.path = path
        self.target_path = target_path
        super().__init__(0)

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen()
        return listener

    def _dial(self) -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(5)
        try:
            upstream.connect(self.target_path)
        except OSError:
            upstream.close()
            raise
        return upstream

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
