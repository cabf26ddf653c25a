"""carapace-server: the host side. Flags and env vars are fixed by DESIGN.md."""

from __future__ import annotations

import logging
import sys

import click
import trio

from .app import Server, ServerConfig
from .debug_listener import DebugConfigError, debug_access, set_debug_token
from .logconfig import setup_logging
from .options import HOST_PORT, find_oserror
from .policy import PolicyError, load_policy_file
from .tls import TlsConfigError, server_context
from .tokens import TokenFileError, load_server_tokens

log = logging.getLogger("carapace.server")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", type=HOST_PORT, default="127.0.0.1:8765", envvar="CARAPACE_LISTEN",
              show_default=True, help="Address agents connect to.")
@click.option("--policy", "policy_file", default="/etc/carapace/policy.yaml",
              envvar="CARAPACE_POLICY_FILE", show_default=True, help="Policy YAML file.")
@click.option("--token-file", envvar="CARAPACE_TOKEN_FILE", required=True,
              help="Shared token, or NAME:TOKEN lines (one per agent), or a directory of them.")
@click.option("--debug-listen", type=HOST_PORT, default=None, envvar="CARAPACE_DEBUG_LISTEN",
              help="Address of the debug/metrics listener (off by default).")
@click.option("--debug-token-file", default=None, envvar="CARAPACE_DEBUG_TOKEN_FILE",
              help="Bearer token (one line) the debug listener requires; mandatory when "
              "--debug-listen is not a loopback address.")
@click.option("--audit-log", default=None, envvar="CARAPACE_AUDIT_LOG",
              help="Append audit records (JSON lines) to this file.")
@click.option("--handshake-timeout", type=float, default=5.0, show_default=True)
@click.option("--idle-timeout", type=float, default=15.0, show_default=True,
              help="Drop an agent link silent for this long (pings every third of it).")
@click.option("--max-frame", type=int, default=16 * 1024 * 1024, show_default=True,
              help="Largest frame accepted from an agent, in bytes.")
@click.option("--max-requests-per-agent", type=int, default=10_000, show_default=True)
@click.option("--max-agents", type=int, default=64, show_default=True)
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              help="On SIGTERM, how long in-flight requests may finish.")
@click.option("--tls-cert", default=None, envvar="CARAPACE_TLS_CERT",
              help="Serve agents over TLS with this certificate (PEM).")
@click.option("--tls-key", default=None, envvar="CARAPACE_TLS_KEY",
              help="Private key for --tls-cert (PEM).")
@click.option("--tls-client-ca", default=None, envvar="CARAPACE_TLS_CLIENT_CA",
              help="Require agents to present a certificate signed by this CA (PEM).")
@click.option("--resume-grace", type=float, default=30.0, show_default=True,
              help="How long a dropped agent's session (its requests and processes) waits "
              "for the agent to reconnect and resume.")
@click.option("--log-level", default="info", envvar="CARAPACE_LOG_LEVEL", show_default=True)
@click.option("--log-json", is_flag=True, envvar="CARAPACE_LOG_JSON",
              help="Log JSON lines (for journald/Loki pipelines).")
def main(
    listen: tuple[str, int],
    policy_file: str,
    token_file: str,
    debug_listen: tuple[str, int] | None,
    debug_token_file: str | None,
    audit_log: str | None,
    handshake_timeout: float,
    idle_timeout: float,
    max_frame: int,
    max_requests_per_agent: int,
    max_agents: int,
    drain_timeout: float,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    resume_grace: float,
    log_level: str,
    log_json: bool,
) -> None:
    """Serve Carapace agents: decide, run and audit their tool requests on this host."""
    setup_logging(log_level, log_json)
    try:
        policy = load_policy_file(policy_file)
        tokens = load_server_tokens(token_file)
    except (PolicyError, TokenFileError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    config = ServerConfig(
        listen_host=listen[0],
        listen_port=listen[1],
        policy_file=policy_file,
        token_file=token_file,
        debug_host=debug_listen[0] if debug_listen else None,
        debug_port=debug_listen[1] if debug_listen else None,
        audit_log=audit_log,
        handshake_timeout=handshake_timeout,
        ping_interval=idle_timeout / 3,
        idle_timeout=idle_timeout,
        max_frame=max_frame,
        max_requests_per_agent=max_requests_per_agent,
        max_agents=max_agents,
        drain_timeout=drain_timeout,
        resume_grace=resume_grace,
    )
    server = Server(config, policy, tokens)
    if debug_listen is not None:
        try:
            set_debug_token(server, debug_access(*debug_listen, debug_token_file))
        except DebugConfigError as exc:
            log.error("%s", exc)
            sys.exit(2)
    if tls_cert or tls_key or tls_client_ca:
        if not (tls_cert and tls_key):
            log.error("TLS needs both --tls-cert and --tls-key")
            sys.exit(2)
        try:
            server.ssl_context = server_context(tls_cert, tls_key, tls_client_ca)
        except TlsConfigError as exc:
            log.error("%s", exc)
            sys.exit(2)
    log.info("loaded policy %s (%d tools) and %d agent token(s)", policy_file,
             len(policy.tools), len(tokens))
    try:
        trio.run(server.run)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        err = find_oserror(exc)
        if err is None:
            raise
        log.error("cannot listen on %s:%d: %s", config.listen_host, config.listen_port,
                  err.strerror or err)
        sys.exit(1)


if __name__ == "__main__":
    main()
