"""Command-line value types shared by the daemons and the debug CLI."""

from __future__ import annotations

import click

from .addresses import parse_hostport


class HostPort(click.ParamType):
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT``."""

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
