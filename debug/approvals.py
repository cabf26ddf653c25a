"""``carapace-debug approvals``, ``approve``, ``deny``: a person answers the calls that wait.

A call the policy marks (``approve_patterns``, ``jsonrpc_approve_methods``,
``approve_paths``) waits on the server until someone here says yes or no.
``approvals`` lists what waits — ``--watch`` as a live table, ``--json`` as
one JSON document for a script: a list whose pending approvals (``kind:
"pending"``, keys ``id``, ``agent``, ``tool``, ``summary``, ``waiting_s``)
come first, oldest first, followed by the remembered approvals (``kind:
"grant"``, the same keys with ``waiting_s`` null, plus ``expires_in_s``, ``by``
and ``reason``). A script that only wants what waits keeps the items whose
``kind`` is ``pending``, or passes ``--pending``.

``approve ID`` and ``deny ID`` exit 0 when the answer was taken, 1 with a
message when the id is unknown or already decided (timed out, withdrawn,
answered by someone else), 2 when the server cannot be reached. ``deny gN``
forgets a remembered approval.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from datetime import datetime
from typing import Any

import click
import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .client import (
    EXIT_FAILED,
    EXIT_OK,
    DebugClient,
    Unreachable,
    debug_options,
    fail,
    make_debug_client,
)
from .terminal import printable_doc

PATH = "/debug/approvals"
WATCH_EVERY = 1.0
"""Seconds between refreshes of ``approvals --watch``: a waiting call's clock ticks in
whole seconds, and the listing is a few hundred bytes."""


def _console() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def fetch(client: DebugClient) -> dict[str, Any]:
    doc = client.get_json(PATH)
    doc.setdefault("pending", [])
    doc.setdefault("grants", [])
    return doc


def as_list(doc: dict[str, Any], pending_only: bool = False) -> list[dict[str, Any]]:
    """The ``--json`` document: pending approvals, then (unless ``pending_only``) grants."""
    items = list(doc.get("pending") or [])
    if not pending_only:
        items += list(doc.get("grants") or [])
    return items


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    value = int(value)
    return f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


def approvals_view(doc: dict[str, Any], address: str) -> Group:
    """The pending table (and the grants, if any) a person reads."""
    pending = printable_doc(doc.get("pending") or [])
    grants = printable_doc(doc.get("grants") or [])
    if pending:
        title = (f"{len(pending)} call{'' if len(pending) == 1 else 's'} waiting for approval "
                 f"(server at {address}) · carapace-debug approve ID [--for S] | deny ID")
    else:
        title = f"Nothing waits for approval (server at {address})"
    table = Table(title=title, title_justify="left", expand=False)
    for name, justify in (("id", "right"), ("agent", "left"), ("tool", "left"),
                          ("waiting", "right"), ("call", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for item in pending:
        waited = item.get("waiting_s")
        style = "bold red" if isinstance(waited, int | float) and waited >= 30 else "yellow"
        table.add_row(Text(str(item.get("id")), style="bold"), str(item.get("agent")),
                      str(item.get("tool")), Text(_seconds(waited), style=style),
                      Text(str(item.get("summary"))))
    parts: list[Any] = [table]
    if grants:
        remembered = Table(title="Remembered approvals (the same call again runs without "
                           "asking until it expires)", title_justify="left")
        for name in ("id", "agent", "tool", "expires in", "by", "call"):
            remembered.add_column(name, overflow="fold")
        for grant in grants:
            remembered.add_row(str(grant.get("id")), str(grant.get("agent")),
                               str(grant.get("tool")), _seconds(grant.get("expires_in_s")),
                               str(grant.get("by") or "-"), Text(str(grant.get("summary"))))
        parts.append(remembered)
    return Group(*parts)


@click.command()
@debug_options
@click.option("--watch", is_flag=True, help="Keep the table up to date until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON list (with --watch: one list per line per refresh).")
@click.option("--pending", "pending_only", is_flag=True,
              help="Only the calls that wait (leave out remembered approvals).")
@click.option("--every", type=click.FloatRange(min=0.2), default=WATCH_EVERY,
              show_default=True, metavar="S", help="Seconds between refreshes with --watch.")
def approvals(debug_address: str, debug_token_file: str | None, watch: bool, as_json: bool,
              pending_only: bool, every: float) -> None:
    """List the calls waiting for a person's approval, and the remembered approvals."""
    client = make_debug_client(debug_address, debug_token_file)
    if not watch:
        try:
            doc = fetch(client)
        except Unreachable as exc:
            fail(str(exc))
        if as_json:
            click.echo(json.dumps(as_list(doc, pending_only), indent=2))
        else:
            if pending_only:
                doc["grants"] = []
            _console().print(approvals_view(doc, client.address))
        sys.exit(EXIT_OK)
    try:
        _watch(client, every, as_json, pending_only)
    except KeyboardInterrupt:
        pass
    sys.exit(EXIT_OK)


