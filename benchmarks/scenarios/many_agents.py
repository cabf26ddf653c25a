"""Many agents on one server: 500 sessions (100 with ``--quick``), each streaming and calling.

One real ``carapace-server`` with the test upstream behind it as tool
``bench`` (the event streams) and nginx, where installed, as tool ``rpc``
(the calls; else the test upstream serves them too), and N agent
identities (a generated ``NAME:TOKEN`` file). Three of them are real
``carapace-agent`` processes; the rest are raw agent sessions held by one
load-generator process (:mod:`benchmarks.swarm`), which speaks the wire
protocol as a compliant agent does (pongs, acks, credit, backoff).
``--max-agents`` is raised to N; every other cap keeps its default. Each raw
agent dials from a loopback address of its own (127.1.x.y), as each VM of a
real deployment has its own, so the per-address cap on unauthenticated
connections sees one agent per address (the total cap still applies).

Phases, each bounded in time:

1. *idle*: every agent connected, no request. The server's RSS per idle agent
   is (RSS now − RSS with only the 3 real agents) / the raw agents; its CPU per
   idle agent is the CPU it spent over the idle window / window / N.
2. *active*: each agent holds one SSE stream (``/sse-forever``, 10 events/s)
   and makes one JSON-RPC call per second. Measured: event latency
   (arrival at the load generator's socket, by the kernel's receive
   timestamp, − the upstream's ``ts``; and apart, to when the generator read
   it) p50/p99 across all agents, the worst
   agent's own p99, call round trips, the server's RSS and CPU per agent.
3. *reconnect storm*: the server gets SIGTERM, is started again on the same
   port, and the clock runs until every agent has a new session whose SSE
   stream delivered an event. What the dialers met on the way (refused
   connections while the server was down, connections closed by an
   unauthenticated-connection cap, ``--max-agents`` rejects) says which cap
   bounded it.

Every process started here is stopped at the end (the load generator, the
real agents, the server).
"""

from __future__ import annotations

import json
import secrets
import selectors
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from ..common import Ctx, ScenarioError, ScenarioResult, timed
from ..harness import HOST, HarnessError, Proc, cpu_seconds, free_port, port_open, rss_kib
from ..harness import script as find_script

NAME = "many-agents"
UPSTREAMS = ("test", "nginx")
"""The test upstream serves the event streams; nginx, where it runs, the calls."""
TITLE = "Many agents on one server"
ROOT = Path(__file__).resolve().parent.parent.parent

SAMPLES = 3
"""Real carapace-agent processes among the agents, measured the same way."""
SSE_INTERVAL = 0.1
SSE_PATH = f"/sse-forever?interval_ms={SSE_INTERVAL * 1000:g}&size=200"
RPC_EVERY = 1.0
TARGET_RSS_KIB = 200.0
TARGET_P99_MS = 10.0
TARGET_BACK_S = 10.0
QUIET_BUSY_PCT = 95.0
"""A second in which the whole machine was less busy than this had CPU to spare: no
process waited for a core, so its latencies are the tunnel's and not the neighbours'."""


def agents(ctx: Ctx) -> int:
    return 100 if ctx.quick else 500


def phases(ctx: Ctx) -> dict[str, float]:
    """Seconds: idle window, warm-up, active window, storm deadline."""
    if ctx.quick:
        return {"idle": 4.0, "warm": 2.0, "active": 6.0, "storm": 30.0}
    return {"idle": 16.0, "warm": 5.0, "active": 30.0, "storm": 60.0}


def steps(ctx: Ctx) -> int:
    return 4


