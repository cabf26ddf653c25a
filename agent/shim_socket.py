"""The agent's unix socket for tool shims: each connection is one CLI request on the tunnel.

The socket's file mode (0660 or stricter, in a 0700 directory if we create
it) and ``SO_PEERCRED`` authenticate the shim; there is no handshake. The
agent stamps the peer's uid/gid/pid into the ``cli_request`` (whatever the
shim claimed is overwritten), gives the request its own tunnel id and relays:

- shim → tunnel: ``data`` through :meth:`AgentStream.send`, which waits for
  credit, so while the remote process is not reading its stdin we stop
  reading this socket and the shim's stdin copy blocks; ``end`` and
  ``signal`` need no credit;
- tunnel → shim: ``output`` is written to the socket and only then returned
  as credit, so a shim whose stdout is not drained holds back the remote
  process; ``exit`` or ``failed`` ends the request.

A shim that hangs up mid-request cancels it (the server kills the process
group). A shim that sends garbage gets a ``failed`` (``bad_request``) when
the socket can still take one, one log line, and is closed; nothing it does
reaches any other connection.
"""

from __future__ import annotations

import logging
import os
import select

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.flow import flow_cost
from carapace.protocol.framing import FrameDecoder, encode
from carapace.protocol.messages import (
    CliRequest,
    Data,
    End,
    Message,
    Output,
    RequestFailed,
    RequestMessage,
    Signal,
    replace,
)
from carapace.protocol.requests import AGENT, SHIM_SENDS, RequestState
from carapace.runtime.unix_sockets import (
    SOCKET_MODE,
    bind_unix_socket,
    peer_credentials,
    remove_if_ours,
)

from .multiplexer import AgentStream, LinkDown, Multiplexer, StreamLost
from .shim import MAX_REQUEST_FRAME, REQUEST_ID

log = logging.getLogger("carapace.agent")

READ_SIZE = 64 * 1024
WRITE_BATCH = 256 * 1024
"""Output frames already queued are written to the shim together, up to this many bytes."""


class CliSocketListener:
    """Serves ``--cli-socket PATH``: shims connect here, one request per connection."""

    def __init__(self, path: str, mux: Multiplexer, link_wait: float = 2.0,
                 *, request_timeout: float = 10.0, mode: int = SOCKET_MODE) -> None:
        self.path = os.path.abspath(path)
        self.mux = mux
        self.link_wait = link_wait
        self.request_timeout = request_timeout
        """How long a connected shim may take to send its request."""
        self.mode = mode
        self.active = 0
        self.served = 0

    async def serve(self, *, task_status: trio.TaskStatus[trio.SocketListener]
                    = trio.TASK_STATUS_IGNORED) -> None:
        sock = bind_unix_socket(self.path, self.mode, who="agent")
        ino = os.stat(self.path).st_ino
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        log.info("tool shims served on %s (mode %o)", self.path, self.mode)
        try:
            task_status.started(listener)
            await trio.serve_listeners(self._handle, [listener])
        finally:
            remove_if_ours(self.path, ino)

    async def _handle(self, conn: trio.SocketStream) -> None:
        self.active += 1
        try:
            await _ShimConnection(self, conn).run()
        except Exception:  # one connection's bug must not take the listener down
            log.exception("shim connection failed unexpectedly")
        finally:
            self.active -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await conn.aclose()


class _ShimGone(Exception):
    """The shim closed its socket (or it broke)."""


