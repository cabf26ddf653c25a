"""Run one allowed CLI request on the host: exec, stream, signal, time out, reap.

The policy has already decided (``decision`` says exactly what to exec: the
binary and argv, a clean environment with ``env_inject``, a resolved cwd).
Here the binary runs directly — never through a shell — in a process group
of its own, so every signal, timeout and cancellation reaches the whole
group, grandchildren included:

- stdout and stderr are read by two tasks and each chunk goes out as an
  ``output`` frame the moment it is read; ``stream.send`` waits for credit,
  and while it waits the task does not read its pipe, so a VM reader that
  stalls makes the process block on a full pipe (flow control end to end);
- stdin frames are written to the process as they arrive, and their credit
  is returned only once written; a ``signal`` frame never waits behind them;
- ``timeout_secs`` bounds the whole run: SIGTERM to the group, SIGKILL after
  ``kill_grace``, ``exit`` 124;
- cancellation (the shim went away, the link died, shutdown) stops the
  group the same way, shielded, so no process outlives its request;
- when the leader exits, whatever is left of its group is stopped too: a
  run's processes end with the run.

How the process is started — confined by bubblewrap or not, and how the
checked working directory is entered — is :class:`~.sandbox.Sandbox`'s
business: it gives the argv, the cwd and the fds to pass.

``env_inject`` values are in ``decision.env``; nothing here logs, formats or
sends the environment. Output passes through an optional per-fd
:class:`OutputFilter` — the hook where secret masking plugs in.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio

from carapace.protocol.messages import CliRequest, Data, End, Exit, Output, Signal
from carapace.runtime.errors import find_exception

from .policy import DEFAULT_TIMEOUT_SECS, CliDecision, CliTool, McpTool
from .sandbox import Sandbox
from .streams import ServerStream

log = logging.getLogger("carapace.server")

READ_SIZE = 64 * 1024
"""Largest ``output`` chunk: one pipe's worth, read and sent at once."""

FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
"""Signals the VM may send to the process group; any other number is ignored."""


class OutputFilter(Protocol):
    """Rewrites one output stream on its way to the VM (e.g. masks secrets).

    ``feed`` may hold back a few bytes (a partial match) and returns what can
    go now; ``flush`` returns the rest at end of stream.
    """

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


OutputFilterFactory = Callable[[int], OutputFilter]
"""Makes one :class:`OutputFilter` per fd (1 stdout, 2 stderr) for each run."""

STREAM_REFUSED_EXIT = 65
"""Exit status of a run a :class:`StdioHook` ended (sysexits' EX_DATAERR: bad input)."""


class HookRefusal(Exception):
    """Raised by a :class:`StdioHook`: the run must end; the message is for the VM's stderr."""


