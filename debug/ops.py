"""``carapace-debug health``, ``connections`` and ``audit``: the on-call view.

``health`` and ``connections`` read a running server's debug listener
(``--debug HOST:PORT``); ``audit`` reads the server's JSON-lines audit log
(``--file``, the server's ``--audit-log``, or the one :mod:`.audit_source` finds)
and needs no server when it knows where the log is.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from carapace.protocol.summary import human_bytes

from .audit_source import (
    AUDIT_ENV,
    DEPLOYED_AUDIT_LOG,
    AuditLog,
    AuditLogNotFound,
    find_audit_log,
    unreadable,
)
from .client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    DebugClient,
    Unreachable,
    debug_options,
    fail,
    make_debug_client,
    print_json,
)
from .terminal import printable_doc


def _console() -> Console:
    console = Console(highlight=False)
    # Not a terminal (a pipe, a file, a test): no wrapping at 80 columns.
    return console if console.is_terminal else Console(highlight=False, width=200)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _bytes(n: Any) -> str:
    return human_bytes(n) if isinstance(n, int) and not isinstance(n, bool) else "-"


# --------------------------------------------------------------------------- health


def health_headline(doc: dict[str, Any], address: str) -> Text:
    """The verdict in words, first: scripts and people moving from the Rust Carapace look
    for "Server is healthy"; the table below has the details."""
    status = str(doc.get("status", "?"))
    if status == "ok":
        line = Text("Server is healthy", style="bold green")
    elif status == "draining":
        line = Text("Server is draining: it is shutting down and takes no new requests",
                    style="bold red")
    else:
        line = Text(f"Server is not healthy: it reports status {status!r}", style="bold red")
    agents = doc.get("agents") or []
    count = doc.get("agents_connected", len(agents))
    uptime = doc.get("uptime_s")
    line.append(f" (carapace-server {doc.get('version')} at {address}"
                + (f", up {_ago(uptime)}" if isinstance(uptime, int | float) else "")
                + f", {count} agent{'' if count == 1 else 's'} connected"
                + (f": {', '.join(agents)}" if agents else "") + ")")
    sandbox = doc.get("sandbox")
    if isinstance(sandbox, dict) and sandbox.get("mode") == "none":
        line.append("; CLI tools run UNCONFINED (no sandbox)", style="bold red")
    return line


def health_table(doc: dict[str, Any], address: str) -> Table:
    status = str(doc.get("status", "?"))
    table = Table(title=f"carapace-server at {address}", show_header=False, box=None,
                  title_justify="left", padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", Text(status, style="bold green" if status == "ok" else "bold red"))
    table.add_row("version", f"{doc.get('version')} (protocol v{doc.get('protocol_version')})")
    uptime = doc.get("uptime_s")
    table.add_row("uptime", f"{_ago(uptime)} (since {doc.get('started')})"
                  if isinstance(uptime, int | float) else "?")
    agents = doc.get("agents") or []
    table.add_row("agents connected",
                  f"{doc.get('agents_connected')}" + (f": {', '.join(agents)}" if agents else ""))
    table.add_row("open streams", str(doc.get("open_streams")))
    requests = doc.get("requests") or {}
    for kind in sorted(requests):
        counts = requests[kind]
        deny = counts.get("deny", 0)
        table.add_row(f"{kind} requests", Text.assemble(
            f"{counts.get('allow', 0)} allowed, ",
            (f"{deny} denied", "bold red" if deny else "")))
    for key, label in (("errors", "internal errors"), ("handshake_failures",
                       "handshake failures"), ("protocol_errors", "protocol errors")):
        value = doc.get(key)
        table.add_row(label, Text(str(value), style="bold red" if value else ""))
    table.add_row("sse events forwarded", str(doc.get("sse_events")))
    table.add_row("frames in / out", f"{doc.get('frames_in')} / {doc.get('frames_out')}")
    policy = doc.get("policy") or {}
    tools = policy.get("tools")
    table.add_row("policy", f"{policy.get('file')} "
                  f"({len(tools) if isinstance(tools, list) else '?'} tools)")
    table.add_row("audit log", str(doc.get("audit_log") or "off"))
    sniff = doc.get("sniff") or {}
    table.add_row("sniff clients", f"{sniff.get('subscribers', 0)} "
                  f"({sniff.get('dropped', 0)} records dropped)")
    sandbox = doc.get("sandbox")
    if isinstance(sandbox, dict):
        table.add_row("tool sandbox", sandbox_text(sandbox))
    return table


def sandbox_text(sandbox: dict[str, Any]) -> Text:
    """The confinement of CLI tools: green when bwrap, red when tools run unconfined."""
    mode = str(sandbox.get("mode", "?"))
    detail = f" (settings.sandbox: {sandbox.get('setting')}; {sandbox.get('reason')})"
    if mode == "bwrap":
        return Text.assemble(("bwrap", "bold green"), detail)
    return Text.assemble((f"{mode}: CLI tools run UNCONFINED", "bold red"), detail)


@click.command()
@debug_options
@click.option("--json", "as_json", is_flag=True, help="Print the health document as JSON.")
def health(debug_address: str, debug_token_file: str | None, as_json: bool) -> None:
    """Is the server up, and what has it done? Real counters from a running server.

    Exit status: 0 when the server reports ok, 1 when it is draining (shutting
    down), 2 when its debug listener cannot be reached.
    """
    client = make_debug_client(debug_address, debug_token_file)
    try:
        doc = client.get_json("/debug/health")
    except Unreachable as exc:
        fail(str(exc))
    if as_json:
        print_json(doc)
    else:
        console = _console()
        console.print(health_headline(doc, client.address))
        console.print(health_table(doc, client.address))
    sys.exit(EXIT_OK if doc.get("status") == "ok" else EXIT_FAILED)


# --------------------------------------------------------------------------- connections


def connections_headline(doc: dict[str, Any], address: str) -> str:
    """"1 connection from agent vm1", the line the Rust Carapace's users look for; an
    agent whose link is down (its session waiting to resume) is named apart."""
    agents = doc.get("agents") or []
    up = [str(a.get("name")) for a in agents if a.get("attached", True)]
    down = [str(a.get("name")) for a in agents if not a.get("attached", True)]
    if up:
        line = (f"{len(up)} connection{'' if len(up) == 1 else 's'} from "
                f"agent{'' if len(up) == 1 else 's'} {', '.join(up)}")
    else:
        line = "No agent connected"
    if down:
        line += f"; link down, waiting to resume: {', '.join(down)}"
    return f"{line} (server at {address})"


def connections_table(doc: dict[str, Any], address: str) -> Table:
    agents = doc.get("agents") or []
    table = Table(title=connections_headline(doc, address), title_justify="left")
    for name, justify in (("agent", "left"), ("link", "left"), ("address", "left"),
                          ("connected", "left"),
                          ("proto", "right"), ("streams", "right"), ("bytes in", "right"),
                          ("bytes out", "right"), ("frames in", "right"),
                          ("frames out", "right"), ("ping rtt", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for a in agents:
        rtt = a.get("last_ping_rtt_ms")
        since = a.get("connected_for_s")
        attached = a.get("attached", True)
        links = a.get("links")
        link = Text("up" if attached else "down", style="green" if attached else "bold red")
        if isinstance(links, int) and links > 1:
            link.append(f" ({links - 1} reconnect{'s' if links > 2 else ''})", style="yellow")
        table.add_row(
            Text(str(a.get("name")), style="bold"), link, str(a.get("address")),
            f"{_ago(since)} ago" if isinstance(since, int | float) else str(
                a.get("connected_since")),
            f"v{a.get('protocol_version')}", str(a.get("open_streams")),
            _bytes(a.get("bytes_in")), _bytes(a.get("bytes_out")),
            str(a.get("frames_in")), str(a.get("frames_out")),
            "-" if rtt is None else f"{rtt:.1f} ms",
        )
    return table


@click.command()
@debug_options
@click.option("--watch", type=click.FloatRange(min=0.2), default=None, metavar="N",
              help="Refresh every N seconds until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (with --watch: one document per line per refresh).")
def connections(debug_address: str, debug_token_file: str | None, watch: float | None,
                as_json: bool) -> None:
    """Which agents are connected: address, age, open streams, traffic, ping RTT."""
    client = make_debug_client(debug_address, debug_token_file)
    if watch is None:
        try:
            doc = client.get_json("/debug/connections")
        except Unreachable as exc:
            fail(str(exc))
        if as_json:
            print_json(doc)
        else:
            _console().print(connections_table(doc, client.address))
        sys.exit(EXIT_OK)
    try:
        _watch_connections(client, watch, as_json)
    except KeyboardInterrupt:
        pass
    sys.exit(EXIT_OK)


def _watch_connections(client: DebugClient, every: float, as_json: bool) -> None:
    console = _console()

    def frame() -> tuple[Any, dict[str, Any] | None]:
        stamp = Text(f"{datetime.now():%H:%M:%S} · refreshing every {every:g} s · Ctrl-C stops",
                     style="dim")
        try:
            doc = client.get_json("/debug/connections")
        except Unreachable as exc:
            return Group(Text(str(exc), style="bold red"), stamp), None
        return Group(connections_table(doc, client.address), stamp), doc

    if as_json:
        while True:
            try:
                doc: dict[str, Any] = client.get_json("/debug/connections")
            except Unreachable as exc:
                doc = {"error": str(exc)}
            click.echo(json.dumps({"ts": time.time(), **doc}))
            time.sleep(every)
    if not console.is_terminal:
        while True:
            view, _ = frame()
            console.print(view)
            sys.stdout.flush()
            time.sleep(every)
    view, _ = frame()
    with Live(view, console=console, refresh_per_second=4, transient=False) as live:
        while True:
            time.sleep(every)
            view, _ = frame()
            live.update(view)


# --------------------------------------------------------------------------- audit


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: float | None = None) -> float:
    """``5m``, ``1h``, ``24h``, ``2d`` (ago) or an ISO time (no zone: local) → Unix time."""
    now = time.time() if now is None else now
    match = _RELATIVE.match(value)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use a duration such as 5m, 1h, 24h, 7d or an ISO time such as "
            "2026-01-31T12:00:00Z", param_hint="--since") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def record_time(record: dict[str, Any]) -> float | None:
    """The record's ``ts`` as Unix time (ISO strings and numbers both accepted)."""
    ts = record.get("ts")
    if isinstance(ts, bool):
        return None
    if isinstance(ts, int | float):
        return float(ts)
    if isinstance(ts, str):
        text = ts.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return None


