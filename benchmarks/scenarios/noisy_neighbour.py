"""Noisy neighbour: agent A attacks the server while agent B goes about its work.

Two agent identities (``vm1`` = A, ``vm2`` = B) on one real ``carapace-server``
with the test upstream behind it. B is a real ``carapace-agent`` exposing the
JSON-RPC tool ``signal``; through it, :mod:`benchmarks.neighbour_client` holds
a live SSE stream (50 events/s) and makes one JSON-RPC call every 100 ms.
A is :mod:`benchmarks.attacker`, speaking the wire protocol raw, one attack
at a time for 10 s (1 s with ``--quick``). Each attack, and a first run with
no attack, gets a fresh server and agent B, so one attack's damage (or its
crash) does not spill into the next row.

Per attack: B's event latency p50/p99, B's call p99, what B lost (events
missing from the stream, calls that failed), the server's peak RSS, what A
saw, and whether the targets held: B's event and call p99 < 50 ms, nothing of
B's lost, server RSS < 256 MiB, the server alive, A answered with errors or a
closed link. The machine is protected: past 1 GiB of server RSS the attacker
is killed and the row says "exceeded"; past 1.5 GiB the server is killed too.
Every process started here is stopped (the server's children too) at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..attacker import ATTACKS
from ..common import Ctx, ScenarioError, ScenarioResult, timed
from ..harness import HOST, HarnessError, Proc, children, free_port, proc_status, reset_peak_rss
from ..harness import script as find_script

NAME = "noisy-neighbour"
TITLE = "Noisy neighbour: agent B's service while agent A attacks"

P99_TARGET_MS = 50.0
RSS_TARGET_MIB = 256
RSS_STOP_MIB = 1024
"""Past this the attack is stopped: today's server may not survive some of them."""
RSS_KILL_MIB = 1536
"""Past this the server itself is killed, to keep a shared machine alive."""
RATE_LIMIT = (300, 10)
"""The ``signal`` tool's shared rate_limit: 30 calls/s, three times what B makes."""
SETTLE = 1.0
"""Seconds the server's RSS is still watched (and capped) after the attacker ends."""
SSE_INTERVAL_MS = 20
IDLE_CONNS = (200, 500)  # quick, full: attack 3's unauthenticated connections
ROOT = Path(__file__).resolve().parent.parent.parent

ANSWERED = {"batch16", "argv16", "hello16", "emoji", "ratelimit", "newline"}
"""Attacks whose every request deserves an error or a closed link within the attack;
the ping flood and the unread stdin may as well meet backpressure."""

COLUMNS = ["attack", "B event p50", "B event p99", "B RPC p99", "B lost", "server peak RSS",
           "attacker outcome", "target met?"]


def seconds(ctx: Ctx) -> float:
    return 1.0 if ctx.quick else 10.0  # quick: the shape only, within --quick's 2 minutes


def steps(ctx: Ctx) -> int:
    return 1 + len(ATTACKS)


@dataclass
class Pair:
    """A server that knows vm1 (A) and vm2 (B), and agent B exposing ``signal``."""

    dir: Path
    upstream_port: int
    token_a: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_b: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    server_port: int = 0
    b_port: int = 0
    server: Proc | None = None
    agent: Proc | None = None

    def start(self) -> Pair:
        d = self.dir
        for name, text in (("tokens", f"vm1:{self.token_a}\nvm2:{self.token_b}\n"),
                           ("b.token", f"vm2:{self.token_b}\n")):
            (d / name).write_text(text)
            (d / name).chmod(0o600)
        max_requests, window = RATE_LIMIT
        (d / "policy.yaml").write_text(textwrap.dedent(f"""\
            agents:
              vm1: {{tools: [signal, echo, sleep]}}
              vm2: {{tools: [signal]}}
            tools:
              signal:
                type: http
                upstream: "http://{HOST}:{self.upstream_port}"
                jsonrpc_allow_methods: [version, send, listAccounts]
                rate_limit: {{max_requests: {max_requests}, window_secs: {window}}}
                timeout_secs: 60
              echo:
                type: cli
                binary: {shutil.which("echo") or "/bin/echo"}
                argv_allow_patterns: ["hello *"]
              sleep:
                type: cli
                binary: {shutil.which("sleep") or "/bin/sleep"}
                argv_allow_patterns: ["50"]
                timeout_secs: 120
            """))
        self.server_port, self.b_port = free_port(), free_port()
        try:
            self.server = Proc("server", [
                find_script("carapace-server"), "--listen", f"{HOST}:{self.server_port}",
                "--policy", str(d / "policy.yaml"), "--token-file", str(d / "tokens"),
                "--audit-log", str(d / "audit.jsonl")], d)
            self.server.wait_port(self.server_port)
            self.agent = Proc("agent-b", [
                find_script("carapace-agent"), "--server", f"{HOST}:{self.server_port}",
                "--token-file", str(d / "b.token"), "--expose", f"signal={HOST}:{self.b_port}"],
                d)
            self.agent.wait_port(self.b_port)
            self._wait_tunnel()
        except HarnessError as exc:
            self.stop()
            raise ScenarioError(str(exc)) from None
        return self

    def _wait_tunnel(self) -> None:
        deadline = time.monotonic() + 20
        last = ""
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://{HOST}:{self.b_port}/api/v1/check", timeout=3)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise HarnessError(f"agent B's tunnel did not come up: {last}")

    def stop(self) -> None:
        """Stop agent B and the server, then anything the server left running (sleeps)."""
        left: list[tuple[int, bytes]] = []
        if self.server is not None and self.server.alive():
            left = [(pid, _cmdline(pid)) for pid in children(self.server.pid)]
        for proc in (self.agent, self.server):
            if proc is not None:
                proc.stop(grace=3.0)
        for pid, cmdline in left:
            if cmdline and _cmdline(pid) == cmdline:  # still that process, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@dataclass
