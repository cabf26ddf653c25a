"""carapace-shim: run a host-side CLI tool as if it were installed in this VM.

Installed as a symlink named after the tool (``op``, ``gh``...): the tool is
``basename(argv[0])``. It connects to the agent's unix socket
(``CARAPACE_AGENT_SOCKET``, else :func:`default_socket_path`), sends one
``cli_request`` and then relays, in real time, stdin as ``data``/``end``,
SIGINT/SIGTERM/SIGHUP/SIGQUIT as ``signal``, and ``output`` chunks to fds 1
and 2, and exits with the remote status. See "The shim socket" in
protocol/README.md.

It starts once per command, so start-up time is its latency: it imports only
the stdlib, msgpack and the sans-IO protocol — never trio, click, rich or
httpx (tests/agent/test_shim_imports.py guards this). Plain blocking sockets
and one thread:

- the main thread reads the socket and writes output with blocking writes, so
  a stdout nobody reads (a paused ``less``) stops it reading the socket, the
  agent stops returning credit and the remote process blocks on its pipe;
- a daemon thread copies stdin to the socket; it blocks when the agent stops
  reading (no tunnel credit), which holds back a fast stdin producer;
- signal handlers run in the main thread and send ``signal`` frames under the
  same lock as the stdin thread.
"""

from __future__ import annotations

# The C modules under socket, threading and signal: their Python wrappers build
# enums at import, about 7 ms of a start-up budget of about 25 ms.
import _signal
import _socket
import _thread
import errno
import os
import select
import sys
from collections.abc import Mapping

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import (
    CliRequest,
    Data,
    End,
    Exit,
    Message,
    Output,
    RequestFailed,
    Signal,
)

SHIM_NAME = "carapace-shim"
SOCKET_ENV = "CARAPACE_AGENT_SOCKET"
REQUEST_ID = 1
"""The shim socket carries one request, always id 1; the agent assigns the tunnel id."""

READ_SIZE = 64 * 1024
"""Largest stdin chunk per ``data`` frame."""

MAX_REQUEST_FRAME = 1024 * 1024
"""Cap on the ``cli_request`` frame (argv + cwd + environment), shared with the agent.

Linux itself allows about 2 MiB of argv and environment together; 1 MiB keeps a
hostile or runaway shim from parking large buffers in the agent while leaving
room for any command line a person types. Bulk data belongs on stdin.
"""

FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)

SIGNAL_SEND_TIMEOUT = 1.0
"""How long a signal waits for the socket (stuck behind stdin the agent is not taking)
before the shim hangs up instead, which makes the server kill the process group."""

# sysexits.h values, as the failure table in protocol/README.md prescribes.
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EXIT_TIMEOUT = 124
EXIT_SIGPIPE = 128 + _signal.SIGPIPE

FAILURE_EXIT: Mapping[str, int] = {
    "denied": EX_NOPERM,
    "unknown_tool": EX_NOPERM,
    "rate_limited": EX_TEMPFAIL,
    "bad_request": EX_USAGE,
    "upstream_unavailable": EX_UNAVAILABLE,
    "upstream_timeout": EXIT_TIMEOUT,
    "too_many_requests": EX_TEMPFAIL,
    "server_busy": EX_TEMPFAIL,
    "shutting_down": EX_UNAVAILABLE,
    "internal": EX_SOFTWARE,
    "not_approved": EX_NOPERM,
}

_STATUS_EXIT: Mapping[int, int] = {
    400: EX_USAGE, 403: EX_NOPERM, 404: EX_NOPERM, 429: EX_TEMPFAIL,
    502: EX_UNAVAILABLE, 503: EX_UNAVAILABLE, 504: EXIT_TIMEOUT,
}