def audit_files(path: str) -> list[Path]:
    """The log and its rotated predecessors, oldest first: F.N … F.2, F.1, F."""
    base = Path(path)
    rotated: list[tuple[int, Path]] = []
    parent = base.parent if str(base.parent) else Path(".")
    try:
        for child in parent.iterdir():
            suffix = child.name[len(base.name) + 1:]
            if child.name.startswith(base.name + ".") and suffix.isdigit() and child.is_file():
                rotated.append((int(suffix), child))
    except OSError:
        pass
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.is_file():
        files.append(base)
    return files


@dataclass
class AuditReader:
    """Parses audit lines, skipping (and counting) the corrupt ones.

    The live file's last line may still be being written (a record that crosses
    a page boundary reaches the file a page at a time): without its newline it
    is left for ``--follow`` to read whole, not counted as corrupt.
    """

    corrupt: int = 0
    corrupt_where: list[str] = field(default_factory=list)
    #: (inode, byte offset) of the live file just past its last complete line
    live_end: tuple[int, int] | None = None

    def parse(self, line: str, where: str) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            self.corrupt += 1
            if len(self.corrupt_where) < 5:
                self.corrupt_where.append(where)
            return None
        return record

    def read(self, files: Iterable[Path], live: Path | None = None) -> Iterator[dict[str, Any]]:
        """The records of ``files`` in order; ``live`` is the one the server appends to."""
        for path in files:
            try:
                with path.open("rb") as f:
                    offset = 0
                    for n, raw in enumerate(f, 1):
                        if path == live and not raw.endswith(b"\n"):
                            break  # still being written
                        offset += len(raw)
                        record = self.parse(raw.decode("utf-8", "replace"), f"{path}:{n}")
                        if record is not None:
                            yield record
                    if path == live:
                        self.live_end = (os.fstat(f.fileno()).st_ino, offset)
            except OSError as exc:
                click.echo(f"carapace-debug: warning: cannot read {path}: {exc}", err=True)


