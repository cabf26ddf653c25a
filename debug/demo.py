"""``make demo``: the whole tunnel on loopback, explained as it runs.

Starts a signal-cli look-alike (the host service), ``carapace-server`` (host
side, with a policy) and ``carapace-agent`` (VM side) as real processes, then
shows what crosses the tunnel: an allowed JSON-RPC call, calls the policy
denies and why, and a live stream of Server-Sent Events with the latency the
tunnel adds over reading the upstream directly.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
import httpx
import trio
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from carapace.protocol.sse import Event, SseParser

console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{what} exited early:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise click.ClickException(f"{what} did not start listening on port {port}")


POLICY = """\
# The demo's policy: what the VM may do with the host's signal-cli.
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream}"
    allow_paths:
      - "POST /api/v1/rpc"
      - "GET /api/v1/events"
      - "GET /api/v1/check"
    jsonrpc_allow_methods: [send, version, listAccounts]
    jsonrpc_deny_methods: [deleteEverything, removeAccount]
    jsonrpc_param_filters:
      send:
        field: recipient
        allow_patterns: ["+1*"]
    rate_limit:
      max_requests: 1000
      window_secs: 60
    timeout_secs: 10
"""


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rpc(url: str, method: str, params: dict[str, object] | None = None) -> httpx.Response:
    body: dict[str, object] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        body["params"] = params
    return httpx.post(url + "/api/v1/rpc", json=body, timeout=10)


def _show_calls(agent_url: str) -> None:
    table = Table(title="Requests from the VM, decided on the host", title_justify="left",
                  expand=True)
    table.add_column("request (VM → agent)", style="cyan", ratio=2)
    table.add_column("result", no_wrap=True)
    table.add_column("what the VM got back", overflow="fold", ratio=3)
    calls: list[tuple[str, str, dict[str, object] | None]] = [
        ("rpc", "version", None),
        ("rpc", "send", {"recipient": ["+15550100"], "message": "hello from the VM"}),
        ("rpc", "send", {"recipient": ["+15550100", "+447700900123"], "message": "smuggle"}),
        ("rpc", "deleteEverything", None),
        ("get", "/api/v1/admin", None),
    ]
    for kind, what, params in calls:
        start = time.perf_counter()
        if kind == "rpc":
            r = _rpc(agent_url, what, params)
            label = f"JSON-RPC {what}"
            if params and "recipient" in params:
                label += f" to {', '.join(params['recipient'])}"  # type: ignore[arg-type]
        else:
            r = httpx.get(agent_url + what, timeout=10)
            label = f"GET {what}"
        ms = (time.perf_counter() - start) * 1000
        if r.status_code == 200:
            result = Text(f"200 allowed · {ms:.1f} ms", style="green")
            shown = r.text.strip()[:120]
        else:
            result = Text(f"{r.status_code} denied", style="bold red")
            try:
                shown = str(r.json().get("message", r.text))
            except ValueError:
                shown = r.text
        table.add_row(label, result, shown)
    console.print(table)


async def _stream(url: str, latencies: list[float], count: list[int],
                  stop: trio.Event) -> None:
    parser = SseParser()
    async with httpx.AsyncClient(timeout=None) as client, client.stream("GET", url) as r:
        async for chunk in r.aiter_raw():
            now = time.time()
            for item in parser.feed(chunk):
                if isinstance(item, Event) and item.data:
                    try:
                        ts = float(json.loads(item.data)["ts"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    latencies.append((now - ts) * 1000)
                    count[0] += 1
            if stop.is_set():
                return


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stats_table(direct: list[float], tunnel: list[float], count: list[int],
                 elapsed: float) -> Table:
    table = Table(title="Live SSE: /api/v1/events, 50 events/s, read directly and through "
                  "the tunnel at the same time", title_justify="left", expand=True)
    table.add_column("path")
    table.add_column("events", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("max ms", justify="right")
    for name, values in (("direct (no tunnel)", direct), ("through Carapace", tunnel)):
        table.add_row(name, str(len(values)), f"{_pct(values, 0.5):.2f}",
                      f"{_pct(values, 0.99):.2f}", f"{max(values, default=float('nan')):.2f}")
    if direct and tunnel:
        added50 = _pct(tunnel, 0.5) - _pct(direct, 0.5)
        added99 = _pct(tunnel, 0.99) - _pct(direct, 0.99)
        table.caption = (f"The tunnel adds {added50:.2f} ms at p50 and {added99:.2f} ms at p99 "
                         f"({elapsed:.0f} s so far; Ctrl-C to stop)")
    return table


async def _live(direct_url: str, tunnel_url: str, seconds: float) -> tuple[list[float],
                                                                          list[float]]:
    direct: list[float] = []
    tunnel: list[float] = []
    count = [0]
    stop = trio.Event()
    start = time.monotonic()
    with Live(_stats_table(direct, tunnel, count, 0), console=console,
              refresh_per_second=4, transient=False) as live:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, direct_url, direct, [0], stop)
            nursery.start_soon(_stream, tunnel_url, tunnel, count, stop)
            while seconds <= 0 or time.monotonic() - start < seconds:
                await trio.sleep(0.25)
                live.update(_stats_table(direct, tunnel, count, time.monotonic() - start))
            nursery.cancel_scope.cancel()
    return direct, tunnel


@click.command()
@click.option("--seconds", type=float, default=0, show_default=True,
              help="Stop after this many seconds of live events (0: until Ctrl-C).")
def main(seconds: float) -> None:
    """Run the Carapace demo on loopback."""
    console.print(Panel(textwrap.dedent("""\
        [bold]Carapace[/bold] lets code in an untrusted VM use host services without
        holding their credentials. This demo runs three real processes on loopback:

          [cyan]VM[/cyan]    your client ──HTTP──► [bold]carapace-agent[/bold]
                                         ║ one authenticated TCP link (msgpack frames)
          [magenta]host[/magenta]  signal-cli ◄──HTTP── [bold]carapace-server[/bold] ← policy

        Every request is checked on the host; answers and events stream back in real time."""),
        title="carapace demo", border_style="blue"))
    tmp = Path(tempfile.mkdtemp(prefix="carapace-demo-"))
    token = secrets.token_urlsafe(32)
    (tmp / "token").write_text(f"default:{token}\n")
    (tmp / "token").chmod(0o600)
    up_port, server_port, agent_port = _free_port(), _free_port(), _free_port()
    (tmp / "policy.yaml").write_text(POLICY.format(upstream=up_port))
    py = sys.executable
    with ExitStack() as stack:
        upstream = stack.enter_context(_process(
            [py, "-m", "carapace.debug.upstream", "--port", str(up_port)], tmp / "upstream.log"))
        _wait_port(up_port, upstream, "the signal-cli look-alike", tmp / "upstream.log")
        console.print(f"[green]✓[/green] host: signal-cli look-alike on 127.0.0.1:{up_port}")
        server = stack.enter_context(_process(
            [py, "-m", "carapace.server.main", "--listen", f"127.0.0.1:{server_port}",
             "--policy", str(tmp / "policy.yaml"), "--token-file", str(tmp / "token"),
             "--audit-log", str(tmp / "audit.jsonl")], tmp / "server.log"))
        _wait_port(server_port, server, "carapace-server", tmp / "server.log")
        console.print(f"[green]✓[/green] host: carapace-server on 127.0.0.1:{server_port} "
                      f"(policy {tmp / 'policy.yaml'})")
        agent = stack.enter_context(_process(
            [py, "-m", "carapace.agent.main", "--server", f"127.0.0.1:{server_port}",
             "--token-file", str(tmp / "token"), "--expose",
             f"signal-cli=127.0.0.1:{agent_port}"], tmp / "agent.log"))
        _wait_port(agent_port, agent, "carapace-agent", tmp / "agent.log")
        agent_url = f"http://127.0.0.1:{agent_port}"
        deadline = time.monotonic() + 15
        while httpx.get(agent_url + "/api/v1/check", timeout=5).status_code == 502:
            if time.monotonic() > deadline:
                raise click.ClickException("the agent did not connect:\n"
                                           + (tmp / "agent.log").read_text()[-2000:])
            time.sleep(0.05)
        console.print(f"[green]✓[/green] VM:   carapace-agent connected; signal-cli served at "
                      f"{agent_url} (the VM's base URL)\n")
        _show_calls(agent_url)
        console.print()
        query = "/api/v1/events?account=%2B15550100&interval_ms=20"
        try:
            direct, tunnel = trio.run(_live, f"http://127.0.0.1:{up_port}{query}",
                                      agent_url + query, seconds)
        except KeyboardInterrupt:
            direct, tunnel = [], []
        if direct and tunnel:
            console.print(
                f"\n[bold]Result:[/bold] {len(tunnel)} events through the tunnel; added latency "
                f"p50 {statistics.median(tunnel) - statistics.median(direct):+.2f} ms. "
                f"Logs and the audit trail are in {tmp}."
            )
        console.print("[dim]Stopped. Run `make test` for the full suite.[/dim]")


if __name__ == "__main__":
    main()
