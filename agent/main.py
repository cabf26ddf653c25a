"""carapace-agent: the VM side. Its flags and environment variables are a fixed interface:
scripts and unit files outside this repository use them; change them only by adding."""

from __future__ import annotations

import logging
import os
import sys
from functools import partial

import click
import trio

from carapace.protocol.keepalive import DEFAULT_IDLE_TIMEOUT
from carapace.runtime.addresses import Address, TcpAddress, parse_address, parse_hostport
from carapace.runtime.errors import find_exception
from carapace.runtime.logs import setup_logging
from carapace.runtime.options import CONNECT_ADDRESS
from carapace.runtime.tls import TlsConfigError, agent_context
from carapace.runtime.tokens import TokenFileError, load_agent_token
from carapace.runtime.tuning import tune_gc

from .http_listener import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_LINK_WAIT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_SSE_KEEPALIVE,
    HttpListenerConfig,
    HttpToolListener,
)
from .multiplexer import Multiplexer
from .shim import default_socket_path
from .shim_install import shims_group
from .tunnel import DEFAULT_RESUME_TIMEOUT, LinkConfig, TunnelClient

log = logging.getLogger("carapace.agent")


def _parse_expose(value: str) -> tuple[str, str, int]:
    tool, sep, where = value.partition("=")
    if not sep or not tool:
        raise click.BadParameter(f"{value!r}: expected TOOL=[HOST:]PORT", param_hint="--expose")
    try:
        host, port = parse_hostport(where)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expose") from None
    return tool, host, port


def _server_address(server: Address | None) -> Address:
    if server is not None:
        return server
    host = os.environ.get("CARAPACE_SERVER_HOST")
    port = os.environ.get("CARAPACE_SERVER_PORT")
    if host and port:
        try:
            return parse_address(f"{host}:{port}", listen=False)
        except ValueError as exc:
            raise click.UsageError(f"CARAPACE_SERVER_HOST/PORT: {exc}") from None
    raise click.UsageError(
        "no server address: pass --server HOST:PORT, unix:/path/to/socket or vsock:CID:PORT "
        "(or set CARAPACE_SERVER_HOST and CARAPACE_SERVER_PORT)"
    )


DEFAULT_DRAIN_TIMEOUT = 10.0
"""Seconds in-flight local requests may finish after SIGTERM, as on the server."""