class Deployment:
    """The server (restartable on its port), the sample agents, the load generator."""

    def __init__(self, ctx: Ctx, n: int) -> None:
        self.dir = ctx.tmp / "many-agents"
        self.dir.mkdir()
        self.n = n
        self.names = [f"vm{i:04d}" for i in range(n)]
        self.tokens = {name: secrets.token_urlsafe(32) for name in self.names}
        self.upstream_port = ctx.upstream.port
        self.upstream_pid = ctx.upstream.proc.pid
        nginx = ctx.upstreams.get("nginx")
        # The calls go to nginx where it runs: the test upstream is one Python process,
        # and 500 calls/s on top of 5,000 events/s made it the bound of every call
        # (a new connection to it took up to 6 s); nginx answers as a real service does.
        self.rpc_port = nginx.port if nginx is not None else self.upstream_port
        self.rpc_pids = list(nginx.pids().values()) if nginx is not None else []
        self.rpc_tool = "rpc" if nginx is not None else "bench"
        self.rpc_ports: list[int] = []
        self.port = free_port()
        self.server: Proc | None = None
        self.restarts = 0
        self.agents: list[Proc] = []
        self.sample_ports: list[int] = []
        self.swarm: subprocess.Popen[str] | None = None

    def write_files(self) -> None:
        tokens = self.dir / "tokens"
        tokens.write_text("".join(f"{k}:{v}\n" for k, v in self.tokens.items()))
        tokens.chmod(0o600)
        (self.dir / "policy.yaml").write_text(textwrap.dedent(f"""\
            tools:
              bench:
                type: http
                upstream: "http://{HOST}:{self.upstream_port}"
                timeout_secs: 60
              rpc:
                type: http
                upstream: "http://{HOST}:{self.rpc_port}"
                timeout_secs: 60
            """))

    def start_server(self) -> float:
        """Start the server on ``self.port``; the monotonic time its port opened."""
        self.restarts += 1
        self.server = Proc(f"server-{self.restarts}", [
            find_script("carapace-server"), "--listen", f"{HOST}:{self.port}",
            "--policy", str(self.dir / "policy.yaml"),
            "--token-file", str(self.dir / "tokens"),
            "--max-agents", str(self.n)], self.dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.server.alive():
                raise ScenarioError(f"the server exited: {self.server.tail(400)}")
            if port_open(self.port):
                return time.monotonic()
            time.sleep(0.01)
        raise ScenarioError("the server's port did not open within 30 s")

    def start_samples(self) -> None:
        for i, name in enumerate(self.names[:SAMPLES]):
            tf = self.dir / f"{name}.token"
            tf.write_text(f"{name}:{self.tokens[name]}\n")
            tf.chmod(0o600)
            port, rpc_port = free_port(), free_port()
            proc = Proc(f"agent-{name}", [
                find_script("carapace-agent"), "--server", f"{HOST}:{self.port}",
                "--token-file", str(tf), "--expose", f"bench={HOST}:{port}",
                "--expose", f"rpc={HOST}:{rpc_port}"], self.dir)
            self.agents.append(proc)
            self.sample_ports.append(port)
            self.rpc_ports.append(rpc_port)
            try:
                proc.wait_port(port)
                proc.wait_port(rpc_port)
            except HarnessError as exc:
                raise ScenarioError(f"sample agent {i}: {exc}") from None

    def start_swarm(self, timeout: float) -> None:
        spec = {"port": self.port, "tool": "bench", "sse_path": SSE_PATH,
                "rpc_every": RPC_EVERY, "stream_phase": SSE_INTERVAL, "timeout": timeout,
                "own_addresses": True,
                "samples": self.sample_ports, "direct": self.upstream_port,
                "rpc_tool": self.rpc_tool,
                "rpc_samples": self.rpc_ports if self.rpc_tool == "rpc" else self.sample_ports,
                "rpc_direct": self.rpc_port,
                "agents": [[n, self.tokens[n]] for n in self.names[SAMPLES:]]}
        self.swarm = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.swarm", json.dumps(spec)], cwd=str(ROOT),
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.dir / "swarm.log", "w"))

    def tell(self, cmd: str) -> None:
        assert self.swarm is not None and self.swarm.stdin is not None
        self.swarm.stdin.write(cmd + "\n")
        self.swarm.stdin.flush()

    def ask(self, want: str, timeout: float) -> dict[str, Any]:
        """The swarm's next line carrying ``want`` (a phase, or ``result``)."""
        proc = self.swarm
        assert proc is not None and proc.stdout is not None
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
                msg = json.loads(line) if line.startswith("{") else {}
                if "error" in msg:
                    raise ScenarioError(f"load generator: {msg['error']}")
                if (want == "result" and "result" in msg) or msg.get("phase") == want:
                    return dict(msg.get("result", msg))
        raise ScenarioError(f"the load generator did not reach {want!r} in {timeout:.0f} s")

    def stop(self) -> None:
        if self.swarm is not None and self.swarm.poll() is None:
            self.swarm.kill()
        if self.swarm is not None:
            self.swarm.wait(10)
        for proc in self.agents:
            proc.stop(grace=3.0)
        if self.server is not None:
            self.server.stop(grace=5.0)


