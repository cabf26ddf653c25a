"""Network addresses as operators write them on the command line."""

from __future__ import annotations


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
