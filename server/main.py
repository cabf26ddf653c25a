"""carapace-server: the host side. Its flags and environment variables are a fixed interface:
scripts and unit files outside this repository use them; change them only by adding."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import trio

from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.runtime.addresses import Address
from carapace.runtime.errors import find_exception
from carapace.runtime.logs import setup_logging
from carapace.runtime.options import COUNT_PER_SECONDS, FILE_MODE, HOST_PORT, LISTEN_ADDRESS
from carapace.runtime.tls import TlsConfigError, server_context
from carapace.runtime.tokens import TokenFileError, load_server_tokens
from carapace.runtime.transports import ListenError
from carapace.runtime.tuning import tune_gc
from carapace.runtime.unix_sockets import SOCKET_MODE

from .admission import DEFAULT_MAX_UNAUTHENTICATED, DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
from .approvals import DEFAULT_MAX_PENDING_APPROVALS
from .audit import (
    DEFAULT_BACKUPS,
    DEFAULT_DENY_LIMIT,
    DEFAULT_MAX_BYTES,
    AuditError,
    utc_timestamp,
)
from .audit.caps import DEFAULT_MAX_RECORD_BYTES, MIN_RECORD_BYTES
from .audit.throttle import DEFAULT_DENY_BYTES
from .config import (
    DEFAULT_AGENT_MEMORY_LIMIT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDSHAKE_MAX_FRAME,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_LINK_QUEUE,
    DEFAULT_MAX_REQUESTS_PER_AGENT,
    DEFAULT_POLICY_FILE,
    DEFAULT_RESUME_GRACE,
    ServerConfig,
)
from .daemon import Server
from .masking import private_key_blocks
from .mcp.filter import DEFAULT_MAX_MESSAGE_BYTES, MAX_PENDING
from .operator_api import DebugConfigError, debug_access
from .policy import (
    DEFAULT_SECRET_COMMAND_TIMEOUT,
    LIMIT_NAMES,
    ParseLimits,
    PolicyError,
    SecretResolver,
    load_policy_file,
    resolve_policy,
)
from .policy.limits import DEFAULT_LIMITS, LIMIT_HELP, env_var, flag
from .sandbox import SandboxError
from .shares import (
    DEFAULT_MAX_CLI_PROCESSES,
    DEFAULT_MAX_CLI_PROCESSES_PER_AGENT,
    DEFAULT_MAX_SSE_STREAMS,
    DEFAULT_MAX_SSE_STREAMS_PER_AGENT,
    DEFAULT_MAX_UPSTREAM_CONNECTIONS,
    DEFAULT_MAX_UPSTREAM_CONNECTIONS_PER_AGENT,
    ShareCaps,
)

log = logging.getLogger("carapace.server")


class ServerCommand(click.Command):
    """``carapace-server [FLAGS]``, plus ``carapace-server reload [--pid-file F]``.

    The server is one command whose flags are fixed, so ``reload`` is
    recognised as the first argument before the flags are parsed (the
    server takes no positional arguments, so nothing else can mean it).
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("args", args[0] if args else None)
        argv = list(sys.argv[1:] if given is None else given)
        if argv[:1] == ["reload"]:
            prog = kwargs.get("prog_name") or "carapace-server"
            return reload_command.main(argv[1:], prog_name=f"{prog} reload")
        return super().main(*args, **kwargs)


def parse_limit_options(command: Any) -> Any:
    """The flags of the parse limits (``policy/limits.py``), one per limit, in its order."""
    for name in reversed(LIMIT_NAMES):
        command = click.option(
            flag(name), name, type=click.IntRange(min=1), default=getattr(DEFAULT_LIMITS, name),
            envvar=env_var(name), show_default=True, show_envvar=True,
            help=f"{LIMIT_HELP[name]} A tool may override it with limits.{name} in the policy.",
        )(command)
    return command


@click.command(cls=ServerCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", type=LISTEN_ADDRESS, multiple=True,
              default=["{}:{}".format(*DEFAULT_LISTEN)], envvar="CARAPACE_LISTEN",
              show_default=True, show_envvar=True,
              help="Address agents connect to: HOST:PORT (TCP), unix:/path/to/socket (a bind "
              "mount, Firecracker's vsock uds_path_PORT) or vsock:PORT (AF_VSOCK, any CID). "
              "Repeat it to listen on several; CARAPACE_LISTEN takes several separated by "
              "spaces.")