_HINTS: Mapping[str, str] = {
    "denied": "the host's Carapace policy decides what may run; ask its operator",
    "unknown_tool": "the host's Carapace policy has no such tool; ask its operator",
    "shutting_down": "retry in a moment",
    "too_many_requests": "retry when some of your commands finish",
    "server_busy": "the host is busy; retry shortly",
    "not_approved": "a person on the host decides this command; ask its operator",
}


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """Where the agent listens when neither side is told: the per-user runtime dir, else /run."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "carapace", "agent.sock")
    return "/run/carapace/agent.sock"


def socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """The agent socket this shim uses: ``CARAPACE_AGENT_SOCKET`` or the default."""
    return environ.get(SOCKET_ENV) or default_socket_path(environ)


def _say(tool: str, text: str) -> None:
    """One line on stderr, prefixed so it is distinguishable from the tool's own output."""
    line = f"carapace: {tool}: {text}\n" if tool else f"carapace: {text}\n"
    try:
        _write_all(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``; wait (never spin) if the fd is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Connection:
    """The socket to the agent: whole frames under a lock, so threads never interleave."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.lock = _thread.allocate_lock()
        self.hung_up = False

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        with self.lock:
            self.sock.sendall(frame)

    def hang_up(self) -> None:
        """Close both directions now; the agent cancels the request and the host kills it."""
        self.hung_up = True
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass


class _SignalForwarder:
    """Turns local signals into ``signal`` frames (runs in the main thread)."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.pending: list[int] = []
        self.busy = False
        self.abandoned: int | None = None
        """The signal that could not be forwarded, so the shim hung up instead."""

    def install(self) -> None:
        for signum in FORWARDED_SIGNALS:
            _signal.signal(signum, self._handler)

    def _handler(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)
        if self.busy:  # a nested signal while we are sending: the outer call sends it
            return
        self.busy = True
        try:
            while self.pending:
                self._forward(self.pending.pop(0))
        finally:
            self.busy = False

    def _forward(self, signum: int) -> None:
        conn = self.conn
        if conn.hung_up:
            return
        if not conn.lock.acquire(timeout=SIGNAL_SEND_TIMEOUT):
            # The stdin thread is stuck in sendall (the agent has no credit for more
            # stdin). Locally this signal would have arrived at once, so hang up: the
            # server then stops the process group itself.
            self.abandoned = signum
            conn.hang_up()
            return
        try:
            conn.sock.sendall(encode(Signal(id=REQUEST_ID, signum=int(signum))))
        except OSError:
            pass
        finally:
            conn.lock.release()


def _stdin_may_be_read() -> bool:
    """False for a terminal we do not own (a background job): reading it would stop us."""
    try:
        if os.isatty(0):
            return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        pass
    return True


def _copy_stdin(conn: _Connection) -> None:
    """Thread body: stdin → ``data`` frames, ``end`` at EOF; stops quietly if the socket goes."""
    try:
        while True:
            try:
                chunk = os.read(0, READ_SIZE)
            except BlockingIOError:
                select.select([0], [], [])
                continue
            except OSError:  # stdin closed (EBADF) or unreadable (EIO): treat as EOF
                chunk = b""
            if not chunk:
                conn.send(End(id=REQUEST_ID))
                return
            conn.send(Data(id=REQUEST_ID, data=chunk))
    except OSError:
        return


def _connect(tool: str, path: str) -> _socket.socket | int:
    """The connected socket, or the exit status after saying why there is none."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        how = f"set {SOCKET_ENV} to the agent's socket, or start it with " \
              f"`carapace-agent --cli-socket {path} ...`"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            _say(tool, f"the Carapace agent is not running (no socket at {path}); {how}")
        elif exc.errno == errno.ECONNREFUSED:
            _say(tool, f"the Carapace agent is not running (nothing listens on {path}); {how}")
        elif exc.errno in (errno.EACCES, errno.EPERM):
            _say(tool, f"no permission to use the Carapace agent socket {path}; the agent "
                       "serves its own user (and group, if the socket is group-writable)")
        else:
            _say(tool, f"cannot reach the Carapace agent at {path}: {exc.strerror or exc}")
        return EX_UNAVAILABLE
    return sock


def _build_request(tool: str, args: list[str]) -> CliRequest:
    try:
        cwd = os.getcwd()
    except OSError:  # our directory was deleted; the host decides what the cwd means anyway
        cwd = os.environ.get("PWD", "/")
    return CliRequest(
        id=REQUEST_ID,
        tool=tool,
        argv=tuple(os.fsencode(a) for a in args),
        cwd=os.fsencode(cwd),
        env=tuple(os.environb.items()),
        tty=(_isatty(0), _isatty(1), _isatty(2)),
    )


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _failure_status(tool: str, msg: RequestFailed) -> int:
    text = msg.message
    hint = _HINTS.get(msg.code)
    if msg.retry_after is not None:
        hint = f"retry in {msg.retry_after} s"
        if hint in text:  # the server's message says it already
            hint = None
    _say(tool, f"{text} ({hint})" if hint else text)
    if msg.code in FAILURE_EXIT:
        return FAILURE_EXIT[msg.code]
    # A code newer than this shim: its HTTP status still says what kind of failure it is.
    return _STATUS_EXIT.get(msg.status, EX_SOFTWARE)


def _relay_output(tool: str, conn: _Connection, forwarder: _SignalForwarder) -> int:
    """Main loop: frames from the agent to fds 1 and 2 until ``exit`` or ``failed``."""
    decoder = FrameDecoder()
    while True:
        try:
            data = conn.sock.recv(256 * 1024)
        except OSError:
            data = b""
        if not data:
            if forwarder.abandoned is not None:
                return 128 + forwarder.abandoned
            _say(tool, "the Carapace agent closed the connection before the command finished "
                       "(was it stopped?)")
            return EX_UNAVAILABLE
        try:
            decoder.feed(data)
            for msg in decoder:
                if isinstance(msg, Output):
                    try:
                        _write_all(msg.fd, msg.data)
                    except BrokenPipeError:
                        # Like a local process on SIGPIPE: stop, and let the agent kill it.
                        conn.hang_up()
                        return EXIT_SIGPIPE
                    except OSError:
                        pass  # a closed fd or a vanished terminal: drop it, as tools do
                elif isinstance(msg, Exit):
                    if msg.reason:  # set only when Carapace ended it (a timeout), not the tool
                        _say(tool, msg.reason)
                    return msg.code
                elif isinstance(msg, RequestFailed):
                    return _failure_status(tool, msg)
                else:
                    raise ProtocolError(f"unexpected {msg.TYPE} frame")
        except ProtocolError as exc:
            _say(tool, f"the Carapace agent sent something this shim does not understand ({exc}); "
                       "are the agent and shim from the same version?")
            return EX_SOFTWARE


def run(argv: list[str], environ: Mapping[str, str] = os.environ) -> int:
    """Run one tool through the agent and return the exit status to exit with."""
    tool = os.path.basename(argv[0]) if argv else SHIM_NAME
    if tool in (SHIM_NAME, "shim.py", "__main__.py", ""):
        _say("", f"usage: symlink a tool name to {SHIM_NAME} (carapace-agent shims install "
                 "--dir DIR TOOL...) and run it by that name; the tool then runs on the host "
                 f"through the Carapace agent at {socket_path(environ)}")
        return EX_USAGE
    request = _build_request(tool, argv[1:])
    frame = encode(request)
    if len(frame) > MAX_REQUEST_FRAME:
        _say(tool, f"the arguments and environment take {len(frame)} bytes, over Carapace's "
                   f"limit of {MAX_REQUEST_FRAME} bytes per command; pass bulk data on stdin")
        return EX_USAGE
    path = socket_path(environ)
    sock = _connect(tool, path)
    if isinstance(sock, int):
        return sock
    conn = _Connection(sock)
    forwarder = _SignalForwarder(conn)
    try:
        sock.sendall(frame)
    except OSError:
        pass  # the agent refused us (it hung up); its `failed` frame says why
    else:
        forwarder.install()
        if _stdin_may_be_read():
            _thread.start_new_thread(_copy_stdin, (conn,))  # dies with the process
    return _relay_output(tool, conn, forwarder)


def main() -> None:
    """Console-script entry point; exits at once without interpreter teardown (latency)."""
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # Ctrl-C before the request: die quietly
    status = run(sys.argv)
    os._exit(status)


if __name__ == "__main__":
    main()
