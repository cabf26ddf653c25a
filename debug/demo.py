"""``make demo``: the whole tunnel on loopback, explained as it runs.

Starts a signal-cli look-alike (the host service), ``carapace-server`` (host
side, with a policy and an audit log) and ``carapace-agent`` (VM side, with an
HTTP listener and a shim socket) as real processes, then shows, in three steps:

1. what the VM asked and what the host decided, with the policy rule from the
   audit log and proof (the service's own counters) that denied calls never
   reached it — over HTTP and through a CLI shim; then one call that waits for
   a person on the host until the demo approves it (``demo_approval.py``);
2. a live stream of Server-Sent Events, read directly and through the tunnel at
   the same time, with the latency the tunnel adds;
3. what crossed the tunnel, summed from the audit log, and a one-line verdict.

Ctrl-C, SIGTERM and SIGHUP stop it and every process it started (they run in
sessions of their own, so nobody else would). Without a terminal (a pipe, CI,
``timeout 60 make demo``) step 2 runs for ``UNATTENDED_SECONDS`` unless
``--duration`` says otherwise, then the summary is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from carapace.protocol.sse import Event, SseParser

from .demo_approval import approval_step

console = Console()

EVENT_INTERVAL_MS = 20
REAL_TIME_P99_MS = 50.0
"""Added p99 latency under which the verdict says "real time"."""


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
# The demo's policy: what the VM may do on this host.
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
    jsonrpc_approve_methods: [listAccounts]   # allowed, once a person says yes
    approval: {{timeout_secs: 60}}
    jsonrpc_param_filters:
      send:
        field: recipient
        allow_patterns: ["+1*"]
    rate_limit:
      max_requests: 1000
      window_secs: 60
    timeout_secs: 10
  date:
    type: cli
    binary: {date}
    argv_allow_patterns: ["-u", "-u +*"]
    argv_deny_patterns: ["-s *", "--set*"]
    timeout_secs: 5
"""