class StdioHook(Protocol):
    """Sits between the VM and the process on stdin and stdout (an MCP session's filter).

    It sees the streams before any :class:`OutputFilter`, returns only whole
    messages, and may answer the VM itself: those replies go to the VM's
    stdout between two of the process's messages. Any step may raise
    :class:`HookRefusal`; steps are async so that a costly one can leave the
    event loop. Deadlines are in trio time.
    """

    async def to_process(self, data: bytes) -> tuple[bytes, bytes]:
        """(for the process's stdin, replies for the VM's stdout)."""
        ...

    async def stdin_closed(self) -> tuple[bytes, bytes]: ...

    async def from_process(self, data: bytes) -> bytes: ...

    async def stdout_closed(self) -> bytes: ...

    def next_deadline(self) -> float | None: ...

    async def run_gates(self, deliver: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        """Runs as long as the process: what the hook decides later (a call that waited for
        approval) goes out through ``deliver`` (for the process's stdin, for the VM's stdout)."""
        ...

    async def expire(self) -> bytes:
        """Replies for whatever is past its deadline now."""
        ...


@dataclass
class ExitInfo:
    """How a run ended, for the audit trail (filled in place, so a cancelled run has one too)."""

    code: int | None = None
    """The status the shim exits with; None if no exit was sent (never started, cancelled)."""
    signal: int | None = None
    timed_out: bool = False
    cancelled: str | None = None
    """Why the run was cut off from the VM side (shim gone, link lost), if it was."""
    error: str | None = None
    """Why the binary could not be started, if it could not."""
    reason: str = ""
    pid: int | None = None
    bytes_in: int = 0
    """stdin bytes written to the process."""
    bytes_out: int = 0
    """stdout + stderr bytes sent to the VM."""
    duration: float = 0.0


def _status(returncode: int) -> tuple[int, int | None]:
    """Exit code and signal, as a shell reports them: killed by signal N is 128+N."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def _spawn_error(decision: CliDecision, exc: OSError | ValueError) -> str:
    """What went wrong starting the binary — from the OS error, never from the environment."""
    if isinstance(exc, OSError):
        why = exc.strerror or type(exc).__name__
        if exc.filename is not None and os.fsencode(exc.filename) == decision.cwd != b"/":
            shown = decision.cwd.decode("utf-8", "replace")
            return f"cannot run {decision.binary} in {shown}: {why}"
        return f"cannot run {decision.binary}: {why}"
    return f"cannot run {decision.binary}: invalid argument list ({exc})"


async def run_cli(
    stream: ServerStream,
    req: CliRequest,
    decision: CliDecision,
    tool: CliTool | McpTool,
    *,
    kill_grace: float = 2.0,
    filters: OutputFilterFactory | None = None,
    info: ExitInfo | None = None,
    sandbox: Sandbox | None = None,
    hook: StdioHook | None = None,
    timeout: float | None = None,
) -> ExitInfo:
    """Run ``decision`` for ``req``, streaming over ``stream``; end with ``exit`` or ``failed``.

    Returns (and fills ``info`` in place, if given) how the run ended. On
    cancellation the process group is stopped before Cancelled propagates.
    ``sandbox`` confines the process (None: unconfined, as ``settings.sandbox: none``).
    ``hook`` filters stdin and stdout message by message; ``timeout`` (seconds,
    ``math.inf`` for none) replaces the tool's ``timeout_secs`` for the whole run.
    """
    info = info if info is not None else ExitInfo()
    started = trio.current_time()
    try:
        spawn = (sandbox if sandbox is not None else Sandbox(())).spawn(decision, tool)
        try:
            proc = await trio.lowlevel.open_process(
                spawn.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=decision.env,  # type: ignore[arg-type]  # bytes on POSIX, as subprocess allows
                cwd=spawn.cwd,
                pass_fds=spawn.pass_fds,
                start_new_session=True,
            )
        finally:
            spawn.close()
    except (OSError, ValueError) as exc:
        info.error = _spawn_error(decision, exc)
        log.warning("request %d (tool %s): %s", req.id, req.tool, info.error)
        stream.fail(502, "upstream_unavailable", info.error)
        return info
    info.pid = proc.pid
    if timeout is None:
        timeout = float(tool.timeout_secs or DEFAULT_TIMEOUT_SECS)
    run = _Run(stream, req.id, proc, kill_grace, filters, info, hook)
    try:
        await run.run(timeout)
    except BaseException as exc:
        # The run's nursery hands on a cancellation as a group of Cancelled: look inside.
        if find_exception(exc, trio.Cancelled) is not None:
            info.cancelled = stream.cancel_reason or "cancelled"
        raise
    finally:
        with trio.CancelScope(shield=True):
            await run.cleanup()
        info.duration = trio.current_time() - started
    code = info.code
    assert code is not None
    stream.send_control(Exit(id=req.id, code=code, signal=info.signal, reason=info.reason))
    return info


class _Run:
    """One live process and the tasks that connect it to its stream."""

    def __init__(self, stream: ServerStream, request_id: int, proc: trio.Process,
                 grace: float, filters: OutputFilterFactory | None, info: ExitInfo,
                 hook: StdioHook | None = None) -> None:
        self.stream = stream
        self.id = request_id
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the leader's pid is the group id
        self.grace = grace
        self.filters = filters
        self.info = info
        self.open_pipes = 2
        self.pipes_closed = trio.Event()
        self.stdin_open = True
        # Unbounded on purpose: the agent's credit already bounds what can queue here.
        self._stdin_send, self._stdin_receive = trio.open_memory_channel[Data | End](math.inf)
        self.hook = hook
        self.refused: str | None = None
        """Why the hook ended the run, if it did."""
        self._hook_poke = trio.Event()
        self._stdin_lock = trio.Lock()
        """Whole messages to the process's stdin: from the VM's frames and from the hook's
        later decisions."""
        self._nursery: trio.Nursery | None = None

    def _killpg(self, signum: int) -> bool:
        """Signal the group; False if no process is left in it."""
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def run(self, timeout: float) -> None:
        info = self.info
        async with trio.open_nursery() as nursery:
            assert self.proc.stdout is not None and self.proc.stderr is not None
            nursery.start_soon(self._pump, 1, self.proc.stdout)
            nursery.start_soon(self._pump, 2, self.proc.stderr)
            nursery.start_soon(self._dispatch_inbox)
            nursery.start_soon(self._write_stdin)
            self._nursery = nursery
            if self.hook is not None:
                nursery.start_soon(self._hook_timer)
                nursery.start_soon(self.hook.run_gates, self._hook_deliver)
            with trio.move_on_after(timeout) as timer:
                returncode = await self.proc.wait()
                if self._killpg(signal.SIGTERM):  # the leader is done: so is its group
                    with trio.move_on_after(self.grace):
                        await self.pipes_closed.wait()
                    self._killpg(signal.SIGKILL)
                await self.pipes_closed.wait()  # every output chunk sent before the exit
            if timer.cancelled_caught:
                info.timed_out = True
                info.code, info.signal = 124, None
                info.reason = (f"timed out after {timeout:g} s on the host and was stopped "
                               "(the tool's timeout_secs in the host policy; its operator can "
                               "raise it)")
                log.info("request %d (pid %d): %s", self.id, self.proc.pid, info.reason)
                await self._stop_group()
                with trio.move_on_after(self.grace):  # pass on what is still in the pipes
                    await self.pipes_closed.wait()
            else:
                info.code, info.signal = _status(returncode)
            if self.refused is not None:
                info.code, info.signal, info.reason = STREAM_REFUSED_EXIT, None, self.refused
            nursery.cancel_scope.cancel()

    async def _stop_group(self) -> None:
        """SIGTERM to the group, SIGKILL after the grace; the leader is reaped."""
        if self.proc.returncode is None and self._killpg(signal.SIGTERM):
            with trio.move_on_after(self.grace):
                await self.proc.wait()
        self._killpg(signal.SIGKILL)  # also whatever ignored SIGTERM or outlived the leader
        with trio.move_on_after(self.grace + 5):
            await self.proc.wait()

    async def cleanup(self) -> None:
        """Stop whatever is left (shielded by the caller) and close our pipe ends."""
        if self.proc.returncode is None:
            await self._stop_group()
        else:
            self._killpg(signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                await pipe.aclose()

    async def _pump(self, fd: int, pipe: trio.abc.ReceiveStream) -> None:
        """One output pipe → ``output`` frames; reads only when the stream has credit."""
        filt = self.filters(fd) if self.filters is not None else None
        try:
            while True:
                data = cast(bytes, await pipe.receive_some(READ_SIZE))  # FdStream: bytes
                if not data:
                    break
                if fd == 1 and self.hook is not None:
                    data = await self._hooked(self.hook.from_process(data))
                if filt is not None:
                    data = filt.feed(data)
                await self._send_output(fd, data)
            if fd == 1 and self.hook is not None:
                tail = await self._hooked(self.hook.stdout_closed())
                await self._send_output(fd, filt.feed(tail) if filt is not None else tail)
            if filt is not None:
                await self._send_output(fd, filt.flush())
        finally:
            self.open_pipes -= 1
            if not self.open_pipes:
                self.pipes_closed.set()

    async def _hooked(self, step: Coroutine[Any, Any, bytes]) -> bytes:
        """One hook step on stdout; nothing more goes out once the hook has refused."""
        if self.refused is not None:
            step.close()
            return b""
        try:
            return await step
        except HookRefusal as exc:
            await self._refuse(str(exc))
            return b""

    async def _refuse(self, message: str) -> None:
        """End the run for the hook: say why on the VM's stderr, stop the process group."""
        if self.refused is not None:
            return
        self.refused = message
        log.warning("request %d (pid %d): %s", self.id, self.proc.pid, message)
        await self._send_output(2, f"carapace: {message}\n".encode())
        if self._nursery is not None:
            self._nursery.start_soon(self._stop_group)

    async def _hook_timer(self) -> None:
        """Answers what the hook says is past its deadline; woken by each stdin chunk."""
        hook = self.hook
        assert hook is not None
        while self.refused is None:
            deadline = hook.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._hook_poke.wait()
            self._hook_poke = trio.Event()
            await self._send_output(1, await self._hooked(hook.expire()))

    async def _send_output(self, fd: int, data: bytes) -> None:
        if data:
            await self.stream.send(Output(id=self.id, fd=fd, data=data))
            self.info.bytes_out += len(data)

    async def _dispatch_inbox(self) -> None:
        """Signals act at once; stdin frames queue for the writer (which may block)."""
        async for msg in self.stream.incoming():
            if isinstance(msg, Signal):
                self._signal(msg.signum)
            elif isinstance(msg, Data | End):
                self._stdin_send.send_nowait(msg)

    def _signal(self, signum: int) -> None:
        if signum not in FORWARDED_SIGNALS:
            log.debug("request %d: signal %d from the agent ignored", self.id, signum)
            return
        if self.proc.returncode is None:  # once reaped, the group id may be reused
            self._killpg(signum)

    async def _write_stdin(self) -> None:
        """stdin frames → the process; credit goes back only once a chunk is written."""
        stdin = self.proc.stdin
        assert stdin is not None
        async for msg in self._stdin_receive:
            if self.hook is not None:
                await self._hook_stdin(msg)
                continue
            if isinstance(msg, Data):
                if self.stdin_open:
                    try:
                        await stdin.send_all(msg.data)
                        self.info.bytes_in += len(msg.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.stdin_open = False  # it closed its stdin: drop the rest, like a pipe
                self.stream.consumed(msg)
            elif self.stdin_open:
                self.stdin_open = False
                await stdin.aclose()

    async def _hook_stdin(self, msg: Data | End) -> None:
        """A stdin frame through the hook: its part to the process, its replies to the VM."""
        assert self.hook is not None and self.proc.stdin is not None
        if self.refused is None and (self.stdin_open or isinstance(msg, Data)):
            try:
                if isinstance(msg, Data):
                    data, replies = await self.hook.to_process(msg.data)
                else:
                    data, replies = await self.hook.stdin_closed()
            except HookRefusal as exc:
                await self._refuse(str(exc))
                data = replies = b""
            self._hook_poke.set()
            await self._hook_write(data)
            await self._send_output(1, replies)
        if isinstance(msg, Data):
            self.stream.consumed(msg)
        elif self.stdin_open:
            async with self._stdin_lock:
                self.stdin_open = False
                await self.proc.stdin.aclose()

    async def _hook_write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        async with self._stdin_lock:
            if data and self.stdin_open:
                try:
                    await self.proc.stdin.send_all(data)
                    self.info.bytes_in += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.stdin_open = False

    async def _hook_deliver(self, data: bytes, replies: bytes) -> None:
        """What the hook decided later: to the process (unless it was refused), to the VM."""
        if self.refused is not None:
            return
        await self._hook_write(data)
        self._hook_poke.set()  # a call just sent has a deadline
        await self._send_output(1, replies)
