"""Command-line value types shared by the daemons and the debug CLI."""

from __future__ import annotations

import click


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


class HostPort(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        try:
            return parse_hostport(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


HOST_PORT = HostPort()


class CountPerSeconds(click.ParamType):
    """``N/SECONDS`` (at most N in any SECONDS) or ``0`` (no limit)."""

    name = "N/SECONDS"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, float]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        text = str(value).strip()
        if text == "0":
            return (0, 1.0)
        count, slash, secs = text.partition("/")
        try:
            n, window = int(count), float(secs.rstrip("s"))
        except ValueError:
            n, window = -1, 0.0
        if not slash or n < 0 or not window > 0 or window == float("inf"):
            self.fail(f"{text!r} is not N/SECONDS (e.g. 100/10: at most 100 in any 10 s) "
                      "or 0 (no limit)", param, ctx)
        return (n, window)


COUNT_PER_SECONDS = CountPerSeconds()


def find_oserror(exc: BaseException) -> OSError | None:
    """The OSError inside a (possibly nested) exception group, if any.

    trio wraps errors that escape a nursery in groups; a daemon that cannot
    bind its port should still say so in one plain line.
    """
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_oserror(inner)
            if found is not None:
                return found
    return None


def tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling a daemon that holds many streams.

    With thousands of open streams a full collection walks every one of their
    objects and holds the event loop for hundreds of milliseconds (measured:
    live-stream p99 250 ms beside 10,000 idle streams, 7 ms without the
    collector). Objects alive after start-up are frozen out of collection,
    young collections stay small (short pauses) and full passes are rare.
    """
    import gc

    gc.freeze()
    gc.set_threshold(1_000, 20, 1_000)