_COMPLETION_KEYS = ("status", "exit_code", "duration_ms", "bytes", "bytes_in", "bytes_out",
                    "events", "sse_events", "error", "outcome", "code", "signal")


def _kind_of(record: dict[str, Any]) -> str:
    event = str(record.get("event") or "")
    if event.startswith("complet") or event in ("completed", "done", "end"):
        return "completion"
    if event.startswith("decid") or event == "decision":
        return "decision"
    return "other"


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("agent"), record.get("session"), record.get("request_id"))


def merge_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per request: each decision with its completion (when there is one).

    Request ids are per link, so a completion joins the latest open decision
    with the same agent (and session, if recorded) and id.
    """
    rows: list[dict[str, Any]] = []
    open_rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        kind = _kind_of(record)
        if record.get("event") == "mcp_call":  # one record says it all: its own row
            rows.append({**record, "completion": record})
            continue
        if kind == "completion":
            row = open_rows.pop(_key(record), None)
            if row is not None:
                row["completion"] = record
                continue
            rows.append({**record, "completion": record})
        else:
            row = dict(record)
            rows.append(row)
            if kind == "decision":
                open_rows[_key(record)] = row
    return rows


@dataclass
class AuditQuery:
    tool: str | None = None
    agent: str | None = None
    request_id: str | None = None
    decision: str | None = None
    since: float | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        if self.tool is not None and self.tool not in (row.get("tool"), row.get("mcp_tool")):
            return False  # an MCP call matches its server's tool and its own name
        if self.agent is not None and row.get("agent") != self.agent:
            return False
        if self.request_id is not None and str(row.get("request_id")) != self.request_id:
            return False
        if self.decision is not None and row.get("decision") != self.decision:
            return False
        if self.since is not None:
            when = record_time(row)
            if when is None or when < self.since:
                return False
        return True


def _first(record: dict[str, Any] | None, keys: Iterable[str]) -> Any:
    if not record:
        return None
    for key in keys:
        value = record.get(key)
        if value is not None:
            return value
    return None


def _result_text(done: dict[str, Any] | None, decision: str = "") -> str:
    if done is None:
        return "-" if decision == "deny" else "…"  # denied: nothing ran; else in flight
    status = _first(done, ("status",))
    exit_code = _first(done, ("exit_code",))
    if status is not None:
        return str(status)
    if exit_code is not None:
        return f"exit {exit_code}"
    return str(_first(done, ("outcome", "error", "code")) or "done")


def _request_text(row: dict[str, Any]) -> str:
    """What was asked: ``POST /api/v1/rpc``, the (possibly redacted) argv, an MCP call."""
    if row.get("mcp_method"):
        return f"{row['mcp_method']} {row.get('mcp_tool') or ''}".strip()
    argv = row.get("argv")
    if isinstance(argv, list):
        return " ".join(str(a) for a in argv)
    if isinstance(argv, str):  # cut to the record's size cap: its JSON's start and marker
        return argv
    target = row.get("target") or row.get("path")
    if target:
        query = row.get("query")
        return f"{row.get('method') or ''} {target}{'?' + str(query) if query else ''}".strip()
    return str(row.get("method") or "")


def _row_cells(row: dict[str, Any]) -> dict[str, Any]:
    row = printable_doc(row)
    when = record_time(row)
    done = row.get("completion")
    decision = str(row.get("decision") or "-")
    byte_count = _first(done, ("bytes", "bytes_out", "result_bytes"))
    if isinstance(byte_count, dict):
        byte_count = sum(v for v in byte_count.values() if isinstance(v, int))
    events = _first(done, ("events", "sse_events", "event_count"))
    duration = _first(done, ("duration_ms",))
    rid = row.get("request_id")
    return {
        "time": datetime.fromtimestamp(when).strftime("%m-%d %H:%M:%S") if when else "?",
        "agent": str(row.get("agent") or "-"),
        "id": "-" if rid is None else str(rid),
        "tool": str(row.get("tool") or "-"),
        "kind": str(row.get("kind") or "-"),
        "decision": Text(decision, style="bold red" if decision == "deny" else "green"),
        "result": _result_text(done, decision),
        "took": "-" if duration is None else f"{duration:.0f} ms" if isinstance(
            duration, int | float) else str(duration),
        "bytes": _bytes(byte_count) if byte_count is not None else "-",
        "events": "-" if events is None else str(events),
        "request": _request_text(row)[:80],
        "reason": str(row.get("reason") or ""),
    }


_AUDIT_COLUMNS = ("time", "agent", "id", "tool", "kind", "decision", "result", "took",
                  "bytes", "events", "request", "reason")


def audit_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in _AUDIT_COLUMNS:
        table.add_column(name, overflow="fold")
    for row in rows:
        cells = _row_cells(row)
        table.add_row(*(cells[name] for name in _AUDIT_COLUMNS))
    return table


def _print_follow_row(console: Console, record: dict[str, Any]) -> None:
    if _kind_of(record) == "completion":
        c = _row_cells({**record, "completion": record})
        line = Text(f"  ↳ {c['time']} {c['agent']} {c['id']} {c['tool']} done: {c['result']}"
                    f" in {c['took']}, {c['bytes']}, {c['events']} events", style="dim")
    else:
        c = _row_cells(record)
        line = Text(f"{c['time']} {c['agent']} {c['id']} {c['tool']} {c['kind']} ")
        line.append_text(c["decision"])
        line.append(f" {c['request']}  {c['reason']}")
    console.print(line, soft_wrap=True)


def _audit_log(path: str | None, debug_address: str, token_file: str | None,
               follow: bool) -> AuditLog:
    """``--file`` exactly as given; else the first audit log found (see audit_source)."""
    ctx = click.get_current_context()
    if path is not None and ctx.get_parameter_source("path") is ParameterSource.COMMANDLINE:
        problem = unreadable(path)
        if problem == "no such file" and not follow:
            fail(f"no audit log at {path}: is carapace-server running with --audit-log {path}?")
        if problem is not None and problem != "no such file":
            fail(f"cannot read the audit log {path}: {problem}")
        return AuditLog(path, "--file")
    try:
        found = find_audit_log(path, make_debug_client(debug_address, token_file))
    except AuditLogNotFound as exc:
        fail(exc.message)
    if path and found.path != path:
        click.echo(f"carapace-debug: {AUDIT_ENV}={path} cannot be read ({unreadable(path)}); "
                   f"reading {found.path}, found by {found.found_by}", err=True)
    return found


@click.command()
@debug_options
@click.option("--file", "path", envvar=AUDIT_ENV, default=None, metavar="F",
              help=f"The server's --audit-log file (env {AUDIT_ENV}); rotated F.1, F.2, … "
              f"are read too. Without it: {AUDIT_ENV}, then {DEPLOYED_AUDIT_LOG}, then the "
              "file the server at --debug names.")
@click.option("--tool", default=None, help="Only requests to this tool.")
@click.option("--agent", default=None, help="Only requests from this agent.")
@click.option("--id", "request_id", default=None,
              help="Only this request (the id the server logs, e.g. default-1a2b3c4d-7).")
@click.option("--decision", type=click.Choice(["allow", "deny"]), default=None)
@click.option("--since", default=None, metavar="WHEN",
              help="Only records from the last 5m / 1h / 24h / 7d, or after an ISO time.")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Show the newest N matching requests (0: all).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON: one document (with --follow: one record per line).")
def audit(debug_address: str, debug_token_file: str | None, path: str | None,
          tool: str | None, agent: str | None, request_id: str | None,
          decision: str | None, since: str | None, limit: int, follow: bool,
          as_json: bool) -> None:
    """Query the audit trail: who asked for what, what was decided and why.

    Each row is one request: its decision record joined with its completion
    (status or exit code, duration, bytes, SSE events). Lines that are not
    JSON objects are skipped and counted.
    """
    query = AuditQuery(tool=tool, agent=agent, request_id=request_id, decision=decision,
                       since=parse_since(since) if since else None)
    log = _audit_log(path, debug_address, debug_token_file, follow)
    path = log.path
    files = audit_files(path)
    reader = AuditReader()
    rows = [row for row in merge_records(reader.read(files, live=Path(path)))
            if query.matches(row)]
    matched = len(rows)
    if limit:
        rows = rows[-limit:]
    console = _console()
    if as_json and not follow:
        print_json({"file": path, "found_by": log.found_by, "files": [str(f) for f in files],
                    "matched": matched,
                    "shown": len(rows), "corrupt_lines": reader.corrupt, "records": rows})
    elif as_json:
        for row in rows:
            click.echo(json.dumps(row))
    elif follow:
        for row in rows:
            _print_follow_row(console, row)
    else:
        title = (f"{len(rows)} of {matched} matching request(s) in {path}"
                 + (f" and {len(files) - 1} rotated file(s)" if len(files) > 1 else "")
                 + ("" if log.found_by == "--file" else f" (found by {log.found_by})"))
        console.print(audit_table(rows, title))
    _warn_corrupt(reader)
    if not follow:
        sys.exit(EXIT_OK)
    try:
        _follow(path, query, reader, console, as_json, start=reader.live_end)
    except KeyboardInterrupt:
        pass
    _warn_corrupt(reader)
    sys.exit(EXIT_OK)


def _warn_corrupt(reader: AuditReader) -> None:
    if reader.corrupt:
        where = ", ".join(reader.corrupt_where)
        click.echo(f"carapace-debug: warning: skipped {reader.corrupt} corrupt line(s) "
                   f"({where}{', …' if reader.corrupt > len(reader.corrupt_where) else ''})",
                   err=True)
        reader.corrupt_where.clear()
        reader.corrupt = 0


def _follow(path: str, query: AuditQuery, reader: AuditReader, console: Console,
            as_json: bool, start: tuple[int, int] | None = None,
            interval: float = 0.25) -> None:
    """Print records appended to ``path`` after ``start`` (inode, offset: where the
    first read stopped, so nothing written in between is missed) or else from now
    on; survives rotation and truncation."""
    target = Path(path)
    handle = None
    inode = None
    partial = ""
    try:
        st = target.stat()
        handle = target.open("r", encoding="utf-8", errors="replace")
        inode = st.st_ino
        if start is not None and start[0] == inode and start[1] <= st.st_size:
            handle.seek(start[1])
        else:
            handle.seek(st.st_size)
    except OSError:
        pass
    while True:
        if handle is not None:
            chunk = handle.read()
            if chunk:
                partial += chunk
                *lines, partial = partial.split("\n")
                for line in lines:
                    record = reader.parse(line, path)
                    if record is None:
                        continue
                    if query.matches(record):
                        if as_json:
                            click.echo(json.dumps(record))
                        else:
                            _print_follow_row(console, record)
                sys.stdout.flush()
                _warn_corrupt(reader)
                continue
        try:
            st = target.stat()
        except OSError:
            st = None
        if st is not None and (handle is None or st.st_ino != inode
                               or st.st_size < handle.tell()):
            if handle is not None:
                rest = handle.read()  # the end of a rotated file
                partial += rest
                if rest:
                    continue
                handle.close()
            handle = target.open("r", encoding="utf-8", errors="replace")
            inode = st.st_ino
            partial = ""
            continue
        time.sleep(interval)


__all__ = ["EXIT_UNREACHABLE", "audit", "connections", "health", "merge_records",
           "parse_since"]
