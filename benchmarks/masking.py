"""What secret masking costs on the streaming paths, measured through real processes.

    python -m benchmarks.masking [--quick] [--secrets N] [--json FILE]

One test upstream and two Carapace pairs (server + agent) run side by side;
they differ only in their policy: the *masked* pair's policy injects secrets
(``--secrets N``, default 1: an ``Authorization`` header on the HTTP tool,
then tokens in the CLI tool's environment; the server scrubs every byte it
sends back of every one of them), the *plain* pair's injects none. Rounds
alternate between the pairs, each measurement is the median of its rounds,
and the ratio masked / plain is printed:

- SSE throughput: one stream of ``/sse-flood`` (≈300-byte events) read by a
  raw socket client that counts events (no parsing on the client side);
- SSE latency: ``/sse`` events 5 ms apart, each carrying the upstream's send
  time, received by the same kind of client (p50 / p99 of receive − send);
- CLI stdout throughput: ``cat`` of a 32 MiB text file through the shim,
  twice: JSON lines with random tokens in them (the costly case: every chunk
  has an anchor byte, so it is sampled) and plain log lines (the usual case);
- CLI latency: ``echo x`` round trips through the shim (p50).

Also in process: the scrubber alone, bytes/s over 64 KiB chunks and µs per
SSE event, to show where the cost is. ``run()`` returns everything as a dict
(the ``masking`` slot of ``benchmarks/run.py`` may call it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SSE_EVENTS = 40_000
CLI_BYTES = 32 * 1024 * 1024
LATENCY_EVENTS = 100


class BenchError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} is not installed (pip install -e . first)")
    return found


def _wait_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.03)
    raise BenchError(f"port {port} did not open within {timeout} s")


class _Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class _Pair:
    """A server + agent whose policy has (masked) or has not (plain) injected secrets."""

    def __init__(self, procs: _Procs, tmp: Path, name: str, upstream_port: int,
                 secret_count: int) -> None:
        d = tmp / name
        d.mkdir()
        token = secrets.token_urlsafe(32)
        (d / "token").write_text(f"default:{token}\n")
        (d / "token").chmod(0o600)
        # The secrets: an Authorization header on the HTTP tool, then tokens in the CLI
        # tool's environment. Masking is policy-wide: every secret is masked on both paths.
        http_extra = cli_extra = ""
        if secret_count:
            http_extra = (f'    headers_inject:\n'
                          f'      Authorization: "Bearer {secrets.token_urlsafe(30)}"\n')
        if secret_count > 1:
            cli_extra = '    env_inject:\n' + "".join(
                f'      BENCH_TOKEN_{i}: "{secrets.token_urlsafe(30)}"\n'
                for i in range(secret_count - 1))
        (d / "policy.yaml").write_text(
            "tools:\n"
            "  bench:\n"
            "    type: http\n"
            f'    upstream: "http://{HOST}:{upstream_port}"\n'
            "    timeout_secs: 120\n"
            + http_extra
            + "  echo:\n"
            "    type: cli\n"
            "    binary: /bin/echo\n"
            '    argv_allow_patterns: ["*"]\n'
            "  cat:\n"
            "    type: cli\n"
            "    binary: /bin/cat\n"
            '    argv_allow_patterns: ["*"]\n'
            "    timeout_secs: 120\n"
            + cli_extra)
        server_port = _free_port()
        self.port = _free_port()
        self.socket = d / "agent.sock"
        self.server, log = procs.start(f"{name}-server", [
            _script("carapace-server"), "--listen", f"{HOST}:{server_port}",
            "--policy", str(d / "policy.yaml"), "--token-file", str(d / "token")])
        _wait_port(self.server, server_port, log)
        self.agent, log = procs.start(f"{name}-agent", [
            _script("carapace-agent"), "--server", f"{HOST}:{server_port}",
            "--token-file", str(d / "token"), "--expose", f"bench={HOST}:{self.port}",
            "--cli-socket", str(self.socket)])
        _wait_port(self.agent, self.port, log)
        self.bin = d / "bin"
        subprocess.run([_script("carapace-agent"), "shims", "install", "--dir", str(self.bin),
                        "cat", "echo"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while self._shim("echo", "ready").returncode != 0:
            if time.monotonic() > deadline:
                raise BenchError(f"the {name} tunnel did not come up")
            time.sleep(0.05)

    def _shim(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(self.bin / tool), *args], capture_output=True, timeout=120,
                              env={**os.environ, "CARAPACE_AGENT_SOCKET": str(self.socket)})


# ----------------------------------------------------------------------------- clients


def _get(port: int, target: str) -> socket.socket:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
                 "Connection: close\r\n\r\n".encode())
    return sock


def sse_throughput(port: int, count: int) -> float:
    """Events/s of one ``/sse-flood`` stream, counting blank lines as they arrive."""
    sock = _get(port, f"/sse-flood?count={count}&size=300&batch=32")
    seen = 0
    tail = b""
    start = time.perf_counter()
    with sock:
        while seen < count:
            chunk = sock.recv(1 << 18)
            if not chunk:
                raise BenchError(f"the stream ended after {seen} of {count} events")
            both = tail + chunk
            seen += both.count(b"\n\n")
            tail = both[-1:]
    return count / (time.perf_counter() - start)


def sse_latency(port: int, count: int) -> list[float]:
    """Milliseconds from the upstream's send time (``ts`` in each event) to receipt here."""
    sock = _get(port, f"/sse?count={count}&interval_ms=5")
    out: list[float] = []
    buf = b""
    with sock:
        while len(out) < count:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise BenchError(f"the stream ended after {len(out)} of {count} events")
            now = time.time()
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            out.append((now - json.loads(line[5:])["ts"]) * 1000)
    return out