class Watch:
    """The server's RSS, sampled while an attack runs, and what the guard did."""

    peak_kib: int = 0
    exceeded: bool = False
    server_killed: bool = False


def _guard(pair: Pair, attacker: subprocess.Popen[str] | None, until: float) -> Watch:
    """Sample the server's RSS until ``until`` or ``SETTLE`` after the attacker
    exits; stop the attacker past ``RSS_STOP_MIB``, the server past ``RSS_KILL_MIB``."""
    assert pair.server is not None
    w = Watch()
    pid = pair.server.pid
    settle: float | None = None
    while time.monotonic() < until:
        if settle is None and attacker is not None and attacker.poll() is not None:
            settle = time.monotonic() + SETTLE  # the server may still be digesting
            until = min(until, settle)
        if not pair.server.alive():
            break
        rss = proc_status(pid).get("VmRSS", 0)
        w.peak_kib = max(w.peak_kib, rss)
        if rss > RSS_STOP_MIB * 1024 and attacker is not None and attacker.poll() is None:
            attacker.kill()
            w.exceeded = True
        if rss > RSS_KILL_MIB * 1024:
            pair.server.popen.kill()
            w.server_killed = True
            break
        time.sleep(0.02)
    status = proc_status(pid)
    w.peak_kib = max(w.peak_kib, status.get("VmHWM", 0), status.get("VmRSS", 0))
    return w


