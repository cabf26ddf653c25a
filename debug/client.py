"""What the commands that talk to a server's debug listener share.

``--debug HOST:PORT`` (env ``CARAPACE_DEBUG_LISTEN``, default
``127.0.0.1:8766``) says where the listener is — the server only opens one
when started with ``--debug-listen``; ``--debug-token-file`` (env
``CARAPACE_DEBUG_TOKEN_FILE``) supplies the bearer token a listener on a
non-loopback address requires. A listener that cannot be reached ends the
command with exit status 2 and one line saying which address was tried.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import httpx

from carapace.runtime.addresses import parse_hostport

DEFAULT_DEBUG = "127.0.0.1:8766"
DEBUG_ENV = "CARAPACE_DEBUG_LISTEN"
TOKEN_ENV = "CARAPACE_DEBUG_TOKEN_FILE"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2

F = TypeVar("F", bound=Callable[..., Any])


class Unreachable(Exception):
    """What a command talks to (a debug listener, an SSE endpoint) could not be used.

    The message says why; ``hint``, when the message does not already say
    it, what to check. Commands end with :data:`EXIT_UNREACHABLE`.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def fail(message: str, code: int = EXIT_UNREACHABLE) -> NoReturn:
    click.echo(f"carapace-debug: {message}", err=True)
    sys.exit(code)


@dataclass
class DebugClient:
    """A small synchronous client for one server's debug listener."""

    host: str
    port: int
    token: str | None = None
    timeout: float = 5.0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, read_timeout: float | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers=self.headers(),
            timeout=httpx.Timeout(self.timeout, read=read_timeout),
            trust_env=False,
        )

    def explain(self, exc: httpx.HTTPError) -> Unreachable:
        """The one line an operator needs when the listener cannot be used."""
        if isinstance(exc, httpx.ConnectError):
            why = "connection refused" if "refused" in str(exc).lower() else str(exc) or "failed"
            return Unreachable(
                f"cannot reach the debug listener at {self.address} ({why}); check that "
                f"carapace-server runs with --debug-listen {self.address} (or point --debug / "
                f"{DEBUG_ENV} at its --debug-listen address)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable(f"the debug listener at {self.address} did not answer in time")
        return Unreachable(f"talking to the debug listener at {self.address} failed: {exc}")

    def check_status(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            hint = ("the token was refused" if self.token else
                    f"give --debug-token-file FILE (or {TOKEN_ENV})")
            raise Unreachable(
                f"the debug listener at {self.address} requires a bearer token: {hint}"
            )
        if response.status_code != 200:
            raise Unreachable(
                f"the debug listener at {self.address} answered {response.status_code} for "
                f"{response.request.url.path}: {response.text[:200]}"
            )

    def get_json(self, path: str) -> dict[str, Any]:
        try:
            with self.client() as http:
                response = http.get(path)
        except httpx.HTTPError as exc:
            raise self.explain(exc) from None
        self.check_status(response)
        try:
            doc = response.json()
        except json.JSONDecodeError:
            raise Unreachable(
                f"{self.address}{path} did not answer JSON: is it a carapace debug listener?"
            ) from None
        if not isinstance(doc, dict):
            raise Unreachable(f"{self.address}{path} answered unexpected JSON")
        return doc


def _read_token(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the debug token file {path}: {exc}")
    if not text or "\n" in text:
        fail(f"debug token file {path}: expected one line holding the token")
    return text


def debug_options(func: F) -> F:
    """Add ``--debug HOST:PORT`` and ``--debug-token-file FILE`` (parameters
    ``debug_address`` and ``debug_token_file``; see :func:`make_debug_client`)."""
    func = click.option(
        "--debug-token-file", "debug_token_file", envvar=TOKEN_ENV, default=None,
        metavar="FILE", help=f"Bearer token for a non-loopback debug listener (env {TOKEN_ENV}).",
    )(func)
    func = click.option(
        "--debug", "debug_address", envvar=DEBUG_ENV, default=DEFAULT_DEBUG,
        show_default=True, metavar="HOST:PORT",
        help="The server's debug listener: the address given to carapace-server "
        f"--debug-listen (env {DEBUG_ENV}).",
    )(func)
    return func


def make_debug_client(address: str, token_file: str | None) -> DebugClient:
    try:
        host, port = parse_hostport(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--debug") from None
    token = _read_token(token_file) if token_file else None
    return DebugClient(host, port, token)


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))