@click.option("--policy", "policy_file", default=DEFAULT_POLICY_FILE,
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
@click.option("--audit-max-bytes", type=click.IntRange(min=0), default=DEFAULT_MAX_BYTES,
              envvar="CARAPACE_AUDIT_MAX_BYTES", show_default=True,
              help="Rotate the audit log before it grows past this size (0: never rotate; "
              "SIGHUP reopens it for an external logrotate).")
@click.option("--audit-backups", type=click.IntRange(min=0), default=DEFAULT_BACKUPS,
              envvar="CARAPACE_AUDIT_BACKUPS", show_default=True,
              help="Rotated audit logs to keep (FILE.1 is the newest).")
@click.option("--audit-fsync", is_flag=True, envvar="CARAPACE_AUDIT_FSYNC",
              help="fsync each decision record before the request runs, so that even a host "
              "crash loses none (costs a disk sync per request; records are always flushed "
              "to the OS).")
@click.option("--audit-deny-limit", type=COUNT_PER_SECONDS, default="100/10",
              envvar="CARAPACE_AUDIT_DENY_LIMIT", show_default=True,
              help="Deny records per agent in any window (N/SECONDS, 0: no limit); past it "
              "denials are counted in one denials_suppressed record per window, so a flood "
              "cannot rotate older records away.")
@click.option("--pid-file", default=None, envvar="CARAPACE_PID_FILE",
              help="Write the server's pid here while it runs (for 'carapace-server reload').")
@click.option("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT,
              show_default=True)
@click.option("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, show_default=True,
              help="Drop an agent link silent for this long (pings every third of it).")
@click.option("--max-frame", type=int, default=DEFAULT_MAX_FRAME, show_default=True,
              help="Largest frame accepted from an agent, in bytes.")
@click.option("--max-requests-per-agent", type=int, default=DEFAULT_MAX_REQUESTS_PER_AGENT,
              show_default=True)
@click.option("--max-agents", type=int, default=DEFAULT_MAX_AGENTS, show_default=True)
@click.option("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
              help="On SIGTERM, how long in-flight requests may finish.")
@click.option("--tls-cert", default=None, envvar="CARAPACE_TLS_CERT",
              help="Serve agents over TLS with this certificate (PEM).")
@click.option("--tls-key", default=None, envvar="CARAPACE_TLS_KEY",
              help="Private key for --tls-cert (PEM).")
@click.option("--tls-client-ca", default=None, envvar="CARAPACE_TLS_CLIENT_CA",
              help="Require agents to present a certificate signed by this CA (PEM).")
@click.option("--resume-grace", type=float, default=DEFAULT_RESUME_GRACE, show_default=True,
              help="How long a dropped agent's session (its requests and processes) waits "
              "for the agent to reconnect and resume.")
@click.option("--handshake-max-frame", type=click.IntRange(min=256),
              default=DEFAULT_HANDSHAKE_MAX_FRAME, envvar="CARAPACE_HANDSHAKE_MAX_FRAME",
              show_default=True, show_envvar=True,
              help="Largest frame accepted before an agent has authenticated, in bytes; a "
              "larger length prefix closes the connection before its body is read.")
@click.option("--max-unauthenticated", type=click.IntRange(min=1),
              default=DEFAULT_MAX_UNAUTHENTICATED, envvar="CARAPACE_MAX_UNAUTHENTICATED",
              show_default=True, show_envvar=True,
              help="Connections still in their handshake at once; more are closed at once.")
@click.option("--max-unauthenticated-per-address", type=click.IntRange(min=1),
              default=DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
              envvar="CARAPACE_MAX_UNAUTHENTICATED_PER_ADDRESS", show_default=True,
              show_envvar=True,
              help="Of those, from one source address.")
@click.option("--max-link-queue", type=click.IntRange(min=64 * 1024),
              default=DEFAULT_MAX_LINK_QUEUE, envvar="CARAPACE_MAX_LINK_QUEUE",
              show_default=True, show_envvar=True,
              help="Bytes queued on one agent link; an agent that stops reading its socket "
              "until the queue holds this much is disconnected.")
@click.option("--agent-memory-limit", type=click.IntRange(min=1024 * 1024),
              default=DEFAULT_AGENT_MEMORY_LIMIT, envvar="CARAPACE_AGENT_MEMORY_LIMIT",
              show_default=True, show_envvar=True,
              help="Bytes one agent may make the server hold: data sent to its requests "
              "and not yet consumed (e.g. stdin a process does not read), request bodies "
              "while they run, frames kept for its resumption, and its link's queue. A "
              "request that would pass it is refused; past it, the session is ended.")
@click.option("--log-level", default="info", envvar="CARAPACE_LOG_LEVEL", show_default=True)
@click.option("--log-json", is_flag=True, envvar="CARAPACE_LOG_JSON",
              help="Log JSON lines (for journald/Loki pipelines).")
@click.option("--audit-deny-bytes", type=click.IntRange(min=0), default=DEFAULT_DENY_BYTES,
              envvar="CARAPACE_AUDIT_DENY_BYTES", show_default=True,
              help="Bytes of deny records per agent in the --audit-deny-limit window (0: no "
              "byte budget); past it denials are counted like those past the limit, so "
              "large records cannot rotate older ones away either.")
@click.option("--audit-max-record-bytes", type=click.IntRange(min=MIN_RECORD_BYTES),
              default=DEFAULT_MAX_RECORD_BYTES, envvar="CARAPACE_AUDIT_MAX_RECORD_BYTES",
              show_default=True,
              help="Largest audit record, as written (JSON); longer values are cut to a "
              "marked head with the byte count and SHA-256 of the whole.")
@click.option("--secret-command-timeout", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_SECRET_COMMAND_TIMEOUT, envvar="CARAPACE_SECRET_COMMAND_TIMEOUT",
              show_default=True,
              help="Seconds a policy's {command: [...]} secret reference may run (at start and "
              "each reload) unless it sets its own timeout_secs; then its process group is "
              "killed and the policy refused.")
@click.option("--unix-socket-mode", type=FILE_MODE, default=f"{SOCKET_MODE:04o}",
              envvar="CARAPACE_UNIX_SOCKET_MODE", show_default=True, show_envvar=True,
              help="File mode of each --listen unix: socket (its owner and group, and the "
              "directory's, decide who else may connect).")
@click.option("--max-cli-processes-per-agent", type=click.IntRange(min=0),
              default=DEFAULT_MAX_CLI_PROCESSES_PER_AGENT,
              envvar="CARAPACE_MAX_CLI_PROCESSES_PER_AGENT", show_envvar=True, show_default=True,
              help="CLI tool processes one agent may run at once; past it 429 (0: no cap).")
@click.option("--max-cli-processes", type=click.IntRange(min=0),
              default=DEFAULT_MAX_CLI_PROCESSES, envvar="CARAPACE_MAX_CLI_PROCESSES",
              show_envvar=True, show_default=True,
              help="CLI tool processes all agents together may run at once; past it 503.")
@click.option("--max-upstream-connections-per-agent", type=click.IntRange(min=0),
              default=DEFAULT_MAX_UPSTREAM_CONNECTIONS_PER_AGENT,
              envvar="CARAPACE_MAX_UPSTREAM_CONNECTIONS_PER_AGENT", show_envvar=True,
              show_default=True,
              help="Connections one agent may hold open to one HTTP tool's upstream (one per "
              "request in flight, an event stream's while it is open); past it 429.")
@click.option("--max-upstream-connections", type=click.IntRange(min=0),
              default=DEFAULT_MAX_UPSTREAM_CONNECTIONS,
              envvar="CARAPACE_MAX_UPSTREAM_CONNECTIONS", show_envvar=True, show_default=True,
              help="Connections all agents together may hold open to one HTTP tool's "
              "upstream; past it 503.")
@click.option("--max-sse-streams-per-agent", type=click.IntRange(min=0),
              default=DEFAULT_MAX_SSE_STREAMS_PER_AGENT,
              envvar="CARAPACE_MAX_SSE_STREAMS_PER_AGENT", show_envvar=True, show_default=True,
              help="Event streams one agent may hold open (all tools); past it 429.")
@click.option("--max-sse-streams", type=click.IntRange(min=0),
              default=DEFAULT_MAX_SSE_STREAMS, envvar="CARAPACE_MAX_SSE_STREAMS", show_envvar=True,
              show_default=True,
              help="Event streams all agents together may hold open; past it 503.")
@click.option("--approval-notify", default=None, envvar="CARAPACE_APPROVAL_NOTIFY",
              metavar="COMMAND", show_envvar=True,
              help="Shell command run for each new pending approval, with a JSON summary on "
              "stdin (to page a person: notify-send, ntfy, a chat webhook); its failure is "
              "logged and never holds the request.")
@click.option("--max-pending-approvals", type=click.IntRange(min=1),
              default=DEFAULT_MAX_PENDING_APPROVALS, envvar="CARAPACE_MAX_PENDING_APPROVALS",
              show_default=True, show_envvar=True,
              help="Calls one agent may have waiting for approval at once; more are refused "
              "with too_many_requests, so a VM cannot flood the operator.")
@click.option("--mcp-max-message-bytes", type=click.IntRange(min=1024),
              default=DEFAULT_MAX_MESSAGE_BYTES, envvar="CARAPACE_MCP_MAX_MESSAGE_BYTES",
              show_default=True,
              help="Largest MCP message (one JSON-RPC line) either way in an MCP session; a "
              "longer one ends the session with an error on the client's stderr.")
@click.option("--mcp-max-pending", type=click.IntRange(min=1), default=MAX_PENDING,
              envvar="CARAPACE_MCP_MAX_PENDING", show_default=True,
              help="Requests an MCP client may leave waiting for the host server's answer; "
              "one more ends the session (each waiting id is remembered).")
@parse_limit_options
# Long by nature, not by logic: one parameter per flag (click passes each by name) and
# one ServerConfig field per flag; the steps themselves are the helpers below.
def main(
    listen: tuple[Address, ...],
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
    audit_max_bytes: int = DEFAULT_MAX_BYTES,
    audit_backups: int = DEFAULT_BACKUPS,
    audit_fsync: bool = False,
    audit_deny_limit: tuple[int, float] = DEFAULT_DENY_LIMIT,
    pid_file: str | None = None,
    audit_deny_bytes: int = DEFAULT_DENY_BYTES,
    audit_max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    secret_command_timeout: float = DEFAULT_SECRET_COMMAND_TIMEOUT,
    handshake_max_frame: int = DEFAULT_HANDSHAKE_MAX_FRAME,
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
    max_unauthenticated_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
    max_link_queue: int = DEFAULT_MAX_LINK_QUEUE,
    agent_memory_limit: int = DEFAULT_AGENT_MEMORY_LIMIT,
    unix_socket_mode: int = SOCKET_MODE,
    max_cli_processes_per_agent: int = DEFAULT_MAX_CLI_PROCESSES_PER_AGENT,
    max_cli_processes: int = DEFAULT_MAX_CLI_PROCESSES,
    max_upstream_connections_per_agent: int = DEFAULT_MAX_UPSTREAM_CONNECTIONS_PER_AGENT,
    max_upstream_connections: int = DEFAULT_MAX_UPSTREAM_CONNECTIONS,
    max_sse_streams_per_agent: int = DEFAULT_MAX_SSE_STREAMS_PER_AGENT,
    max_sse_streams: int = DEFAULT_MAX_SSE_STREAMS,
    approval_notify: str | None = None,
    max_pending_approvals: int = DEFAULT_MAX_PENDING_APPROVALS,
    mcp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    mcp_max_pending: int = MAX_PENDING,
    **parse_limits: int,
) -> None:
    """Serve Carapace agents: decide, run and audit their tool requests on this host.

    SIGHUP (or 'carapace-server reload --pid-file FILE') re-reads the policy
    and the token file; an invalid file is rejected and the old ones stay.

    A secret in the policy (an env_inject or headers_inject value) may be a
    reference instead of plain text: {file: /path} (not readable by others;
    one trailing newline dropped), {credential: NAME} (systemd's
    $CREDENTIALS_DIRECTORY/NAME, from LoadCredential= or
    LoadCredentialEncrypted=), {env: NAME} (this server's environment) or
    {command: [PROGRAM, ARG...]} (run without a shell, stdout stripped, e.g.
    ["op", "read", "op://vault/item/field"]). They are resolved at start and
    at each reload; one that fails refuses the policy, naming the key and the
    reference, never a value.
    """
    setup_logging(log_level, log_json)
    resolver = SecretResolver.from_environment(os.environ, secret_command_timeout)
    try:
        policy = resolve_policy(load_policy_file(policy_file), resolver)
        tokens = load_server_tokens(token_file)
    except (PolicyError, TokenFileError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    config = ServerConfig(
        listen=tuple(listen),
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
        audit_max_bytes=audit_max_bytes,
        audit_backups=audit_backups,
        audit_fsync=audit_fsync,
        audit_deny_limit=audit_deny_limit,
        audit_deny_bytes=audit_deny_bytes,
        audit_max_record_bytes=audit_max_record_bytes,
        parse_limits=ParseLimits(**parse_limits),
        tls_key=tls_key,
        debug_token_file=debug_token_file,
        handshake_max_frame=handshake_max_frame,
        max_unauthenticated=max_unauthenticated,
        max_unauthenticated_per_address=max_unauthenticated_per_address,
        max_link_queue=max_link_queue,
        agent_memory_limit=agent_memory_limit,
        unix_socket_mode=unix_socket_mode,
        shares=ShareCaps(
            cli_processes_per_agent=max_cli_processes_per_agent,
            cli_processes=max_cli_processes,
            upstream_connections_per_agent=max_upstream_connections_per_agent,
            upstream_connections=max_upstream_connections,
            sse_streams_per_agent=max_sse_streams_per_agent,
            sse_streams=max_sse_streams,
        ),
        approval_notify=approval_notify or None,
        max_pending_approvals=max_pending_approvals,
        mcp_max_message_bytes=mcp_max_message_bytes,
        mcp_max_pending=mcp_max_pending,
    )
    debug_token = _debug_token(debug_listen, debug_token_file)
    ssl_context = _tls_context(tls_cert, tls_key, tls_client_ca)
    try:
        server = Server(config, policy, tokens, debug_token=debug_token, ssl_context=ssl_context,
                        secret_resolver=resolver, tls_key_material=_tls_key_material(tls_key))
    except (AuditError, SandboxError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    log.info("loaded policy %s (%d tools) and %d agent token(s)", policy_file,
             len(policy.tools), len(tokens))
    _serve(server, config, pid_file)


def _debug_token(listen: tuple[str, int] | None, token_file: str | None) -> bytes | None:
    """The bearer token the debug listener requires (None: none, or no listener);
    exits with status 2 when a non-loopback listener has no token file."""
    if listen is None:
        return None
    try:
        return debug_access(*listen, token_file)
    except DebugConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)


def _tls_context(
    cert: str | None, key: str | None, client_ca: str | None
) -> ssl.SSLContext | None:
    """The TLS context agents are served with (None: plain TCP); exits with status 2 when
    the flags are incomplete or the files are unusable."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        log.error("TLS needs both --tls-cert and --tls-key")
        sys.exit(2)
    try:
        return server_context(cert, key, client_ca)
    except TlsConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)


def _tls_key_material(tls_key: str | None) -> list[bytes]:
    """The private key blocks of ``--tls-key``, to mask them in tool output (the TLS
    context has loaded the file already; a read error here still stops the start)."""
    if not tls_key:
        return []
    try:
        return private_key_blocks(Path(tls_key).read_bytes())
    except OSError as exc:
        log.error("cannot read --tls-key %s: %s", tls_key, exc.strerror or exc)
        sys.exit(2)


def _serve(server: Server, config: ServerConfig, pid_file: str | None) -> None:
    """Run ``server`` until it stops; exits with status 1 when it cannot listen."""
    # A SIGHUP before the server's own handler is installed must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _pid_file(pid_file, server):
            tune_gc()
            trio.run(server.run)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        err = find_exception(exc, OSError)
        if err is None:
            raise
        if isinstance(err, ListenError):
            log.error("%s", err.strerror)
        else:
            log.error("cannot listen on %s: %s",
                      ", ".join(address.describe() for address in config.listen),
                      err.strerror or err)
        sys.exit(1)


# -- pid file and `carapace-server reload` --------------------------------------------
#
# The server writes its pid to --pid-file, and after every reload attempt a status
# file beside it, FILE.reload: {"pid", "seq", "ok", "message", "ts"}. `reload` reads
# the pid, checks that it is a carapace-server, sends SIGHUP and waits for the status
# to change, so it can say whether the new policy was accepted.


def _status_path(pid_file: str) -> Path:
    return Path(f"{pid_file}.reload")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_pid(pid_file: str) -> int | None:
    try:
        text = Path(pid_file).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_carapace_server(pid: int) -> bool | None:
    """Whether ``pid`` runs carapace-server (None: it runs, but /proc cannot tell what)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return b"carapace-server" in cmdline or b"carapace.server" in cmdline


@contextlib.contextmanager
def _pid_file(pid_file: str | None, server: Server) -> Iterator[None]:
    if not pid_file:
        yield
        return
    other = _read_pid(pid_file)
    if other is not None and other != os.getpid() and _is_carapace_server(other):
        log.error("another carapace-server (pid %d) is running with --pid-file %s; stop it "
                  "or use another pid file", other, pid_file)
        sys.exit(2)
    try:
        _write_atomically(Path(pid_file), f"{os.getpid()}\n")
    except OSError as exc:
        log.error("cannot write --pid-file %s: %s", pid_file, exc.strerror or exc)
        sys.exit(2)
    seq = 0

    def report(ok: bool, message: str) -> None:
        nonlocal seq
        seq += 1
        status = {"pid": os.getpid(), "seq": seq, "ok": ok, "message": message,
                  "ts": utc_timestamp()}
        try:
            _write_atomically(_status_path(pid_file), json.dumps(status) + "\n")
        except OSError as exc:
            log.warning("cannot write the reload status %s: %s", _status_path(pid_file),
                        exc.strerror or exc)

    server.on_reload = report
    try:
        yield
    finally:
        if _read_pid(pid_file) == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
            with contextlib.suppress(OSError):
                os.unlink(_status_path(pid_file))


def _read_status(pid_file: str) -> dict[str, object] | None:
    try:
        doc = json.loads(_status_path(pid_file).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@click.command("reload", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pid-file", envvar="CARAPACE_PID_FILE", default=None,
              help="The --pid-file the server was started with.  [env: CARAPACE_PID_FILE]")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="How long to wait for the server to report the outcome.")
def reload_command(pid_file: str | None, timeout: float) -> None:
    """Make the running carapace-server re-read its policy and token file (SIGHUP).

    Exits 0 when the server accepted the new files, 1 when it rejected them
    (it keeps the old ones and says why) or no server is running.
    """
    if not pid_file:
        click.echo("carapace-server reload: which server? Give --pid-file FILE (or set "
                   "CARAPACE_PID_FILE) as the server was started with, or send it SIGHUP "
                   "yourself (kill -HUP PID).", err=True)
        sys.exit(2)
    pid = _read_pid(pid_file)
    if pid is None:
        click.echo(f"carapace-server reload: no carapace-server is running with pid file "
                   f"{pid_file} (it does not exist or holds no pid).", err=True)
        sys.exit(1)
    running = _is_carapace_server(pid)
    if running is False:
        click.echo(f"carapace-server reload: pid {pid} from {pid_file} is not a running "
                   "carapace-server (a stale pid file?); nothing was signalled.", err=True)
        sys.exit(1)
    before = _read_status(pid_file)
    before_key = (before or {}).get("pid"), (before or {}).get("seq")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        click.echo(f"carapace-server reload: cannot signal pid {pid}: {exc.strerror or exc}",
                   err=True)
        sys.exit(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read_status(pid_file)
        if status is not None and (status.get("pid"), status.get("seq")) != before_key:
            if status.get("ok"):
                click.echo(f"carapace-server (pid {pid}): {status.get('message')}")
                return
            click.echo(f"carapace-server (pid {pid}): {status.get('message')}", err=True)
            sys.exit(1)
        time.sleep(0.05)
    click.echo(f"carapace-server reload: sent SIGHUP to pid {pid}, but it reported no outcome "
               f"within {timeout:g} s; check its log.", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