class _ShimConnection:
    """One shim: read its request, open a tunnel request, relay both ways."""

    def __init__(self, listener: CliSocketListener, conn: trio.SocketStream) -> None:
        self.listener = listener
        self.conn = conn
        self.decoder = FrameDecoder(MAX_REQUEST_FRAME)
        self.pid, self.uid, self.gid = peer_credentials(conn.socket)
        self.who = f"shim pid {self.pid} (uid {self.uid})"
        self.writing = False
        """True while a write is in progress: cancelled then, a frame may be half sent."""
        self.problem: str | None = None
        """Why we hung up on a misbehaving shim, to tell it in a ``failed`` frame."""
        self.shim_request: RequestState | None = None
        """The shim's request as it sent it: the agent's rules of protocol/requests.py."""

    # -- writing to the shim -----------------------------------------------------------
    async def _write(self, msgs: list[Message]) -> None:
        data = b"".join(encode(m) for m in msgs)
        self.writing = True
        try:
            await self.conn.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _ShimGone(str(exc)) from None
        self.writing = False

    async def _fail(self, status: int, code: str, message: str) -> None:
        """Send the shim a final ``failed`` if the socket can still carry a whole frame."""
        if self.writing:
            return
        with trio.move_on_after(1.0):
            try:
                await self._write([RequestFailed(id=REQUEST_ID, status=status, code=code,
                                                 message=message)])
            except _ShimGone:
                pass

    async def _refuse(self, message: str) -> None:
        log.warning("%s: %s; closing its connection", self.who, message)
        await self._fail(400, "bad_request", message)

    # -- reading from the shim -----------------------------------------------------------
    async def _next_message(self) -> RequestMessage:
        """The shim's next frame (ProtocolError if it is not a valid id-1 request frame)."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                if not isinstance(msg, RequestMessage) or msg.id != REQUEST_ID:
                    what = f"id {msg.id}" if isinstance(msg, RequestMessage) else msg.TYPE
                    raise ProtocolError(f"unexpected {what} on the shim socket "
                                        f"(a shim sends one request, id {REQUEST_ID})")
                return msg
            try:
                data = await self.conn.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _ShimGone(str(exc)) from None
            if not data:
                raise _ShimGone("closed")
            self.decoder.feed(data)

    async def _read_request(self) -> CliRequest | None:
        try:
            with trio.fail_after(self.listener.request_timeout):
                first = await self._next_message()
        except trio.TooSlowError:
            await self._refuse(f"no request within {self.listener.request_timeout:.0f} s")
            return None
        except ProtocolError as exc:
            await self._refuse(f"bad request frame: {exc}")
            return None
        except _ShimGone:
            log.debug("%s hung up before sending a request", self.who)
            return None
        if not isinstance(first, CliRequest):
            await self._refuse(f"the first frame must be cli_request, not {first.TYPE}")
            return None
        self.shim_request = RequestState.opened_by(first)
        return replace(first, peer_uid=self.uid, peer_gid=self.gid,
                                   peer_pid=self.pid)

    # -- the request ---------------------------------------------------------------------
    async def run(self) -> None:
        req = await self._read_request()
        if req is None:
            return
        listener = self.listener
        try:
            stream = await listener.mux.open(lambda rid: replace(req, id=rid),
                                             wait=listener.link_wait)
        except LinkDown as exc:
            log.info("%s: tool %s refused: %s", self.who, req.tool, exc)
            await self._fail(502, "upstream_unavailable",
                             f"{exc}; the agent keeps reconnecting, retry shortly")
            return
        listener.served += 1
        log.debug("%s: tool %s is tunnel request %d", self.who, req.tool, stream.id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._shim_to_tunnel, stream, nursery.cancel_scope)
                nursery.start_soon(self._watch_hangup, stream, nursery.cancel_scope)
                await self._tunnel_to_shim(stream)
                nursery.cancel_scope.cancel()
        finally:
            if not stream.done:
                stream.cancel(self.problem or "the shim went away")
        if self.problem is not None:
            await self._refuse(self.problem)

    async def _shim_to_tunnel(self, stream: AgentStream, scope: trio.CancelScope) -> None:
        """stdin and signals: the shim's frames, re-addressed to the tunnel request."""
        shim_request = self.shim_request
        assert shim_request is not None  # set by _read_request
        try:
            while True:
                msg = await self._next_message()
                if type(msg) not in SHIM_SENDS:
                    raise ProtocolError(f"unexpected {msg.TYPE} from the shim")
                shim_request.process(AGENT, msg)  # stdin ends once; signals may follow
                if isinstance(msg, Data):
                    await stream.send(Data(id=stream.id, data=msg.data))  # waits for credit
                elif isinstance(msg, End):
                    stream.send_control(End(id=stream.id))
                elif isinstance(msg, Signal):
                    stream.send_control(Signal(id=stream.id, signum=msg.signum))
        except ProtocolError as exc:
            self.problem = f"bad frame: {exc}"
            stream.cancel("the shim broke the protocol")
            scope.cancel()
        except _ShimGone:
            stream.cancel("the shim went away (its socket closed)")
            scope.cancel()
        except (StreamLost, LinkDown):
            await trio.sleep_forever()  # the other direction tells the shim

    async def _watch_hangup(self, stream: AgentStream, scope: trio.CancelScope) -> None:
        """Notice a shim that closed its socket while we are not reading it.

        While the tunnel has no credit for stdin we stop reading the socket, so
        its EOF stays queued behind unread data; the kernel still flags the
        closed peer as EPOLLHUP, which an epoll set with no other events waits for.
        """
        if not hasattr(select, "epoll"):  # pragma: no cover - the agent runs on Linux
            await trio.sleep_forever()
        with select.epoll() as ep:
            ep.register(self.conn.socket.fileno(), 0)  # EPOLLHUP/EPOLLERR are always reported
            await trio.lowlevel.wait_readable(ep.fileno())
        stream.cancel("the shim went away (its socket closed)")
        scope.cancel()

    async def _tunnel_to_shim(self, stream: AgentStream) -> None:
        """Output, then exit or failed: re-addressed to id 1; credit returned once written."""
        while True:
            try:
                msg: RequestMessage | None = await stream.receive()
            except StreamLost as exc:
                await self._fail(502, "upstream_unavailable",
                                 f"the tunnel to the Carapace server was lost mid-command "
                                 f"({exc}); the host stops the command")
                return
            out: list[Message] = []
            cost = size = 0
            final = False
            while msg is not None:
                try:
                    stream.took(msg)  # output, then exit or failed
                except ProtocolError as exc:
                    log.warning("tunnel request %d: out of order from the server: %s", stream.id,
                                exc)
                    stream.cancel("protocol violation")
                    out.append(RequestFailed(id=REQUEST_ID, status=502, code="internal",
                                             message="the Carapace server answered out of order"))
                    final = True
                    break
                out.append(replace(msg, id=REQUEST_ID))
                if stream.request.finished:  # exit or failed
                    final = True
                    break
                assert isinstance(msg, Output)  # all else took() refused
                cost += flow_cost(msg)
                size += len(msg.data)
                if size >= WRITE_BATCH:
                    break
                msg = stream.receive_nowait()
            if final:
                stream.close()
            try:
                await self._write(out)
            except _ShimGone:
                stream.cancel("the shim went away (its socket closed)")
                return
            if cost:
                stream.consumed(cost)
            if final:
                return
