"""Command-line value types shared by the daemons and the debug CLI."""

from __future__ import annotations

import click

from .addresses import CONNECT_FORMS, LISTEN_FORMS, Address, parse_address, parse_hostport


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


class LinkAddress(click.ParamType):
    """Where a link listens or dials: ``HOST:PORT``, ``unix:PATH`` or ``vsock:[CID:]PORT``."""

    name = "ADDRESS"

    def __init__(self, *, listen: bool) -> None:
        self.listen = listen
        self.forms = LISTEN_FORMS if listen else CONNECT_FORMS

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> Address:
        if not isinstance(value, str):
            return value  # type: ignore[return-value]
        try:
            return parse_address(value, listen=self.listen)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


LISTEN_ADDRESS = LinkAddress(listen=True)
CONNECT_ADDRESS = LinkAddress(listen=False)


class FileMode(click.ParamType):
    """An octal permission mode such as ``0660``."""

    name = "MODE"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text) or int(text, 8) > 0o777:
            self.fail(f"{value!r} is not an octal mode from 0 to 0777 (e.g. 0660)", param, ctx)
        return int(text, 8)


FILE_MODE = FileMode()
