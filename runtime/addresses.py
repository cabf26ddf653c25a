"""Addresses as operators write them on the command line, parsed once into typed objects.

A link runs over one of three transports:

- ``HOST:PORT`` (or ``tcp:HOST:PORT``) — TCP;
- ``unix:/path/to/socket`` — a unix socket, for containers and gVisor (a bind
  mount) and for Firecracker, whose vsock device turns a guest's connection to
  host port P into a connection to the host unix socket ``<uds_path>_P``;
- ``vsock:CID:PORT`` — ``AF_VSOCK`` (QEMU's vhost-vsock, Cloud Hypervisor,
  Kata): the agent dials the host at CID 2; a listener writes ``vsock:PORT``
  and accepts from any CID.

``describe()`` gives each back in the form the flags take, for logs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

UNIX_PATH_MAX = 107
"""Bytes of a unix socket path the kernel takes (``sun_path`` is 108, with its NUL)."""

VSOCK_CID_ANY = 0xFFFF_FFFF
"""``VMADDR_CID_ANY``: a vsock listener bound to it accepts on every CID."""

VSOCK_MAX = 0xFFFF_FFFF
"""CIDs and ports are 32-bit unsigned numbers."""


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` → (host, port); ValueError if malformed."""
    value = value.strip()
    host, port = default_host, value
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError(f"{value!r} is not [HOST]:PORT")
        host, port = value[1:end], value[end + 2 :]
    elif ":" in value:
        host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host or default_host, int(port)


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    transport = "tcp"

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str
    """Absolute: the daemons never depend on their working directory."""

    transport = "unix"
    family = socket.AF_UNIX

    def describe(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    """``VSOCK_CID_ANY`` on a listener that accepts on every CID."""
    port: int

    transport = "vsock"

    @property
    def family(self) -> socket.AddressFamily:
        family: socket.AddressFamily | None = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise OSError("this system has no AF_VSOCK sockets")
        return family

    def describe(self) -> str:
        if self.cid == VSOCK_CID_ANY:
            return f"vsock:{self.port}"
        return f"vsock:{self.cid}:{self.port}"


Address = TcpAddress | UnixAddress | VsockAddress

LISTEN_FORMS = "HOST:PORT, unix:/path/to/socket or vsock:PORT"
CONNECT_FORMS = "HOST:PORT, unix:/path/to/socket or vsock:CID:PORT"


def parse_address(value: str, *, listen: bool) -> Address:
    """One address as a flag takes it; ValueError that says what is wrong and what is meant.

    ``listen``: a listener's ``vsock:PORT`` accepts on any CID; a dialler must name
    the CID it calls (2 is the host).
    """
    text = value.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme == "unix":
        return _unix(rest, text)
    if scheme == "vsock":
        return _vsock(rest, text, listen=listen)
    if scheme == "tcp":
        text = rest
    try:
        host, port = parse_hostport(text)
    except ValueError as exc:
        forms = LISTEN_FORMS if listen else CONNECT_FORMS
        raise ValueError(f"{exc} (an address is {forms})") from None
    return TcpAddress(host, port)


def _unix(path: str, text: str) -> UnixAddress:
    if not path:
        raise ValueError(f"{text!r}: give the socket's path, as in unix:/run/carapace/agent.sock")
    if "\0" in path:
        raise ValueError(f"{text!r}: a socket path cannot contain a NUL byte")
    path = os.path.abspath(path)
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path {path!r} is {size} bytes long; the kernel takes at "
                         f"most {UNIX_PATH_MAX}: use a shorter path")
    return UnixAddress(path)


def _vsock(rest: str, text: str, *, listen: bool) -> VsockAddress:
    parts = rest.split(":")
    if listen and len(parts) == 1:
        parts = [str(VSOCK_CID_ANY), *parts]
    if len(parts) != 2 or not all(p.isdigit() and int(p) <= VSOCK_MAX for p in parts):
        form = "vsock:PORT (any CID) or vsock:CID:PORT" if listen else \
            "vsock:CID:PORT (CID 2 is the host)"
        raise ValueError(f"{text!r} is not {form}; CID and PORT are numbers up to {VSOCK_MAX}")
    return VsockAddress(int(parts[0]), int(parts[1]))