async def run_agent(
    link_config: LinkConfig,
    listeners: list[HttpListenerConfig],
    cli_socket: str | None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> None:
    mux = Multiplexer()
    client = TunnelClient(link_config, mux)
    accepting = trio.CancelScope()

    async def accept(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with accepting:
            async with trio.open_nursery() as listeners_nursery:
                for cfg in listeners:
                    listener = HttpToolListener(cfg, mux)
                    await listeners_nursery.start(
                        partial(listener.serve, handler_nursery=nursery)
                    )
                task_status.started()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await nursery.start(accept)
        if cli_socket:
            from .shim_socket import CliSocketListener

            await nursery.start(CliSocketListener(cli_socket, mux).serve)
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            async for _ in signals:
                accepting.cancel()
                await drain(mux, drain_timeout)
                nursery.cancel_scope.cancel()
                break


async def drain(mux: Multiplexer, timeout: float) -> None:
    """Stop cleanly: end event streams now (clients reconnect with Last-Event-ID), let
    other requests finish for up to ``timeout`` seconds."""
    log.info("stopping: %d request(s) in flight; draining for up to %.0f s",
             len(mux.streams), timeout)
    mux.draining = True
    for stream in list(mux.streams.values()):
        if stream.sse:
            # Stop the upstream now; the local response ends cleanly once its
            # relay sees the stream end, and only then is the stream forgotten.
            stream.stop("the agent is shutting down")
    with trio.move_on_after(timeout) as scope:
        while mux.streams:
            await mux.stream_closed.wait()
    if scope.cancelled_caught:
        log.warning("drain timeout: cutting %d unfinished request(s)", len(mux.streams))
    # Give the writer a moment to send the cancels and the last frames.
    await trio.sleep(0)


_STOP_SIGNALS = (15, 2)  # SIGTERM, SIGINT


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", type=CONNECT_ADDRESS, default=None,
              help="The Carapace server's address: HOST:PORT (TCP), unix:/path/to/socket (a "
              "socket bind-mounted into a container) or vsock:CID:PORT (AF_VSOCK; CID 2 is "
              "the host, also under Firecracker). Or CARAPACE_SERVER_HOST + "
              "CARAPACE_SERVER_PORT.")
@click.option("--token-file", envvar="CARAPACE_TOKEN_FILE", default=None,
              help="This agent's NAME:TOKEN line (a bare token is agent 'default').")
@click.option("--expose", multiple=True, metavar="TOOL=[HOST:]PORT",
              help="Serve HTTP tool TOOL on a local port; repeatable.")
@click.option("--cli-socket", envvar="CARAPACE_CLI_SOCKET", default=None, is_flag=False,
              flag_value=default_socket_path(), metavar="[PATH]",
              help="Unix socket for tool shims; a bare --cli-socket uses the path shims "
              f"look for by default ({default_socket_path()}).")
@click.option("--sse-keepalive", type=click.FloatRange(min=0.1), default=DEFAULT_SSE_KEEPALIVE,
              show_default=True,
              help="Seconds of idle before an SSE comment keepalive (at least 0.1).")
@click.option("--link-wait", type=float, default=DEFAULT_LINK_WAIT, show_default=True,
              help="How long a local request waits for the tunnel before failing with 502.")
@click.option("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
              show_default=True,
              help="Close local HTTP clients that do not send their request in time.")
@click.option("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
              show_default=True,
              help="Largest request head a local HTTP client may send (431 beyond).")
@click.option("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
              show_default=True,
              help="Largest request body a local HTTP client may send (413 beyond).")
@click.option("--tls", "use_tls", is_flag=True, envvar="CARAPACE_TLS",
              help="Connect over TLS, trusting the system CAs (implied by --tls-ca).")
@click.option("--tls-ca", default=None, envvar="CARAPACE_TLS_CA",
              help="Connect over TLS, trusting this CA (PEM) for the server certificate.")
@click.option("--tls-cert", default=None, envvar="CARAPACE_TLS_CERT",
              help="Client certificate (PEM) for servers that require one.")
@click.option("--tls-key", default=None, envvar="CARAPACE_TLS_KEY",
              help="Private key for --tls-cert (PEM).")
@click.option("--tls-server-name", default=None,
              help="Name to check in the server certificate (default: the --server host).")
@click.option("--resume-timeout", type=float, default=DEFAULT_RESUME_TIMEOUT,
              show_default=True,
              help="How long open requests wait for a dropped link to come back.")
@click.option("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
              show_default=True,
              help="On SIGTERM, how long in-flight local requests may finish.")
@click.option("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, show_default=True,
              help="Drop a tunnel link silent for this long (pings every third of it).")
@click.option("--log-level", default="info", envvar="CARAPACE_LOG_LEVEL", show_default=True)
@click.option("--log-json", is_flag=True, envvar="CARAPACE_LOG_JSON")
@click.pass_context
def main(
    ctx: click.Context,
    server: Address | None,
    token_file: str | None,
    expose: tuple[str, ...],
    cli_socket: str | None,
    sse_keepalive: float,
    link_wait: float,
    header_timeout: float,
    max_header_bytes: int,
    max_body_bytes: int,
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
    resume_timeout: float,
    drain_timeout: float,
    idle_timeout: float,
    log_level: str,
    log_json: bool,
) -> None:
    """Connect to a Carapace server and serve its tools to this VM."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(log_level, log_json)
    address = _server_address(server)
    if not token_file:
        raise click.UsageError("--token-file (or CARAPACE_TOKEN_FILE) is required")
    try:
        agent, token = load_agent_token(token_file)
    except TokenFileError as exc:
        log.error("%s", exc)
        sys.exit(2)
    listeners = []
    for item in expose:
        tool, lhost, lport = _parse_expose(item)
        listeners.append(HttpListenerConfig(
            tool=tool, host=lhost, port=lport, keepalive_interval=sse_keepalive,
            header_timeout=header_timeout, link_wait=link_wait,
            max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes,
        ))
    if not listeners and not cli_socket:
        raise click.UsageError("nothing to serve: give --expose TOOL=PORT and/or --cli-socket")
    ssl_context = None
    if use_tls or tls_ca or tls_cert:
        try:
            ssl_context = agent_context(tls_ca, tls_cert, tls_key)
        except TlsConfigError as exc:
            log.error("%s", exc)
            sys.exit(2)
    if ssl_context is not None and not isinstance(address, TcpAddress) \
            and not tls_server_name:
        raise click.UsageError(f"TLS over {address.describe()} has no host name to check: "
                               "give --tls-server-name NAME (a name in the server certificate)")
    link_config = LinkConfig(server=address, agent=agent, token=token,
                             idle_timeout=idle_timeout, ping_interval=idle_timeout / 3,
                             resume_timeout=resume_timeout, ssl_context=ssl_context,
                             tls_server_name=tls_server_name)
    try:
        tune_gc()
        trio.run(run_agent, link_config, listeners, cli_socket, drain_timeout)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        err = find_exception(exc, OSError)
        if err is None:
            raise
        log.error("cannot open a local listener: %s", err.strerror or err)
        sys.exit(1)


main.add_command(shims_group)


if __name__ == "__main__":
    main()
