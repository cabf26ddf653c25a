"""``carapace-debug sniff``: watch the frames that cross the tunnel, live.

Two sources, one display:

- from a running server's debug listener (``--debug HOST:PORT``, the server's
  ``--debug-listen``): the ``/debug/sniff`` feed, filtered on the server;
- ``--proxy LISTEN --upstream HOST:PORT``: a TCP proxy to put between an agent
  and a server (point the agent's ``--server`` at LISTEN). Bytes are forwarded
  untouched and at once in both directions; a copy of each direction is
  decoded to print summaries. Neither side needs to cooperate, and a copy
  that cannot be decoded (a TLS link, a newer protocol) stops only the
  decoding of that direction, never the forwarding.

Each frame is one line: time, agent, direction (``→`` agent to server,
``←`` server to agent), request id, tool, type, and a short summary (method
and path, status, SSE event name and data preview, argv, exit code, bytes).
Secrets never show (see :mod:`carapace.protocol.summary`). ``--json`` prints
one JSON object per line instead.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TextIO

import click
import httpx
import trio
from rich.console import Console
from rich.text import Text

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import FrameDecoder
from carapace.protocol.messages import Hello, RequestMessage
from carapace.protocol.sse import Event, SseParser
from carapace.protocol.summary import (
    FRAME_TYPES,
    Redactor,
    RequestTracker,
    SummaryFilter,
    frame_record,
)
from carapace.runtime.addresses import parse_hostport

from .client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Unreachable,
    debug_options,
    fail,
    make_debug_client,
)
from .terminal import printable_doc

PROXY_MAX_FRAME = 64 * 1024 * 1024
PROXY_QUEUE = 4096
"""Summaries waiting to be printed before the proxy drops (and counts) new ones."""

_STATUS_KINDS = ("http_head", "http_response", "failed")
"""Frames styled by their HTTP status."""

_TYPE_STYLES = {
    "http_request": "bold cyan",
    "cli_request": "bold cyan",
    "http_head": "green",
    "http_response": "green",
    "sse_event": "magenta",
    "sse_events": "magenta",
    "sse_raw": "magenta",
    "sse_comment": "dim magenta",
    "data": "blue",
    "output": "blue",
    "end": "dim green",
    "exit": "yellow",
    "failed": "bold red",
    "reject": "bold red",
    "cancel": "yellow",
    "signal": "yellow",
    "goaway": "yellow",
    "credit": "dim",
    "ping": "dim",
    "pong": "dim",
    "ack": "dim",
}


class Renderer:
    """Prints records as they come: a readable line each, or JSON lines."""

    def __init__(self, as_json: bool, out: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False)
        self.terminal = self.console.is_terminal
        self.frames = 0
        self._header_done = False

    def _header(self) -> None:
        if self._header_done or self.as_json:
            return
        self._header_done = True
        line = Text(f"{'time':<12} {'agent':<12} {'':1} {'id':>5} {'tool':<14} "
                    f"{'type':<12} summary", style="bold")
        self._print(line)

    def _print(self, text: Text) -> None:
        if self.terminal:
            self.console.print(text, no_wrap=True, overflow="ellipsis", crop=True)
        else:
            self.console.print(text, soft_wrap=True)
        self.out.flush()

    def frame(self, record: dict[str, Any]) -> None:
        self.frames += 1
        if self.as_json:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()
            return
        self._header()
        record = printable_doc(record)
        ts = record.get("ts")
        when = (datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:12]
                if isinstance(ts, int | float) else "?")
        arrow = "→" if record.get("direction") == "in" else "←"
        rid = record.get("id")
        kind = str(record.get("type", "?"))
        style = _TYPE_STYLES.get(kind, "")
        if kind in _STATUS_KINDS and isinstance(record.get("status"), int):
            style = "green" if record["status"] < 400 else "bold red"
        if kind == "exit" and record.get("exit_code") not in (None, 0):
            style = "bold red"
        line = Text()
        line.append(f"{when:<12} ", style="dim")
        line.append(f"{str(record.get('agent') or '-')[:12]:<12} ")
        line.append(arrow, style="cyan" if arrow == "→" else "green")
        line.append(f" {'' if rid is None else rid:>5} ")
        line.append(f"{str(record.get('tool') or '-')[:14]:<14} ", style="bold")
        line.append(f"{kind:<12} ", style=style)
        line.append(str(record.get("summary", "")), style=style if kind == "failed" else "")
        self._print(line)

    def notice(self, record: dict[str, Any]) -> None:
        """A record about the feed itself (frames dropped, decoding stopped)."""
        if self.as_json:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()
            return
        self._print(Text(f"-- {printable_doc(record.get('summary', record))}",
                         style="bold yellow"))


MESSAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "SseEvent": ("sse_event", "sse_events", "sse_raw"),
    "HttpRequest": ("http_request",),
    "HttpResponse": ("http_head", "http_response", "data", "end"),
    "CliRequest": ("cli_request",),
    "CliResponse": ("output", "exit"),
    "Error": ("failed", "reject"),
}
"""Message names of the Rust Carapace, which its users type, and the frames that carry
the same thing here. One event may travel in an ``sse_events`` batch or as the bytes of
an ``sse_raw``; a response is one ``http_response`` when small, else ``http_head``,
``data`` chunks (``data`` also carries a CLI tool's stdin) and ``end``; a CLI result is
``output`` chunks and ``exit``. Our own names written in CamelCase (``SseComment``,
``GoAway``) need no entry."""


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_ALIASES = {_squash(alias): types for alias, types in MESSAGE_ALIASES.items()}
_BY_SQUASHED = {_squash(t): t for t in FRAME_TYPES}


def _alias_help() -> str:
    return "; ".join(f"{alias} = {', '.join(types)}" for alias, types in MESSAGE_ALIASES.items())


def resolve_frame_types(names: Iterable[str]) -> frozenset[str]:
    """Our frame types for what was typed: our names and patterns in any case, the
    Rust message names of :data:`MESSAGE_ALIASES`, or our names in CamelCase."""
    resolved: set[str] = set()
    for name in names:
        lower = name.lower()
        if lower in FRAME_TYPES or any(c in lower for c in "*?["):
            resolved.add(lower)  # our own name (or a pattern over them) wins over an alias
        elif _squash(name) in _ALIASES:
            resolved.update(_ALIASES[_squash(name)])
        elif _squash(name) in _BY_SQUASHED:
            resolved.add(_BY_SQUASHED[_squash(name)])
        else:
            raise click.BadParameter(
                f"unknown frame type {name!r}; known: {', '.join(FRAME_TYPES)}; "
                f"the Rust message names work too ({_alias_help()})", param_hint="--filter")
    return frozenset(resolved)


def _build_filter(types: tuple[str, ...], tool: str | None, request_id: int | None,
                  agent: str | None) -> SummaryFilter:
    names = resolve_frame_types(t.strip() for v in types for t in v.split(",") if t.strip())
    try:
        return SummaryFilter(types=names, tool=tool, id=request_id, agent=agent)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--filter") from None


@click.command()
@debug_options
@click.option("--filter", "types", multiple=True, metavar="TYPE",
              help="Only frames of this type (repeatable or comma-separated, any case; "
              f"patterns such as 'sse_*' work). Types: {', '.join(FRAME_TYPES)}. The Rust "
              f"Carapace's message names stand for these frames: {_alias_help()}.")
@click.option("--tool", default=None, help="Only frames of requests to this tool.")
@click.option("--id", "request_id", type=int, default=None, help="Only frames of this request id.")
@click.option("--agent", default=None, help="Only frames of this agent.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many frames.")
@click.option("--proxy", "proxy_listen", default=None, metavar="LISTEN",
              help="Standalone mode: listen here ([HOST:]PORT) as a TCP proxy in front of "
              "--upstream and decode what crosses it (no debug listener needed).")
@click.option("--upstream", default=None, metavar="HOST:PORT",
              help="With --proxy: the carapace-server to forward to.")
def sniff(
    debug_address: str,
    debug_token_file: str | None,
    types: tuple[str, ...],
    tool: str | None,
    request_id: int | None,
    agent: str | None,
    as_json: bool,
    count: int | None,
    proxy_listen: str | None,
    upstream: str | None,
) -> None:
    """Show the frames crossing the tunnel, live.

    \b
    From a server:  carapace-debug sniff --debug 127.0.0.1:8766 --tool signal-cli
    As a proxy:     carapace-debug sniff --proxy 127.0.0.1:9765 --upstream 127.0.0.1:8765
                    (then run the agent with --server 127.0.0.1:9765)

    Directions: → agent to server, ← server to agent. Ctrl-C stops.
    """
    filter = _build_filter(types, tool, request_id, agent)
    renderer = Renderer(as_json)
    if proxy_listen is not None or upstream is not None:
        if not (proxy_listen and upstream):
            raise click.UsageError("--proxy LISTEN and --upstream HOST:PORT go together")
        try:
            listen_addr = parse_hostport(proxy_listen)
            upstream_addr = parse_hostport(upstream)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        proxy = SniffProxy(listen_addr, upstream_addr, filter, renderer, count)
        try:
            trio.run(proxy.run)
        except KeyboardInterrupt:
            pass
        except OSError as exc:
            fail(f"cannot listen on {proxy_listen}: {exc.strerror or exc}")
        sys.exit(EXIT_OK)
    client = make_debug_client(debug_address, debug_token_file)
    try:
        code = _follow_feed(client, filter, renderer, count)
    except Unreachable as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        code = EXIT_OK
    sys.exit(code)


def _follow_feed(client: Any, filter: SummaryFilter, renderer: Renderer,
                 count: int | None) -> int:
    params: list[tuple[str, str | int]] = [("type", t) for t in sorted(filter.types)]
    params += [(k, v) for k, v in (("tool", filter.tool), ("id", filter.id),
                                   ("agent", filter.agent)) if v is not None]
    parser = SseParser()
    try:
        with client.client(read_timeout=None) as http, \
                http.stream("GET", "/debug/sniff", params=params) as response:
            if response.status_code != 200:
                response.read()
            client.check_status(response)
            click.echo(f"sniffing {client.address} ({_describe(filter)}); Ctrl-C stops",
                       err=True)
            for chunk in response.iter_raw():
                for item in parser.feed(chunk):
                    if not isinstance(item, Event) or item.data is None:
                        continue
                    try:
                        record = json.loads(item.data)
                    except json.JSONDecodeError:
                        continue
                    if item.event == "dropped":
                        renderer.notice(record)
                        continue
                    renderer.frame(record)
                    if count is not None and renderer.frames >= count:
                        return EXIT_OK
    except httpx.HTTPError as exc:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            raise client.explain(exc) from None
        click.echo(f"carapace-debug: the sniff feed from {client.address} broke off: {exc}",
                   err=True)
        return EXIT_FAILED
    click.echo(f"carapace-debug: the server at {client.address} closed the sniff feed",
               err=True)
    return EXIT_FAILED if count is not None else EXIT_OK


def _describe(filter: SummaryFilter) -> str:
    parts = [f"type={','.join(sorted(filter.types))}"] if filter.types else []
    parts += [f"{k}={v}" for k, v in (("tool", filter.tool), ("id", filter.id),
                                      ("agent", filter.agent)) if v is not None]
    return " ".join(parts) or "all frames"


# --------------------------------------------------------------------------- proxy


class _Direction:
    """One direction of one proxied connection: its decoder, or why it stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.decoder: FrameDecoder | None = FrameDecoder(PROXY_MAX_FRAME)
        self.first = True


class SniffProxy:
    """Forward agent ↔ server bytes unchanged, and summarise a decoded copy."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int],
                 filter: SummaryFilter, renderer: Renderer, count: int | None,
                 queue_size: int = PROXY_QUEUE) -> None:
        self.listen = listen
        self.upstream = upstream
        self.filter = filter
        self.renderer = renderer
        self.count = count
        self.redactor = Redactor()
        self.connections = 0
        self.dropped = 0
        self._send, self._receive = trio.open_memory_channel[
            tuple[Callable[[dict[str, Any]], None], dict[str, Any]]](queue_size)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        port = listeners[0].socket.getsockname()[1]
        click.echo(f"sniff proxy on {self.listen[0]}:{port} → {self.upstream[0]}:"
                   f"{self.upstream[1]}; point the agent's --server here. Ctrl-C stops.",
                   err=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._printer, nursery.cancel_scope)
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(port)

    # -- printing (never in the forwarding path) -----------------------------------
    def _emit(self, kind: Callable[[dict[str, Any]], None], record: dict[str, Any]) -> None:
        try:
            self._send.send_nowait((kind, record))
        except trio.WouldBlock:
            self.dropped += 1

    def _notice(self, summary: str, **fields: Any) -> None:
        self._emit(self.renderer.notice, {"type": "notice", "ts": time.time(),
                                          "summary": summary, **fields})

    async def _printer(self, scope: trio.CancelScope) -> None:
        while True:
            batch = [await self._receive.receive()]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            dropped, self.dropped = self.dropped, 0
            done = await trio.to_thread.run_sync(self._print_batch, batch, dropped)
            if done:
                scope.cancel()
                return

    def _print_batch(self, batch: list[tuple[Callable[[dict[str, Any]], None],
                                             dict[str, Any]]], dropped: int) -> bool:
        if dropped:
            self.renderer.notice({"type": "dropped", "ts": time.time(), "dropped": dropped,
                                  "summary": f"{dropped} frame(s) dropped: output is slower "
                                  "than the tunnel"})
        for kind, record in batch:
            kind(record)
            if self.count is not None and self.renderer.frames >= self.count:
                return True
        return False

    # -- forwarding -----------------------------------------------------------------
    async def _handle(self, agent_stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = self.connections
        try:
            peer = "{}:{}".format(*agent_stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        try:
            server_stream = await trio.open_tcp_stream(*self.upstream)
        except OSError as exc:
            self._notice(f"conn #{conn} from {peer}: cannot reach the server at "
                         f"{self.upstream[0]}:{self.upstream[1]}: {exc.strerror or exc}",
                         conn=conn)
            await agent_stream.aclose()
            return
        for s in (agent_stream, server_stream):
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            except OSError:
                pass
        self._notice(f"conn #{conn} from {peer} opened", conn=conn)
        state = {"agent": f"conn#{conn}"}
        tracker = RequestTracker()
        async with agent_stream, server_stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, agent_stream, server_stream, _Direction("in"),
                               conn, state, tracker, nursery.cancel_scope)
            nursery.start_soon(self._pump, server_stream, agent_stream, _Direction("out"),
                               conn, state, tracker, nursery.cancel_scope)
        self._notice(f"conn #{conn} ({state['agent']}) closed", conn=conn)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, way: _Direction,
                    conn: int, state: dict[str, str], tracker: RequestTracker,
                    scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        scope.cancel()
                    return
                await dst.send_all(data)
                if way.decoder is not None:
                    self._decode(data, way, conn, state, tracker)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    def _decode(self, data: bytes, way: _Direction, conn: int, state: dict[str, str],
                tracker: RequestTracker) -> None:
        assert way.decoder is not None
        direction = "in" if way.name == "in" else "out"
        try:
            if way.first and data[:1] == b"\x16":
                raise ProtocolError("the link looks TLS-encrypted")
            way.first = False
            way.decoder.feed(data)
            for msg in way.decoder:
                if isinstance(msg, Hello):
                    state["agent"] = msg.agent[:64]
                tool = tracker.observe(direction, msg)
                request_id = msg.id if isinstance(msg, RequestMessage) else None
                if not self.filter.matches(msg.TYPE, request_id, tool, state["agent"]):
                    continue
                record = frame_record(msg, direction, ts=time.time(), agent=state["agent"],
                                      tool=tool, redactor=self.redactor)
                record["conn"] = conn
                self._emit(self.renderer.frame, record)
        except Exception as exc:  # a copy that cannot be decoded must never stop forwarding
            way.decoder = None
            arrow = "agent→server" if direction == "in" else "server→agent"
            self._notice(f"warning: conn #{conn} {arrow}: cannot decode ({exc}); still "
                         "forwarding, no more summaries for this direction", conn=conn,
                         direction=direction)


__all__ = ["EXIT_UNREACHABLE", "Renderer", "SniffProxy", "sniff"]
