"""``carapace-debug sse-test``: prove that Server-Sent Events cross the tunnel in real time.

Without a subcommand it generates ``--count`` events at ``--interval-ms`` and
shows each one, reading them through the tunnel when given ``--through URL`` (see
:mod:`.sse_run`). ``serve`` runs a test upstream of timestamped events (put it
behind the tunnel as an HTTP tool); ``measure`` consumes any SSE endpoint, times
every event against the ``ts`` it carries, and fails when the stream is
buffered, has gaps or ends short (see :mod:`.sse_timing`). Together they
reproduce the before/after latency table on a live deployment.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from .client import EXIT_UNREACHABLE, Unreachable, debug_options, make_debug_client
from .sse_timing import Collection, analyse, collect

DEFAULT_SERVE_PORT = 8099


# --------------------------------------------------------------------------- output


def _fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def render_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"SSE measurement: {report['url']}", show_header=False, title_justify="left"
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    asked = f" of {report['requested']}" if report["requested"] else ""
    table.add_row(
        "events", f"{report['events']}{asked} ({report['timed']} timed, "
        f"{report['comments']} comments; ended by {report['ended']})"
    )
    table.add_row("latency p50", _fmt_ms(report["p50_ms"]))
    table.add_row("latency p99", _fmt_ms(report["p99_ms"]))
    table.add_row("latency max", _fmt_ms(report["max_ms"]))
    table.add_row("first event after", _fmt_ms(report["first_event_ms"]))
    rate = report["rate_per_s"]
    table.add_row("rate", "—" if rate is None else f"{rate:.1f} events/s")
    gaps = report["gaps"]
    if gaps["missing_ids"] or gaps["missing_seq"] or gaps["out_of_order"]:
        gap_text = (
            f"[red]{gaps['missing_ids']} missing ids, {gaps['missing_seq']} missing seq, "
            f"{gaps['out_of_order']} out of order[/red]"
        )
    else:
        gap_text = "none"
    table.add_row("gaps", gap_text)
    bursts = report["bursts"]
    table.add_row(
        "bursts",
        "none" if not bursts["count"] else
        f"{bursts['count']} (largest {bursts['largest']} events, "
        f"{bursts['compressed_events']} events held back)",
    )
    verdict = report["verdict"]
    style = "green" if report["ok"] else "red"
    table.add_row("verdict", f"[bold {style}]{verdict.upper()}[/bold {style}]")
    console.print(table)
    for problem in report["problems"]:
        console.print(f"[red]✗[/red] {problem}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(
        "[dim]latency = arrival time here − the event's 'ts' (time.time() at the sender): "
        "exact on one host, otherwise only as good as the clock sync.[/dim]"
    )


# --------------------------------------------------------------------------- commands


_RUN_OPTIONS = {"count": "--count", "interval_ms": "--interval-ms", "through": "--through",
                "direct": "--direct", "timeout": "--timeout", "as_json": "--json"}
"""The options of the plain run (parameter: flag), refused before a subcommand."""


@click.group("sse-test", invoke_without_command=True)
@debug_options
@click.option("--count", type=click.IntRange(min=1), default=10, show_default=True,
              help="Events to generate (or to read through --through).")
@click.option("--interval-ms", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="Time between events.")
@click.option("--through", metavar="URL", default=None,
              help="An SSE URL served through the agent (in the VM: http://127.0.0.1:PORT/PATH, "
              "PORT the --expose port of a tool); count= and interval_ms= are added to its "
              "query unless it has them.")
@click.option("--direct", metavar="URL", default=None,
              help="With --through: the same source read without the tunnel, so that each "
              "event's latency there is subtracted.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Give up after this many seconds (default: the run's length + 10 s).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def sse_test(ctx: click.Context, debug_address: str, debug_token_file: str | None, count: int,
             interval_ms: float, through: str | None, direct: str | None,
             timeout: float | None, as_json: bool) -> None:
    """Prove SSE streams cross the tunnel in real time.

    \b
    carapace-debug sse-test --count 10 --interval-ms 100
        generates 10 events here, 100 ms apart, reads them back directly and
        shows each with its elapsed time, then the rate. Nothing crosses the
        tunnel, and the output says so (and, when a server's debug listener
        answers, which command would measure its tunnel).
    carapace-debug sse-test --count 10 --interval-ms 100 --through URL [--direct URL]
        reads the events through the agent and shows the latency each one
        added: arrival here minus the event's own "ts", less the same event's
        latency on a direct read of the source when --direct is given.

    \b
    A source for --through: on the host `carapace-debug sse-test serve --port 8099`
    and a policy tool whose upstream is http://127.0.0.1:8099; in the VM, the
    agent's --expose port for that tool. `measure URL` analyses any SSE stream.

    \b
    Exit status: 0 real time; 1 buffered, gaps, or fewer events than --count;
                 2 the URL could not be read or is not an SSE stream.
    """
    if ctx.invoked_subcommand is not None:
        given = [flag for name, flag in _RUN_OPTIONS.items()
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            sub = ctx.invoked_subcommand
            raise click.UsageError(
                f"{', '.join(given)} (given before '{sub}') "
                f"{'is an option' if len(given) == 1 else 'are options'} of the plain sse-test "
                f"run; put {sub}'s own options after '{sub}' "
                f"(see carapace-debug sse-test {sub} --help)")
        return
    if direct is not None and through is None:
        raise click.UsageError("--direct URL compares with --through URL: give both")
    from .sse_run import RunSpec, run_and_report

    spec = RunSpec(count=count, interval_ms=interval_ms, through=through, direct=direct,
                   timeout=timeout if timeout is not None else count * interval_ms / 1000 + 10)
    ctx.exit(run_and_report(spec, make_debug_client(debug_address, debug_token_file), as_json))


@sse_test.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, default=DEFAULT_SERVE_PORT, show_default=True, help="0 picks a free port."
)
@click.option(
    "--count", type=click.IntRange(min=0), default=None,
    help="Events per stream on / and /events (default: never end).",
)
@click.option(
    "--interval-ms", type=click.FloatRange(min=0), default=100.0, show_default=True,
    help="Time between events on / and /events.",
)
@click.option("--access-log", is_flag=True, help="Print one line per request to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the listening line as JSON.")
def serve(
    host: str, port: int, count: int | None, interval_ms: float, access_log: bool, as_json: bool
) -> None:
    """Run an upstream of timestamped SSE events (plus the whole test upstream).

    / and /events stream events whose data is {"seq", "ts"}; every route of
    the test upstream is there too: /sse?count=&interval_ms=, /sse-buffered
    (a deliberately buffering stream, to see `measure` catch it),
    /api/v1/events and /api/v1/rpc (a fake signal-cli), /echo, /stats.
    Query parameters count= and interval_ms= override the defaults per request.
    """
    import trio

    from carapace.debug.upstream import UpstreamServer, serve_upstream

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: UpstreamServer = await nursery.start(
                functools.partial(
                    serve_upstream, host, port, stream_count=count,
                    stream_interval_ms=interval_ms, access_log=access_log,
                )
            )
            measure_url = server.url("/events")
            if as_json:
                click.echo(json.dumps({
                    "listening": server.base_url, "measure_url": measure_url,
                    "count": count, "interval_ms": interval_ms,
                }))
            else:
                click.echo(
                    f"sse-test upstream listening on {server.base_url} "
                    f"({'endless' if count is None else count} events every {interval_ms:g} ms);"
                    f" measure with: carapace-debug sse-test measure {measure_url}"
                )
            # Flushed at once, so a supervisor or a test can wait for the line.
            click.get_text_stream("stdout").flush()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'")
    return name.strip(), rest.strip()


@sse_test.command()
@click.argument("url")
@click.option(
    "--count", type=click.IntRange(min=0), default=20, show_default=True,
    help="Stop after this many events; 0 reads until the stream ends or --timeout.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
    help="Give up after this many seconds in all.",
)
@click.option(
    "--max-p99-ms", type=click.FloatRange(min=0), default=250.0, show_default=True,
    help="Flag buffering when p99 latency is above this; 0 turns the latency test off "
    "(for hosts whose clocks are not synced).",
)
@click.option(
    "--burst-ms", type=click.FloatRange(min=0), default=50.0, show_default=True,
    help="An event counts as held back when it arrives this much sooner after the "
    "previous one than its timestamp says.",
)
@click.option(
    "-H", "--header", "headers", multiple=True, help="Extra request header 'Name: value'."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def measure(
    url: str, count: int, timeout: float, max_p99_ms: float, burst_ms: float,
    headers: tuple[str, ...], as_json: bool,
) -> None:
    """Consume the SSE stream at URL and report whether it is real time.

    Each event's latency is its arrival time here minus the "ts" field of its
    JSON data (time.time() at the sender), so run this on the same host as
    the sender or with synced clocks; events without a numeric "ts" are
    counted but not timed. Reports p50/p99/max latency, rate, gaps in ids or
    "seq" numbers, and bursts (events held back, then released together; this
    test needs no clock sync).

    \b
    Exit status: 0 real time; 1 buffered, gaps, or fewer events than --count;
                 2 the endpoint could not be reached or is not an SSE stream.
    """
    import trio

    parsed_headers = [_parse_header(h) for h in headers]
    ctx = click.get_current_context()

    def run(on_event: Callable[[int], None] | None = None) -> Collection:
        return trio.run(
            functools.partial(
                collect, url, count=count, timeout=timeout, headers=parsed_headers,
                on_event=on_event,
            )
        )

    try:
        if as_json:
            col = run()
        else:
            from rich.console import Console

            err = Console(stderr=True)
            if not err.is_terminal:
                col = run()
            else:
                with err.status(f"reading {url} …") as status:
                    col = run(
                        lambda n: status.update(f"reading {url} … {n}/{count or '∞'} events")
                    )
    except Unreachable as exc:
        if as_json:
            click.echo(json.dumps({
                "url": url, "ok": False, "verdict": "unreachable", "error": exc.message,
                "hint": exc.hint, "exit_code": EXIT_UNREACHABLE,
            }))
        else:
            click.echo(f"error: {exc.message}\n  check: {exc.hint}", err=True)
        ctx.exit(EXIT_UNREACHABLE)

    report = analyse(col, max_p99_ms=max_p99_ms, burst_ms=burst_ms)
    if as_json:
        click.echo(json.dumps(report))
    else:
        render_report(report)
    ctx.exit(report["exit_code"])