def _ask(proc: subprocess.Popen[str], want: str, timeout: float) -> dict[str, Any]:
    """The next JSON line of ``proc`` that carries ``want`` (``phase`` or ``result``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "error" in msg:
                raise ScenarioError(f"client: {msg['error']}")
            if want == "result" and "result" in msg:
                return dict(msg["result"])
            if msg.get("phase") == want:
                return dict(msg)
    err = proc.stderr.read()[-400:] if proc.stderr and proc.poll() is not None else ""
    raise ScenarioError(f"no {want!r} line within {timeout:.0f} s {err}".strip())


def _spawn(module: str, spec: dict[str, Any], interactive: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, json.dumps(spec)], cwd=str(ROOT), text=True,
        stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _end(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(10)


def run_case(ctx: Ctx, attack: str | None, n: int) -> dict[str, Any]:
    """One row: a fresh pair, B measured while ``attack`` (None: nothing) runs."""
    d = ctx.tmp / f"noisy-{n}-{attack or 'none'}"
    d.mkdir()
    pair = Pair(d, ctx.upstream.port)
    b = attacker = None
    try:
        pair.start()
        assert pair.server is not None
        b = _spawn("benchmarks.neighbour_client",
                   {"port": pair.b_port, "sse_interval_ms": SSE_INTERVAL_MS}, True)
        _ask(b, "ready", 30)
        time.sleep(0.5)  # a few undisturbed calls and events before the attack
        reset_peak_rss(pair.server.pid)
        length = seconds(ctx)
        if attack is not None:
            attacker = _spawn("benchmarks.attacker", {
                "port": pair.server_port, "agent": "vm1", "token": pair.token_a,
                "attack": attack, "seconds": length,
                "idle_conns": IDLE_CONNS[0 if ctx.quick else 1],
                "tools": {"rpc": "signal", "cli": "echo", "sleep": "sleep"}}, False)
            _ask(attacker, "attacking", 30)
        assert b.stdin is not None
        b.stdin.write("go\n")
        b.stdin.flush()
        watch = _guard(pair, attacker, time.monotonic() + length + (15 if attacker else 0))
        b.stdin.write("stop\n")
        b.stdin.flush()
        seen = _ask(b, "result", 30)
        outcome = _attacker_outcome(attacker, watch)
        alive = pair.server.alive()
        code = pair.server.popen.returncode
    finally:
        _end(attacker)
        _end(b)
        pair.stop()
    return {"attack": attack, "b": seen, "peak_rss_mib": watch.peak_kib / 1024,
            "exceeded": watch.exceeded, "server_killed": watch.server_killed,
            "server_alive": alive, "server_exit": code, "attacker": outcome}


def _attacker_outcome(attacker: subprocess.Popen[str] | None, watch: Watch) -> dict[str, Any]:
    if attacker is None:
        return {"summary": "–"}
    if watch.exceeded:
        return {"summary": f"stopped: server RSS exceeded {RSS_STOP_MIB} MiB", "stopped": True}
    try:
        attacker.wait(timeout=20)  # its output is two short lines: the pipes cannot fill
    except subprocess.TimeoutExpired:
        attacker.kill()
        return {"summary": "did not stop by itself (killed)", "stopped": True}
    assert attacker.stdout is not None and attacker.stderr is not None
    out, err = attacker.stdout.read(), attacker.stderr.read()
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line)["result"])
    return {"summary": f"attacker failed: {err.strip()[-200:]}", "stopped": True}


def verdict(row: dict[str, Any]) -> list[str]:
    """What missed its target in this row (empty: all met)."""
    b, missed = row["b"], []
    for key, label in (("event_p99_ms", "event p99"), ("rpc_p99_ms", "RPC p99")):
        if b[key] is None or b[key] >= P99_TARGET_MS:
            missed.append(label)
    if b["events_lost"] or b["rpcs_failed"] or b["stream_error"]:
        missed.append("B lost")
    if row["exceeded"] or row["peak_rss_mib"] >= RSS_TARGET_MIB:
        missed.append("RSS")
    if not row["server_alive"] or row["server_killed"]:
        missed.append("server died")
    a = row["attacker"]
    if row["attack"] in ANSWERED and not a.get("stopped") and not a.get("answers") \
            and not a.get("ends"):
        missed.append("A unanswered")
    return missed


def _ms(v: float | None, lower_bound: bool = False) -> str:
    if v is None:
        return "–"
    return ("≥ " if lower_bound else "") + (f"{v:.1f} ms" if v < 1000 else f"{v / 1000:.1f} s")


def table_row(row: dict[str, Any]) -> list[str]:
    b = row["b"]
    lost = f"{b['events_lost']} ev, {b['rpcs_failed']} rpc"
    if b["stream_error"]:
        lost += f" ({b['stream_error']})"
    rss = f"{row['peak_rss_mib']:.0f} MiB"
    if row["exceeded"]:
        rss = f"exceeded ({rss})"
    if row["server_killed"]:
        rss += ", server killed"
    elif not row["server_alive"]:
        rss += f", server DIED ({row['server_exit']})"
    missed = verdict(row)
    name = ATTACKS[row["attack"]][0] if row["attack"] else "none (B alone)"
    return [name, _ms(b["event_p50_ms"], b["event_p50_lower_bound"]),
            _ms(b["event_p99_ms"], b["event_p99_lower_bound"]),
            _ms(b["rpc_p99_ms"], b["rpc_p99_lower_bound"]), lost,
            rss, row["attacker"]["summary"],
            "yes" if not missed else "no: " + ", ".join(missed)]


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    rows: list[dict[str, Any]] = []
    for n, attack in enumerate([None, *ATTACKS]):
        label = attack or "no attack"
        ctx.advance(f"{NAME}: {label}")
        try:
            rows.append(run_case(ctx, attack, n))
        except ScenarioError as exc:
            res.notes.append(f"{label}: {exc}")
    if not rows:
        raise ScenarioError("no case ran: " + "; ".join(res.notes))
    res.raw = {"cases": rows, "seconds_per_attack": seconds(ctx),
               "table": {"title": TITLE, "columns": COLUMNS,
                         "rows": [table_row(r) for r in rows]},
               "met": sum(1 for r in rows if r["attack"] and not verdict(r)),
               "attacks": sum(1 for r in rows if r["attack"])}
    res.notes.append(
        f"each attack {seconds(ctx):g} s; B: 1 SSE stream at {1000 // SSE_INTERVAL_MS} "
        f"events/s + 1 JSON-RPC call per 100 ms through a real agent; targets: B p99 "
        f"< {P99_TARGET_MS:g} ms, nothing lost, server RSS < {RSS_TARGET_MIB} MiB, no crash, "
        f"A answered; attacks stopped past {RSS_STOP_MIB} MiB of server RSS")
    return res