def _install_shims(directory: Path, tools: list[str]) -> None:
    """Link each tool in ``directory`` to carapace-shim, as a VM's operator would.

    Through the agent's command line rather than its code: the debug CLI
    never imports the agent (the import contract in pyproject.toml).
    """
    done = subprocess.run(
        [sys.executable, "-m", "carapace.agent.main", "shims", "install", "--dir",
         str(directory), *tools],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise click.ClickException(f"installing the shims failed:\n{done.stderr.strip()}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
UNATTENDED_SECONDS = 5.0
"""How long step 2 runs when the output is not a terminal (nobody can press Ctrl-C)."""
_stopped_by: list[int] = []
"""The SIGTERM or SIGHUP that stopped the demo, if one did."""


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does, so it stops what it started.

    They are turned into SIGINT, which Python (and trio, during step 2)
    turns into KeyboardInterrupt at a safe point; the processes are then
    stopped on the way out.
    """
    def stop(signum: int, frame: object) -> None:
        _stopped_by.append(signum)
        signal.raise_signal(signal.SIGINT)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    # A session of its own: Ctrl-C stops the demo, which then stops these in order.
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        # A second signal must not cut this short: it waits until the process is gone.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- the audit log


def _audit(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _last_decision(path: Path) -> dict[str, Any]:
    decisions = [r for r in _audit(path) if r.get("event") == "decision"]
    return decisions[-1] if decisions else {}


def _short_rule(record: dict[str, Any]) -> str:
    rule = str(record.get("rule") or "")
    tool = record.get("tool")
    return rule.replace(f"tools.{tool}.", "") if tool else rule


# --------------------------------------------------------------------------- step 1


@dataclass
class Call:
    label: str
    allowed: bool
    ms: float
    rule: str
    answer: str
    reached: bool


@dataclass
class Demo:
    tmp: Path
    agent_url: str
    upstream_url: str
    socket_path: Path
    shim_dir: Path
    audit_log: Path
    calls: list[Call] = field(default_factory=list)

    def upstream_paths(self) -> Counter[str]:
        stats = httpx.get(self.upstream_url + "/stats", timeout=5).json()
        return Counter(stats["paths"]) + Counter(stats["rpc_calls"])

    def http(self, label: str, method: str, path: str, rpc: dict[str, Any] | None = None) -> None:
        before = self.upstream_paths()
        start = time.perf_counter()
        r = httpx.request(method, self.agent_url + path, json=rpc, timeout=10)
        ms = (time.perf_counter() - start) * 1000
        after = self.upstream_paths()
        key = rpc["method"] if rpc else path
        allowed = r.status_code < 400
        if allowed:
            try:
                answer = json.dumps(r.json().get("result"), separators=(",", ":"))
            except ValueError:
                answer = r.text
        else:
            answer = self._vm_message(r)
        self.calls.append(Call(label, allowed, ms, _short_rule(_last_decision(self.audit_log)),
                               answer, after[key] > before[key]))

    @staticmethod
    def _vm_message(r: httpx.Response) -> str:
        try:
            return f"{r.status_code}: {r.json().get('message', r.text)}"
        except ValueError:
            return f"{r.status_code}: {r.text.strip()}"

    def shim(self, label: str, *args: str) -> None:
        start = time.perf_counter()
        done = subprocess.run([str(self.shim_dir / "date"), *args], capture_output=True,
                              text=True, timeout=20,
                              env={**os.environ, "CARAPACE_AGENT_SOCKET": str(self.socket_path)})
        ms = (time.perf_counter() - start) * 1000
        decision = _last_decision(self.audit_log)
        allowed = decision.get("decision") == "allow"
        answer = done.stdout.strip() if allowed else (
            f"exit {done.returncode}: {done.stderr.strip().removeprefix('carapace: date: ')}")
        self.calls.append(Call(label, allowed, ms, _short_rule(decision), answer, allowed))


def _calls_table(calls: list[Call]) -> Table:
    table = Table(title="1 · What the VM asked, and what the host decided",
                  title_justify="left", title_style="bold", expand=True)
    table.add_column("the VM asked", style="cyan", ratio=3)
    table.add_column("host decision · rule (audit log)", ratio=4)
    table.add_column("what the VM got back", overflow="fold", ratio=4)
    for c in calls:
        if c.allowed:
            verdict = Text.assemble(("✓ allowed", "bold green"), f" · {c.ms:.1f} ms\n",
                                    (c.rule, "dim"))
            got = Text(c.answer[:120])
        else:
            verdict = Text.assemble(("✗ denied", "bold red"), "\n", (c.rule, "dim"))
            if c.label.startswith("shim"):
                proof = "never ran on the host" if not c.reached else "!! ran on the host"
            else:
                proof = "never reached signal-cli" if not c.reached else "!! reached signal-cli"
            got = Text.assemble(c.answer[:160], "\n", (proof, "red" if c.reached else "dim"))
        table.add_row(c.label, verdict, got)
    return table


# --------------------------------------------------------------------------- step 2


async def _stream(url: str, latencies: list[float], stop: trio.Event) -> None:
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
            if stop.is_set():
                return


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stats_table(direct: list[float], tunnel: list[float], elapsed: float,
                 seconds: float) -> Table:
    rate = 1000 // EVENT_INTERVAL_MS
    table = Table(title=f"2 · Live events: /api/v1/events at {rate} events/s, read directly and "
                  "through the tunnel at the same time", title_justify="left",
                  title_style="bold", expand=True)
    table.add_column("reader")
    table.add_column("events", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("max ms", justify="right")
    for name, values in (("direct (no tunnel)", direct), ("through Carapace", tunnel)):
        table.add_row(name, str(len(values)), f"{_pct(values, 0.5):.2f}",
                      f"{_pct(values, 0.99):.2f}", f"{max(values, default=float('nan')):.2f}")
    if seconds > 0:
        stop = f"{max(seconds - elapsed, 0):.0f} s left"
    else:
        stop = "Ctrl-C for the summary"
    table.caption = (f"latency = arrival at the reader − send time at signal-cli · "
                     f"{elapsed:.0f} s · {stop}")
    return table


async def _live(direct_url: str, tunnel_url: str, seconds: float,
                direct: list[float], tunnel: list[float]) -> None:
    stop = trio.Event()
    start = time.monotonic()
    with Live(_stats_table(direct, tunnel, 0, seconds), console=console,
              refresh_per_second=4, transient=False) as live:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, direct_url, direct, stop)
            nursery.start_soon(_stream, tunnel_url, tunnel, stop)
            try:
                while seconds <= 0 or time.monotonic() - start < seconds:
                    await trio.sleep(0.25)
                    live.update(_stats_table(direct, tunnel, time.monotonic() - start, seconds))
            finally:
                live.update(_stats_table(direct, tunnel, time.monotonic() - start, seconds))
                nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- step 3


def _settled_audit(path: Path, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The audit log once every allowed request has its completion record (streams
    that were just closed get theirs a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _audit(path)
        allowed = {r["request_id"] for r in records
                   if r.get("event") == "decision" and r.get("decision") == "allow"}
        done = {r["request_id"] for r in records if r.get("event") == "completion"}
        if allowed <= done or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _summary(records: list[dict[str, Any]], client_events: int) -> Table:
    rows: dict[str, Counter[str]] = {}
    for r in records:
        key = "HTTP (signal-cli)" if r.get("kind") == "http" else f"CLI ({r.get('tool')})"
        c = rows.setdefault(key, Counter())
        if r.get("event") == "decision":
            c[r.get("decision", "?")] += 1
        elif r.get("event") == "completion":
            c["bytes_in"] += int(r.get("bytes_in") or 0)
            c["bytes_out"] += int(r.get("bytes_out") or 0)
            c["events"] += int(r.get("events") or 0)
    table = Table(title="3 · What crossed the tunnel (summed from the server's audit log)",
                  title_justify="left", title_style="bold", expand=True)
    for name, justify in (("kind", "left"), ("allowed", "right"), ("denied", "right"),
                          ("VM → host", "right"), ("host → VM", "right"),
                          ("SSE events", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    audited_events = 0
    for name, c in rows.items():
        audited_events += c["events"]
        table.add_row(name, str(c["allow"]), Text(str(c["deny"]), "red" if c["deny"] else ""),
                      _bytes(c["bytes_in"]), _bytes(c["bytes_out"]), str(c["events"]))
    notes = ["allowed includes the agent's readiness probe and the event stream",
             "denied requests carry no bytes: they stop at the host's policy check"]
    if audited_events < client_events:
        notes.append(f"the reader got {client_events} events through the tunnel; the audit "
                     f"log counted {audited_events} (it counts a stream's events only when the "
                     "stream ends on its own, not when the reader closes it)")
    table.caption = "; ".join(notes)
    return table


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 10 * 1024 else f"{n} B"


def _verdict(direct: list[float], tunnel: list[float]) -> Text:
    if len(tunnel) < 10 or not direct:
        return Text("Verdict: too few events to judge latency (let step 2 run a few seconds).",
                    style="yellow")
    p50, p99 = _pct(tunnel, 0.5), _pct(tunnel, 0.99)
    added50 = p50 - _pct(direct, 0.5)
    added99 = p99 - _pct(direct, 0.99)
    numbers = (f"each event reached the VM in {p50:.1f} ms (p50) / {p99:.1f} ms (p99), "
               f"{max(added50, 0):.1f} / {max(added99, 0):.1f} ms more than reading "
               f"signal-cli directly, over {len(tunnel)} events.")
    if added99 <= REAL_TIME_P99_MS:
        return Text.assemble(("Verdict: real time — ", "bold green"), numbers)
    return Text.assemble(("Verdict: slower than real time — ", "bold red"), numbers,
                         " See DEPLOYMENT.md, 'Events arrive in bursts'.")


# --------------------------------------------------------------------------- main


INTRO = textwrap.dedent("""\
    [bold]Carapace[/bold] lets code in an untrusted VM use host services (here: signal-cli
    and the host's `date`) without holding their credentials. Three real processes:

      [cyan]VM[/cyan]    client ──HTTP──► [bold]carapace-agent[/bold] ◄──unix── shim `date`
                               ║ one authenticated TCP link
      [magenta]host[/magenta]  signal-cli ◄── [bold]carapace-server[/bold] ──► /usr/bin/date
                               policy · audit log

    Every request is decided on the host; answers and events stream back in real time.""")


def _step_calls(demo: Demo) -> None:
    """Step 1: calls the policy allows, and calls it denies (and why)."""
    rpc = {"jsonrpc": "2.0", "id": 1}
    demo.http("JSON-RPC version", "POST", "/api/v1/rpc", {**rpc, "method": "version"})
    demo.http("JSON-RPC send to +15550100", "POST", "/api/v1/rpc",
              {**rpc, "method": "send",
               "params": {"recipient": ["+15550100"], "message": "hello from the VM"}})
    demo.http("JSON-RPC send to +15550100 and +447700900123", "POST", "/api/v1/rpc",
              {**rpc, "method": "send",
               "params": {"recipient": ["+15550100", "+447700900123"], "message": "hi"}})
    demo.http("JSON-RPC deleteEverything", "POST", "/api/v1/rpc",
              {**rpc, "method": "deleteEverything"})
    demo.http("GET /api/v1/admin", "GET", "/api/v1/admin")
    demo.shim("shim: date -u", "-u")
    demo.shim("shim: date -s 2030-01-01", "-s", "2030-01-01")


@click.command()
@click.option("--seconds", "--duration", "seconds", type=float, default=None,
              help="Stop after this many seconds of live events (0: until Ctrl-C). Default: "
              f"until Ctrl-C on a terminal, {UNATTENDED_SECONDS:g} s when the output is not "
              "one.")
def main(seconds: float | None) -> None:
    """Run the Carapace demo on loopback.

    Ctrl-C, SIGTERM or SIGHUP stop it, and with it every process it started.
    """
    if seconds is None:
        seconds = 0.0 if sys.stdout.isatty() else UNATTENDED_SECONDS
    _stop_on_signals()
    try:
        _run(seconds)
    except KeyboardInterrupt:
        console.print("\n[yellow]stopped[/yellow]: the demo stopped every process it started.")
        sys.exit(128 + (_stopped_by[0] if _stopped_by else signal.SIGINT))
    if _stopped_by:
        sys.exit(128 + _stopped_by[0])


def _run(seconds: float) -> None:
    console.print(Panel(INTRO, title="carapace demo", border_style="blue"))
    tmp = Path(tempfile.mkdtemp(prefix="carapace-demo-"))
    token = secrets.token_urlsafe(32)
    (tmp / "token").write_text(f"default:{token}\n")
    (tmp / "token").chmod(0o600)
    up_port, server_port, agent_port = _free_port(), _free_port(), _free_port()
    debug_port = _free_port()
    date = shutil.which("date") or "/bin/date"
    (tmp / "policy.yaml").write_text(POLICY.format(upstream=up_port, date=date))
    audit_log = tmp / "audit.jsonl"
    socket_path = tmp / "agent.sock"
    shim_dir = tmp / "shims"
    _install_shims(shim_dir, ["date"])
    py = sys.executable
    with ExitStack() as stack:
        upstream = stack.enter_context(_process(
            [py, "-m", "carapace.debug.upstream", "--port", str(up_port)], tmp / "upstream.log"))
        server = stack.enter_context(_process(
            [py, "-m", "carapace.server.main", "--listen", f"127.0.0.1:{server_port}",
             "--policy", str(tmp / "policy.yaml"), "--token-file", str(tmp / "token"),
             "--audit-log", str(audit_log), "--debug-listen", f"127.0.0.1:{debug_port}"],
            tmp / "server.log"))
        agent = stack.enter_context(_process(
            [py, "-m", "carapace.agent.main", "--server", f"127.0.0.1:{server_port}",
             "--token-file", str(tmp / "token"), "--expose",
             f"signal-cli=127.0.0.1:{agent_port}", "--cli-socket", str(socket_path)],
            tmp / "agent.log"))
        _wait_port(up_port, upstream, "the signal-cli look-alike", tmp / "upstream.log")
        _wait_port(server_port, server, "carapace-server", tmp / "server.log")
        _wait_port(agent_port, agent, "carapace-agent", tmp / "agent.log")
        agent_url = f"http://127.0.0.1:{agent_port}"
        deadline = time.monotonic() + 15
        while httpx.get(agent_url + "/api/v1/check", timeout=5).status_code == 502:
            if time.monotonic() > deadline:
                raise click.ClickException("the agent did not connect:\n"
                                           + (tmp / "agent.log").read_text()[-2000:])
            time.sleep(0.05)
        console.print(f"[green]✓[/green] host: signal-cli look-alike :{up_port}, "
                      f"carapace-server :{server_port}  [dim](policy, audit log in {tmp})[/dim]")
        console.print(f"[green]✓[/green] VM:   carapace-agent connected; signal-cli at "
                      f"{agent_url}, shim {shim_dir / 'date'}\n")

        demo = Demo(tmp, agent_url, f"http://127.0.0.1:{up_port}", socket_path, shim_dir,
                    audit_log)
        _step_calls(demo)
        console.print(_calls_table(demo.calls))
        console.print()
        console.print(approval_step(agent_url, demo.upstream_url,
                                    f"http://127.0.0.1:{debug_port}", audit_log))
        console.print()

        query = f"/api/v1/events?account=%2B15550100&interval_ms={EVENT_INTERVAL_MS}"
        direct: list[float] = []
        tunnel: list[float] = []
        try:
            trio.run(_live, f"http://127.0.0.1:{up_port}{query}", agent_url + query, seconds,
                     direct, tunnel)
        except* KeyboardInterrupt:  # Ctrl-C ends step 2 (trio may wrap it in a group)
            pass
        console.print()
        console.print(Group(_summary(_settled_audit(audit_log), len(tunnel)),
                            Text(), _verdict(direct, tunnel)))
        console.print(f"\n[dim]Look closer: carapace-debug audit --file {audit_log} · "
                      f"logs in {tmp} · make test runs the full suite.[/dim]")


if __name__ == "__main__":
    main()