def cli_throughput(pair: _Pair, path: Path, size: int) -> float:
    """Bytes/s of ``cat FILE`` through the shim, read here as fast as it comes."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(pair.bin / "cat"), str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "CARAPACE_AGENT_SOCKET": str(pair.socket)})
    assert proc.stdout is not None
    got = 0
    while chunk := proc.stdout.read1(1 << 20):
        got += len(chunk)
    if proc.wait(60) != 0 or got != size:
        raise BenchError(f"cat through the shim: exit {proc.returncode}, {got} of {size} bytes")
    return size / (time.perf_counter() - start)


def cli_roundtrip(pair: _Pair, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        if pair._shim("echo", "x").returncode != 0:
            raise BenchError("echo through the shim failed")
        out.append((time.perf_counter() - start) * 1000)
    return out


def _cpu(*procs: subprocess.Popen[bytes]) -> float:
    """CPU seconds the processes have run so far (/proc/PID/schedstat: nanoseconds, unlike
    the 10 ms ticks of /proc/PID/stat)."""
    return sum(int(Path(f"/proc/{proc.pid}/schedstat").read_text().split()[0])
               for proc in procs) / 1e9


def _log_file(path: Path, size: int) -> None:
    """Plain log lines: what most tools print (no random tokens in it)."""
    lines = []
    for i in range(8000):
        lines.append(f"2026-11-22 03:{i % 60:02d}:{i % 59:02d},{i % 1000:03d} INFO worker {i % 7}: "
                     f"request {i} for user{i % 97}@example.org done in {i % 450} ms, "
                     f"status ok, {i * 37 % 10007} bytes\n")
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            part = block[: size - written]
            f.write(part)
            written += len(part)


def _text_file(path: Path, size: int) -> None:
    """JSON-lines text (what tools print), not a repeated byte that is trivial to scan."""
    lines = []
    i = 0
    total = 0
    while total < 1 << 20:
        line = json.dumps({"id": i, "user": f"user{i % 97}@example.org",
                           "token_hint": secrets.token_urlsafe(12),
                           "message": f"hello number {i}, the quick brown fox jumps"}) + "\n"
        lines.append(line)
        total += len(line)
        i += 1
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            part = block[: size - written]
            f.write(part)
            written += len(part)


# ----------------------------------------------------------------------------- in process


def scrubber_alone(n_secrets: int = 3) -> dict[str, float]:
    """The scrubber by itself: MB/s over 64 KiB text chunks, µs per ~300-byte SSE event."""
    try:
        from carapace.protocol.sse import Event
        from carapace.server.masking import Scrubber
    except ImportError:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text"
        _text_file(path, 4 << 20)
        data = path.read_bytes()
    scrubber = Scrubber([b"Bearer " + secrets.token_urlsafe(30).encode()]
                        + [secrets.token_urlsafe(30).encode() for _ in range(n_secrets - 1)])
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    stream = scrubber.stream()
    start = time.perf_counter()
    for chunk in chunks:
        stream.feed(chunk)
    stream.flush()
    mbps = len(data) / (time.perf_counter() - start) / 1e6
    payload = json.dumps({"envelope": {"source": "+15550001", "seq": 1, "ts": time.time(),
                                       "dataMessage": {"message": "x" * 180}}})
    block = f"id: 1\ndata: {payload}\n\n".encode()
    event = Event(data=payload, id="1")
    stream, events = scrubber.stream(), scrubber.events()
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        stream.feed(block)
        events.feed(event)
    us = (time.perf_counter() - start) / n * 1e6
    return {"secrets": n_secrets, "stream_MBps": round(mbps, 1), "event_us": round(us, 2)}


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _deployment(secret_count: int = 1) -> Iterator[tuple[_Pair, _Pair, Path]]:
    # Not under /tmp: CLI tools run confined by default, with a private /tmp, and the CLI
    # rows have the shim cat a file from here.
    with tempfile.TemporaryDirectory(prefix="carapace-masking-bench-", dir="/var/tmp") as tmpdir:
        tmp = Path(tmpdir)
        procs = _Procs(tmp)
        try:
            upstream_port = _free_port()
            up, log = procs.start("upstream", [sys.executable, "-m", "carapace.debug.upstream",
                                               "--port", str(upstream_port)])
            _wait_port(up, upstream_port, log)
            plain = _Pair(procs, tmp, "plain", upstream_port, 0)
            masked = _Pair(procs, tmp, "masked", upstream_port, secret_count)
            yield plain, masked, tmp
        finally:
            procs.stop()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run(quick: bool = False, secret_count: int = 1) -> dict[str, Any]:
    """Measure both pairs in alternating rounds; return medians and masked/plain ratios.

    ``secret_count``: how many secrets the masked pair's policy injects (one is what a
    typical policy has: a token for one tool; each more adds a few needles to search).
    """
    rounds = 3 if quick else 7
    events = SSE_EVENTS // 2 if quick else SSE_EVENTS
    size = CLI_BYTES // 2 if quick else CLI_BYTES
    raw: dict[str, dict[str, list[float]]] = {"plain": {}, "masked": {}}
    with _deployment(secret_count) as (plain, masked, tmp):
        path = tmp / "cli.txt"
        _text_file(path, size)
        logs = tmp / "cli-log.txt"
        _log_file(logs, size)
        pairs = {"plain": plain, "masked": masked}
        for pair in pairs.values():  # warm up
            sse_throughput(pair.port, 2000)
            cli_throughput(pair, path, size)
        for rnd in range(rounds):
            order = ["plain", "masked"] if rnd % 2 == 0 else ["masked", "plain"]
            for name in order:
                pair = pairs[name]
                r = raw[name]
                before = _cpu(pair.server), _cpu(pair.server, pair.agent)
                r.setdefault("sse_events_per_s", []).append(sse_throughput(pair.port, events))
                r.setdefault("sse_server_cpu_us_per_event", []).append(
                    (_cpu(pair.server) - before[0]) / events * 1e6)
                r.setdefault("sse_tunnel_cpu_us_per_event", []).append(
                    (_cpu(pair.server, pair.agent) - before[1]) / events * 1e6)
                before = _cpu(pair.server), _cpu(pair.server, pair.agent)
                r.setdefault("cli_bytes_per_s", []).append(cli_throughput(pair, path, size))
                r.setdefault("cli_server_cpu_us_per_mb", []).append(
                    (_cpu(pair.server) - before[0]) / size * 1e6 * 1e6)
                r.setdefault("cli_tunnel_cpu_us_per_mb", []).append(
                    (_cpu(pair.server, pair.agent) - before[1]) / size * 1e6 * 1e6)
                before = _cpu(pair.server), _cpu(pair.server, pair.agent)
                r.setdefault("cli_log_bytes_per_s", []).append(cli_throughput(pair, logs, size))
                r.setdefault("cli_log_tunnel_cpu_us_per_mb", []).append(
                    (_cpu(pair.server, pair.agent) - before[1]) / size * 1e6 * 1e6)
                lat = sse_latency(pair.port, LATENCY_EVENTS)
                r.setdefault("sse_latency_p50_ms", []).append(_pct(lat, 0.5))
                r.setdefault("sse_latency_p99_ms", []).append(_pct(lat, 0.99))
                rt = cli_roundtrip(pair, 10 if quick else 20)
                r.setdefault("cli_roundtrip_p50_ms", []).append(_pct(rt, 0.5))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in raw.items()}
    ratios = {k: med["masked"][k] / med["plain"][k] for k in med["plain"]}
    return {
        "rounds": rounds,
        "sse_events": events,
        "cli_bytes": size,
        "plain": med["plain"],
        "masked": med["masked"],
        "ratio_masked_over_plain": ratios,
        "sse_throughput_cost_pct": (1 - ratios["sse_events_per_s"]) * 100,
        "cli_throughput_cost_pct": (1 - ratios["cli_bytes_per_s"]) * 100,
        # CPU the tunnel (server + agent) spends per unit: less sensitive to other load
        # on the machine than wall-clock throughput; masked / plain - 1.
        "sse_cpu_cost_pct": (ratios["sse_tunnel_cpu_us_per_event"] - 1) * 100,
        "cli_cpu_cost_pct": (ratios["cli_tunnel_cpu_us_per_mb"] - 1) * 100,
        "cli_log_cpu_cost_pct": (ratios["cli_log_tunnel_cpu_us_per_mb"] - 1) * 100,
        "secrets": secret_count,
        "scrubber_alone": scrubber_alone(secret_count),
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller runs")
    parser.add_argument("--secrets", type=int, default=1, metavar="N",
                        help="secrets injected by the masked pair's policy (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    out = run(args.quick, max(1, args.secrets))
    units = {"sse_events_per_s": "ev/s", "sse_server_cpu_us_per_event": "µs",
             "sse_tunnel_cpu_us_per_event": "µs", "sse_latency_p50_ms": "ms",
             "sse_latency_p99_ms": "ms", "cli_bytes_per_s": "MB/s",
             "cli_server_cpu_us_per_mb": "µs", "cli_tunnel_cpu_us_per_mb": "µs",
             "cli_log_bytes_per_s": "MB/s", "cli_log_tunnel_cpu_us_per_mb": "µs",
             "cli_roundtrip_p50_ms": "ms"}
    print(f"secret masking cost with {out['secrets']} injected secret(s), median of "
          f"{out['rounds']} alternating rounds "
          f"({out['sse_events']:,} SSE events, {out['cli_bytes'] >> 20} MiB of CLI stdout)")
    print(f"{'measure':<30}{'plain':>15}{'masked':>15}{'masked/plain':>14}")
    for key, unit in units.items():
        p, m = out["plain"][key], out["masked"][key]
        if unit == "MB/s":
            p, m = p / 1e6, m / 1e6
        print(f"{key:<30}{p:>10.1f} {unit:<4}{m:>10.1f} {unit:<4}"
              f"{out['ratio_masked_over_plain'][key]:>10.3f}")
    print(f"throughput cost: SSE {out['sse_throughput_cost_pct']:.1f}%, CLI stdout "
          f"{out['cli_throughput_cost_pct']:.1f}%; tunnel CPU cost: SSE "
          f"{out['sse_cpu_cost_pct']:.1f}%, CLI stdout {out['cli_cpu_cost_pct']:.1f}% "
          f"(log text: {out['cli_log_cpu_cost_pct']:.1f}%) (target < 10%)")
    alone = out["scrubber_alone"]
    if alone:
        print(f"scrubber alone ({alone['secrets']} secrets): {alone['stream_MBps']:.0f} MB/s over "
              f"64 KiB chunks, {alone['event_us']:.2f} µs per ~300-byte SSE event")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