def _watch(client: DebugClient, every: float, as_json: bool, pending_only: bool) -> None:
    console = _console()

    def frame() -> Any:
        stamp = Text(f"{datetime.now():%H:%M:%S} · refreshing every {every:g} s · Ctrl-C stops",
                     style="dim")
        try:
            doc = fetch(client)
        except Unreachable as exc:
            return Group(Text(str(exc), style="bold red"), stamp)
        if pending_only:
            doc["grants"] = []
        return Group(approvals_view(doc, client.address), stamp)

    if as_json:
        while True:
            try:
                line: Any = as_list(fetch(client), pending_only)
            except Unreachable as exc:
                line = {"error": str(exc)}
            click.echo(json.dumps(line))
            sys.stdout.flush()
            time.sleep(every)
    if not console.is_terminal:
        while True:
            console.print(frame())
            sys.stdout.flush()
            time.sleep(every)
    with Live(frame(), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            time.sleep(every)
            live.update(frame())


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _decide(client: DebugClient, approval_id: str, action: str,
            body: dict[str, Any]) -> dict[str, Any]:
    """POST one answer; exit 1 with the server's reason for an unknown or decided id."""
    path = f"{PATH}/{approval_id}/{action}"
    try:
        with client.client() as http:
            response = http.post(path, json=body)
    except httpx.HTTPError as exc:
        fail(str(client.explain(exc)))
    if response.status_code in (400, 404):
        try:
            why = str(response.json().get("error"))
        except (ValueError, AttributeError):
            why = response.text[:200]
        fail(f"cannot {action} {approval_id}: {why}", EXIT_FAILED)
    try:
        client.check_status(response)
        doc = response.json()
    except Unreachable as exc:
        fail(str(exc))
    except ValueError:
        fail(f"{client.address}{path} did not answer JSON")
    return doc if isinstance(doc, dict) else {}


def _say(doc: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(text)


@click.command()
@debug_options
@click.argument("approval_id", metavar="ID")
@click.option("--for", "for_secs", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Also approve the same call (same agent, tool, argv or method + params) "
              "again without asking, for this long.")
@click.option("--reason", default="", help="Why; written to the audit trail.")
@click.option("--as", "by", default=None, metavar="NAME",
              help="Who answers, for the audit trail (default: your user name).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
def approve(debug_address: str, debug_token_file: str | None, approval_id: str,
            for_secs: float | None, reason: str, by: str | None, as_json: bool) -> None:
    """Let the call waiting as ID run."""
    client = make_debug_client(debug_address, debug_token_file)
    body: dict[str, Any] = {"reason": reason, "by": by or _operator()}
    if for_secs is not None:
        body["for_secs"] = for_secs
    doc = _decide(client, approval_id, "approve", body)
    remembered = f", and the same call for {for_secs:g} s" if for_secs else ""
    _say(doc, as_json, f"approved {approval_id} ({doc.get('tool')} for agent "
         f"{doc.get('agent')}){remembered}")
    sys.exit(EXIT_OK)


@click.command()
@debug_options
@click.argument("approval_id", metavar="ID")
@click.option("--reason", default="", help="Why; the VM is told, and the audit trail keeps it.")
@click.option("--as", "by", default=None, metavar="NAME",
              help="Who answers, for the VM and the audit trail (default: your user name).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
def deny(debug_address: str, debug_token_file: str | None, approval_id: str, reason: str,
         by: str | None, as_json: bool) -> None:
    """Refuse the call waiting as ID (or forget the remembered approval gN)."""
    client = make_debug_client(debug_address, debug_token_file)
    doc = _decide(client, approval_id, "deny", {"reason": reason, "by": by or _operator()})
    if doc.get("kind") == "grant":
        _say(doc, as_json, f"forgot remembered approval {approval_id}")
    else:
        _say(doc, as_json, f"denied {approval_id} ({doc.get('tool')} for agent "
             f"{doc.get('agent')})")
    sys.exit(EXIT_OK)
