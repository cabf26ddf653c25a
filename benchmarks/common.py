"""What every scenario shares: result types, percentiles, the run context."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    Carapace,
    HarnessError,
    SshForward,
    Upstream,
    cpu_seconds,
    server_supports,
)
from .upstreams import Served

PEERS = ("direct", "ssh", "carapace")
PEER_TITLES = {"direct": "direct", "ssh": "ssh -L", "carapace": "Carapace"}
# The tunnel's own processes: what a peer adds besides the client and the upstream.
TUNNEL_PROCESSES = ("agent", "server", "ssh", "sshd")


class ScenarioError(Exception):
    pass


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def downsample(values: list[float], limit: int = 4000) -> list[float]:
    """At most ``limit`` values with the same distribution (sorted, evenly picked)."""
    if len(values) <= limit:
        return [round(v, 4) for v in values]
    ordered = sorted(values)
    step = (len(ordered) - 1) / (limit - 1)
    return [round(ordered[int(i * step)], 4) for i in range(limit)]


@dataclass
class Row:
    """One metric, one value per peer (None: not measured / n/a)."""

    key: str
    label: str
    unit: str
    values: dict[str, float | None]
    compare: str | None = None  # "ratio" (x of direct) or "diff" (+/- direct)
    decimals: int = 2
    na: dict[str, str] = field(default_factory=dict)  # peer -> why n/a

    def value(self, peer: str) -> float | None:
        return self.values.get(peer)

    def versus_direct(self, peer: str) -> float | None:
        v, d = self.values.get(peer), self.values.get("direct")
        if v is None or d is None or self.compare is None:
            return None
        if self.compare == "ratio":
            return v / d if d else None
        return v - d


@dataclass
class ScenarioResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, key: str) -> Row | None:
        for r in self.rows:
            if r.key == key:
                return r
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
            "metrics": {
                r.key: {
                    "label": r.label, "unit": r.unit, "values": r.values,
                    "vs_direct": {p: r.versus_direct(p) for p in PEERS if p != "direct"},
                    "compare": r.compare, "n/a": r.na,
                }
                for r in self.rows
            },
            "samples": {k: {p: downsample(v) for p, v in s.items()}
                        for k, s in self.samples.items()},
            "raw": self.raw,
        }


@dataclass
class Ctx:
    """The run: options, the shared upstream and ssh forward, progress, profiling."""

    quick: bool
    tmp: Path
    upstream: Upstream
    ssh: SshForward | None
    ssh_reason: str | None
    advance: Callable[[str], None] = lambda _desc: None
    profiler: Any = None  # profiling.Profiler or None
    deployments: int = 0
    # Every upstream started for this run (``test`` included) and why others are not.
    upstreams: dict[str, Served] = field(default_factory=dict)
    upstream_skipped: dict[str, str] = field(default_factory=dict)
    _server_flags: dict[str, bool] = field(default_factory=dict)

    # -- peers ---------------------------------------------------------------------
    def upstreams_for(self, names: tuple[str, ...]) -> list[Served]:
        """The running upstreams among ``names`` (a scenario's ``UPSTREAMS``), in order."""
        return [self.upstreams[n] for n in names if n in self.upstreams]

    def peer_ports(self, carapace: Carapace | None,
                   up: Served | None = None) -> dict[str, int]:
        """Name -> local port, in the fixed order direct, ssh, carapace."""
        if up is None:
            out = {"direct": self.upstream.port}
            if self.ssh is not None:
                out["ssh"] = self.ssh.port
        else:
            out = {"direct": up.port}
            if up.ssh_port is not None:
                out["ssh"] = up.ssh_port
        if carapace is not None:
            out["carapace"] = carapace.port
        return out

    def server_flag(self, flag: str) -> bool:
        if flag not in self._server_flags:
            self._server_flags[flag] = server_supports(flag)
        return self._server_flags[flag]

    @contextlib.contextmanager
    def carapace(self, server_args: list[str] | None = None,
                 agent_args: list[str] | None = None,
                 up: Served | None = None) -> Iterator[Carapace]:
        """A fresh server + agent pair (so each scenario's RSS starts clean), its tool
        pointing at ``up`` (default: the test upstream)."""
        self.deployments += 1
        logdir = self.tmp / f"carapace-{self.deployments}"
        logdir.mkdir()
        port = self.upstream.port if up is None else up.port
        c = Carapace(logdir, port, server_args or [], agent_args or [])
        try:
            c.start()
        except HarnessError as exc:
            raise ScenarioError(str(exc)) from None
        try:
            yield c
        finally:
            c.stop()

    # -- the measuring client -----------------------------------------------------------
    def client_spec_peer(self, port: int) -> list[Any]:
        return ["127.0.0.1", port]

    def client(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run ``python -m benchmarks.client`` to completion; its result dict."""
        spec = {**spec, "timeout": timeout}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.client", json.dumps(spec)],
                capture_output=True, text=True, timeout=timeout + 30,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"client ({spec['mode']}) did not finish in time") from None
        return parse_client_output(proc.stdout, proc.stderr)

    def path_pids(self, peer: str, carapace: Carapace | None,
                  up: Served | None = None) -> dict[str, int]:
        """The processes a request to ``peer`` crosses (besides the client)."""
        pids = {"upstream": self.upstream.proc.pid} if up is None else up.pids()
        if peer == "ssh" and self.ssh is not None:
            pids.update(self.ssh.all_pids())
        elif peer == "carapace" and carapace is not None:
            pids.update(carapace.pids())
        return pids

    def measure(self, peer: str, carapace: Carapace | None, spec: dict[str, Any],
                timeout: float, profile: str | None = None,
                up: Served | None = None) -> dict[str, Any]:
        """Run the client against ``peer``; add the CPU each process on the path spent.

        ``cpu`` maps process → CPU seconds during the run (the client's own is its
        measured section only); ``cpu_us_per_unit`` is their sum per request,
        event or byte (the client's ``units``); ``tunnel_us_per_unit`` the same for
        the tunnel's own processes only (agent + server, or ssh + sshd).
        """
        pids = self.path_pids(peer, carapace, up)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if profile and peer == "carapace" and carapace is not None:
            with self.profile(profile, carapace.pids()):
                out = self.client(spec, timeout)
        else:
            out = self.client(spec, timeout)
        cpu = {"client": float(out.get("cpu_s", 0.0))}
        for name, pid in pids.items():
            used = cpu_seconds(pid) - before[name]
            key = name.split(".")[0]  # sshd.N → sshd, upstream.N (nginx workers) → upstream
            cpu[key] = cpu.get(key, 0.0) + max(0.0, used)
        out["cpu"] = cpu
        units = out.get("units")
        if units:
            out["cpu_us_per_unit"] = sum(cpu.values()) / units * 1e6
            tunnel = sum(v for k, v in cpu.items() if k in TUNNEL_PROCESSES)
            out["tunnel_us_per_unit"] = tunnel / units * 1e6
        return out

    def start_client(self, spec: dict[str, Any]) -> subprocess.Popen[str]:
        """An interactive client (idle streams): lines on stdin/stdout."""
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.client", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )

    @contextlib.contextmanager
    def profile(self, label: str, pids: dict[str, int]) -> Iterator[None]:
        if self.profiler is None:
            yield
            return
        with self.profiler.record(label, pids):
            yield


def parse_client_output(stdout: str, stderr: str) -> dict[str, Any]:
    last: dict[str, Any] | None = None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                last = json.loads(line)
            except ValueError:
                continue
    if last is None:
        raise ScenarioError(f"client printed no result: {stderr.strip()[-600:]}")
    if "error" in last:
        raise ScenarioError(f"client: {last['error']}")
    if "result" not in last:
        raise ScenarioError(f"client: unexpected output {last!r:.200}")
    return dict(last["result"])


def timed(fn: Callable[[Ctx], ScenarioResult]) -> Callable[[Ctx], ScenarioResult]:
    def wrapper(ctx: Ctx) -> ScenarioResult:
        start = time.monotonic()
        result = fn(ctx)
        result.seconds = time.monotonic() - start
        return result

    wrapper.__name__ = fn.__name__
    return wrapper