def machine_cpu() -> tuple[float, float]:
    """Jiffies the whole machine has spent busy and in all, so far (``/proc/stat``)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _window(ctx: Ctx, dep: Deployment, seconds: float, label: str) -> dict[str, Any]:
    """The server's CPU seconds and RSS over a window of ``seconds``, the CPU share of the
    load generator and the upstream, and how busy the whole machine was (other work on a
    shared machine takes cores from all three: then no one of them reads 100%)."""
    assert dep.server is not None and dep.swarm is not None
    pid = dep.server.pid
    others = {"swarm": dep.swarm.pid, "upstream": dep.upstream_pid,
              **{f"rpc_upstream.{i}": pid for i, pid in enumerate(dep.rpc_pids)}}
    before = {k: cpu_seconds(p) for k, p in others.items()}
    busy0, all0 = machine_cpu()
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    per_second: list[list[float]] = []
    with ctx.profile(f"many-agents {label}", {"server": pid, **others}):
        last = [cpu0, *before.values(), *machine_cpu()]
        while (left := t0 + seconds - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            now = [cpu_seconds(pid), *(cpu_seconds(p) for p in others.values()),
                   *machine_cpu()]
            jiffies = max(1.0, now[-1] - last[-1])
            per_second.append([round((a - b) * 100, 1) for a, b in zip(now[:3], last[:3],
                                                                      strict=True)]
                              + [round((now[-2] - last[-2]) / jiffies * 100, 1)])
            last = now
    took = time.monotonic() - t0
    out: dict[str, Any] = {"cpu_s": cpu_seconds(pid) - cpu0, "seconds": took,
                           "rss_kib": rss_kib(pid)}
    for k, p in others.items():
        out[f"{k}_cpu_pct"] = (cpu_seconds(p) - before[k]) / took * 100
    busy1, all1 = machine_cpu()
    out["machine_busy_pct"] = (busy1 - busy0) / max(1.0, all1 - all0) * 100
    out["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    # Each second: server, load generator, upstream (% of a core), machine (% busy).
    out["per_second"] = per_second
    return out


def measure(ctx: Ctx, dep: Deployment) -> dict[str, Any]:
    p = phases(ctx)
    n = dep.n
    raw_n = n - SAMPLES
    out: dict[str, Any] = {"agents": n, "raw_agents": raw_n, "samples": SAMPLES, "phases": p}
    dep.write_files()
    dep.start_server()
    dep.start_samples()
    time.sleep(1.0)
    assert dep.server is not None
    out["rss_base_kib"] = rss_kib(dep.server.pid)
    ctx.advance(f"{NAME}: connecting {raw_n} raw agents")
    dep.start_swarm(timeout=sum(p.values()) + 240)
    out["connect"] = dep.ask("connected", 120)
    time.sleep(1.0)
    out["idle"] = _window(ctx, dep, p["idle"], "idle")
    ctx.advance(f"{NAME}: {n} agents streaming and calling")
    dep.tell("go")
    out["flowing"] = dep.ask("flowing", 60)
    time.sleep(p["warm"])
    dep.tell("measure")
    dep.ask("measuring", 10)
    out["active"] = _window(ctx, dep, p["active"], "active")
    ctx.advance(f"{NAME}: reconnect storm")
    quiet = [i for i, sec in enumerate(out["active"]["per_second"]) if sec[3] < QUIET_BUSY_PCT]
    dep.tell("quiet " + " ".join(map(str, quiet)))
    dep.tell("mark")
    mark = float(dep.ask("marked", 10)["at"])
    dep.server.stop(grace=10.0)
    out["server_exit"] = dep.server.popen.returncode
    down = time.monotonic()
    up = dep.start_server()
    out["storm_server_down_s"] = down - mark
    out["storm_server_up_s"] = up - mark
    assert dep.server is not None and dep.swarm is not None
    try:
        with ctx.profile("many-agents storm", {"server": dep.server.pid,
                                               "swarm": dep.swarm.pid}):
            out["back"] = dep.ask("back", p["storm"])
    except ScenarioError as exc:
        out["back"] = {"error": str(exc)}
    dep.tell("stop")
    out["swarm"] = dep.ask("result", 60)
    out["caps_hit"] = _caps_hit(dep)
    return out


CAP_FLAGS = ("--max-unauthenticated-per-address", "--max-unauthenticated ", "--max-agents",
             "--max-upstream-connections", "--max-sse-streams", "--max-requests-per-agent")


def _caps_hit(dep: Deployment) -> dict[str, dict[str, int]]:
    """Per server run (before / after the restart): log lines naming each cap it hit.
    The unauthenticated caps log at most one line per 10 s, so a count of 1 may mean many."""
    out: dict[str, dict[str, int]] = {}
    for run, label in ((1, "first server"), (2, "restarted server")):
        try:
            text = (dep.dir / f"server-{run}.log").read_text(errors="replace")
        except OSError:
            continue
        counts = {flag.strip(): sum(1 for line in text.splitlines() if flag in line + " ")
                  for flag in CAP_FLAGS}
        out[label] = {k: v for k, v in counts.items() if v}
    return out


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} ms"


def evaluate(out: dict[str, Any]) -> dict[str, Any]:
    """The numbers, and each target met or not."""
    sw = out["swarm"]
    raw_n = out["raw_agents"]
    idle_rss = (out["idle"]["rss_kib"] - out["rss_base_kib"]) / raw_n
    active_rss = (out["active"]["rss_kib"] - out["rss_base_kib"]) / raw_n
    idle_cpu = out["idle"]["cpu_s"] / out["idle"]["seconds"] / out["agents"]
    active_cpu = out["active"]["cpu_s"] / out["active"]["seconds"] / out["agents"]
    back = out["back"].get("seconds") if "error" not in out["back"] else None
    ev = sw["events"]
    return {
        "rss_idle_kib_per_agent": idle_rss, "rss_active_kib_per_agent": active_rss,
        "cpu_idle_pct_per_agent": idle_cpu * 100, "cpu_active_pct_per_agent": active_cpu * 100,
        "event_p50_ms": ev["p50"], "event_p99_ms": ev["p99"], "back_s": back,
        "met": {"rss": idle_rss <= TARGET_RSS_KIB,
                "p99": ev["p99"] is not None and ev["p99"] <= TARGET_P99_MS
                and not sw["stream_errors"],
                "back": back is not None and back <= TARGET_BACK_S},
    }


def table(out: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    sw = out["swarm"]
    n = out["agents"]
    met = ev["met"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    rpc_cpu = sum((v for k, v in out["active"].items() if k.startswith("rpc_upstream.")),
                  start=0.0) if any(k.startswith("rpc_upstream.") for k in out["active"]) \
        else None
    storm = sw["connect_failures_storm"]
    bound = "; ".join(f"{k} ×{v}" for k, v in storm.items()) or "no failed dial"
    back = ev["back_s"]
    rows = [
        ["server RSS per idle agent", f"{ev['rss_idle_kib_per_agent']:.1f} KiB",
         f"≤ {TARGET_RSS_KIB:g} KiB", yes(met["rss"])],
        ["server RSS per streaming agent", f"{ev['rss_active_kib_per_agent']:.1f} KiB",
         "–", "–"],
        ["server CPU per idle agent", f"{ev['cpu_idle_pct_per_agent']:.3f} % of a core",
         "–", "–"],
        ["server CPU per streaming agent", f"{ev['cpu_active_pct_per_agent']:.3f} % of a core",
         "–", "–"],
        ["server CPU per event delivered (with its share of the calls: 1 per 10 events)",
         f"{out['active']['cpu_s'] / max(1, sw['events']['n']) * 1e6:.0f} µs", "–", "–"],
        [f"seconds of the {len(out['active']['per_second'])} s window the whole machine was "
         f"saturated (≥ {QUIET_BUSY_PCT:g} % busy)",
         str(sum(1 for sec in out["active"]["per_second"] if sec[3] >= QUIET_BUSY_PCT)),
         "–", "–"],
        ["meanwhile: server / load generator / upstream CPU",
         f"{out['active']['cpu_s'] / out['active']['seconds'] * 100:.0f} % / "
         f"{out['active']['swarm_cpu_pct']:.0f} % / {out['active']['upstream_cpu_pct']:.0f} %"
         + (f" (+ nginx for the calls {rpc_cpu:.0f} %)" if rpc_cpu is not None else "") +
         f" of a core; whole machine {out['active']['machine_busy_pct']:.0f} % busy "
         f"(load {out['active']['loadavg_1m']:.1f})", "–", "–"],
        [f"event latency p50 / p99, all {n} agents",
         f"{_ms(ev['event_p50_ms'])} / {_ms(ev['event_p99_ms'])} "
         f"({sw['events']['n']:,} events)", f"p99 ≤ {TARGET_P99_MS:g} ms", yes(met["p99"])],
        ["the same events when the load generator read them (its own delays added)",
         f"{_ms(sw['events_read']['p50'])} / {_ms(sw['events_read']['p99'])}", "–", "–"],
        [f"event p50 / p99 in the {sw['quiet_seconds']} of "
         f"{len(out['active']['per_second'])} s with CPU to spare "
         f"(machine < {QUIET_BUSY_PCT:g} % busy); direct stream meanwhile",
         f"{_ms(sw['events_quiet']['p50'])} / {_ms(sw['events_quiet']['p99'])}; direct "
         f"{_ms(sw['events_direct_quiet']['p50'])} / {_ms(sw['events_direct_quiet']['p99'])}",
         "–", "–"],
        ["event p99, raw agents / real agents",
         f"{_ms(sw['events_raw']['p99'])} / {_ms(sw['events_sample']['p99'])}", "–", "–"],
        ["worst agent's own event p99", _ms(sw["per_agent_p99"]["max"]), "–", "–"],
        ["reference meanwhile: 1 stream / calls straight to the upstream, p50 / p99",
         f"events {_ms(sw['events_direct']['p50'])} / {_ms(sw['events_direct']['p99'])}; "
         f"calls {_ms(sw['rpc_direct']['p50'])} / {_ms(sw['rpc_direct']['p99'])}", "–", "–"],
        ["JSON-RPC p50 / p99 (raw; real agents)",
         f"{_ms(sw['rpc_raw']['p50'])} / {_ms(sw['rpc_raw']['p99'])}; "
         f"{_ms(sw['rpc_sample']['p50'])} / {_ms(sw['rpc_sample']['p99'])}; "
         f"{sw['rpc_failed']} failed", "–", "–"],
        ["all agents back after a restart (from SIGTERM)",
         "not all: " + out["back"].get("error", "") if back is None else
         f"{back:.1f} s ({sw['back']} of {sw['agents']}; new server listening after "
         f"{out['storm_server_up_s']:.1f} s; median agent {sw['back_seconds']['p50']:.1f} s)",
         f"≤ {TARGET_BACK_S:g} s", yes(met["back"])],
        ["what the dialers met in the storm", bound, "–", "–"],
        ["storm: dial to welcome (the accept loop and the handshake), p50 / p99 / max",
         f"{_ms(sw['storm_handshake_ms']['p50'])} / {_ms(sw['storm_handshake_ms']['p99'])} / "
         f"{_ms(sw['storm_handshake_ms']['max'])}", "–", "–"],
    ]
    return {"title": f"{TITLE}: {n} agents ({SAMPLES} real carapace-agent processes), "
                     "each 1 SSE stream at 10 ev/s + 1 JSON-RPC call/s",
            "columns": ["metric", "measured", "target", "target met?"], "rows": rows}


@timed
def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    n = agents(ctx)
    dep = Deployment(ctx, n)
    ctx.advance(f"{NAME}: starting the server and {SAMPLES} real agents")
    try:
        out = measure(ctx, dep)
    finally:
        dep.stop()
    ev = evaluate(out)
    res.raw = {**out, "evaluation": ev, "table": table(out, ev)}
    sw = out["swarm"]
    res.notes.append(
        f"{n} agents: {SAMPLES} real carapace-agent processes + {n - SAMPLES} raw sessions in "
        "one load-generator process; --max-agents raised to N, every other cap at its default; "
        "latency = arrival at the load generator's socket (the kernel's receive timestamp) − "
        "the upstream's ts: the upstream's and the tunnel's delays, not the generator's own "
        "(shown apart); on a shared 2-core machine the neighbours' load is in it (the "
        "per-second machine load is in the JSON)")
    if sw["stream_errors"]:
        res.notes.append(f"streams that ended while measured: {sw['stream_errors']}")
    if sw["rpc_errors"]:
        res.notes.append(f"calls that failed while measured: {sw['rpc_errors']}")
    for label, caps in out["caps_hit"].items():
        if caps:
            res.notes.append(f"the {label} logged caps it hit (lines): " + ", ".join(
                f"{k} ×{v}" for k, v in caps.items()))
    if sw["not_back"]:
        res.notes.append(f"not back within {phases(ctx)['storm']:g} s: {sw['not_back']}")
    return res
