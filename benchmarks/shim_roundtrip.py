"""Round trips of a ``--version``-style command: through the shim vs the binary run directly.

    .venv/bin/python benchmarks/shim_roundtrip.py [--rounds 200] [--json]

Starts a ``carapace-server`` and a ``carapace-agent --cli-socket`` on
loopback, links a shim ``echo`` → ``carapace-shim``, and times, interleaved
in one run (so both see the same machine load):

- ``direct``: ``/bin/echo x``, the floor every local command pays;
- ``python``: the shim's interpreter starting and exiting (``os._exit``, as
  the shim does) — Python's own start-up;
- ``imports``: the same plus ``import carapace.agent.shim`` (stdlib,
  msgpack, the protocol);
- ``tunnel``: one ``cli_request`` → ``exit`` exchange on the agent socket
  from this (already running) process: agent, link, server, policy and the
  host's fork/exec of ``echo``, without any interpreter start;
- ``shim``: ``echo x`` through shim → agent → server → exec → back.

From these: *added* = shim − direct (the target: ≤ 25 ms at p50); of that,
interpreter start-up = python − direct, imports = imports − python, the
tunnel = tunnel − direct (the host pays the same fork/exec as direct), and
the remainder is the shim's own work (building the request, connecting,
its threads and signal handlers). ``-X importtime`` then lists the shim's
costliest imports.
Not a test: numbers depend on the machine; it only reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
SHIM = BIN / "carapace-shim"
ECHO = "/bin/echo"


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{name} is not installed next to {sys.executable}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..1."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5 - 1e-9)))
    return ordered[rank - 1]


@dataclass
class Deployment:
    """A server and an agent serving shims, with logs in ``tmp``."""

    tmp: Path
    socket: Path
    shims: Path
    procs: list[subprocess.Popen[bytes]]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CARAPACE_AGENT_SOCKET": str(self.socket)}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start(tmp: Path) -> Deployment:
    token = tmp / "token"
    token.write_text(f"default:{secrets.token_urlsafe(32)}\n")
    token.chmod(0o600)
    policy = tmp / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        tools:
          echo:
            type: cli
            binary: {ECHO}
            argv_allow_patterns: ["*"]
            timeout_secs: 10
        """))
    port = free_port()
    sock = tmp / "run" / "agent.sock"
    shims = tmp / "bin"
    shims.mkdir()
    os.symlink(SHIM, shims / "echo")
    procs = []
    with (tmp / "server.log").open("wb") as slog, (tmp / "agent.log").open("wb") as alog:
        procs.append(subprocess.Popen(
            [script("carapace-server"), "--listen", f"127.0.0.1:{port}", "--policy",
             str(policy), "--token-file", str(token), "--log-level", "warning"],
            stdout=slog, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [script("carapace-agent"), "--server", f"127.0.0.1:{port}", "--token-file",
             str(token), "--cli-socket", str(sock), "--log-level", "warning"],
            stdout=alog, stderr=subprocess.STDOUT))
    d = Deployment(tmp, sock, shims, procs)
    deadline = time.monotonic() + 20
    while True:  # poll until a shim gets through the tunnel
        r = subprocess.run([str(shims / "echo"), "up"], capture_output=True, env=d.env())
        if r.returncode == 0 and r.stdout == b"up\n":
            return d
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            d.stop()
            raise SystemExit("the tunnel did not come up:\n"
                             + (tmp / "server.log").read_text() + (tmp / "agent.log").read_text()
                             + r.stderr.decode())
        time.sleep(0.05)


def timed(argv: list[str], env: dict[str, str], expect: bytes | None) -> float:
    """Wall-clock milliseconds of one run (fork, exec, exit, reap), checking its output."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=env)
    elapsed = (time.perf_counter() - t0) * 1000
    if r.returncode != 0 or (expect is not None and r.stdout != expect):
        raise SystemExit(f"{argv} failed ({r.returncode}): {r.stderr.decode()[:500]}")
    return elapsed


def tunnel_round_trip(sock_path: Path) -> float:
    """Milliseconds for one request on the agent socket, done in-process (no start-up)."""
    from carapace.protocol.framing import FrameDecoder, encode
    from carapace.protocol.messages import CliRequest, End, Exit, Output

    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(sock_path))
        sock.sendall(encode(CliRequest(id=1, tool="echo", argv=(b"x",), cwd=b"/", env=(),
                                       tty=(False, False, False))) + encode(End(id=1)))
        decoder = FrameDecoder()
        out = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the agent hung up without an exit")
            decoder.feed(data)
            for msg in decoder:
                if isinstance(msg, Output):
                    out += msg.data
                elif isinstance(msg, Exit) and msg.code == 0 and out == b"x\n":
                    return (time.perf_counter() - t0) * 1000
                else:
                    raise SystemExit(f"unexpected answer: {msg}")


def import_breakdown(top: int = 8) -> list[tuple[str, float]]:
    """The shim's costliest imports (self time, ms) from one ``-X importtime`` run."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import carapace.agent.shim"],
                       capture_output=True, text=True, check=True)
    rows = []
    for line in r.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            rows.append((parts[2].strip(), int(parts[0]) / 1000))
    return sorted(rows, key=lambda row: -row[1])[:top]


def compile_bytecode() -> None:
    """Compile Carapace's modules as pip does for a regular install. Without it (with
    PYTHONDONTWRITEBYTECODE set, or in a link tree no run has written to yet)
    every shim start would compile its modules from source again."""
    import compileall

    import carapace

    for folder in carapace.__path__:
        compileall.compile_dir(folder, quiet=1)


def run(rounds: int = 200, warmup: int = 10,
        extra: Mapping[str, Sequence[str]] | None = None) -> dict[str, object]:
    """Measure; returns percentiles (ms) per variant and the added-latency breakdown.

    ``extra`` names more commands that must print ``x``, timed in the same
    interleaved rounds (the benchmark suite adds ``ssh HOST /bin/echo x``).
    """
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as tmpdir:
        d = start(Path(tmpdir))
        try:
            env = d.env()
            variants: dict[str, Callable[[], float]] = {
                "direct": lambda: timed([ECHO, "x"], env, b"x\n"),
                "python": lambda: timed([sys.executable, "-c", "import os; os._exit(0)"],
                                        env, None),
                "imports": lambda: timed([sys.executable, "-c",
                                          "import os, carapace.agent.shim; os._exit(0)"],
                                         env, None),
                "tunnel": lambda: tunnel_round_trip(d.socket),
                "shim": lambda: timed([str(d.shims / "echo"), "x"], env, b"x\n"),
            }
            for name, argv in (extra or {}).items():
                variants[name] = lambda argv=list(argv): timed(argv, env, b"x\n")
            for _ in range(warmup):
                for measure in variants.values():
                    measure()
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):  # interleaved: every variant sees the same conditions
                for name, measure in variants.items():
                    samples[name].append(measure())
        finally:
            d.stop()
    stats = {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "min": min(v)}
             for name, v in samples.items()}
    p50 = {name: s["p50"] for name, s in stats.items()}
    return {
        "rounds": rounds,
        "ms": stats,
        "added_p50": p50["shim"] - p50["direct"],
        "added_p99": stats["shim"]["p99"] - stats["direct"]["p99"],
        "breakdown_p50": {
            "interpreter start-up": p50["python"] - p50["direct"],
            "shim imports": p50["imports"] - p50["python"],
            "agent + tunnel + server + policy": p50["tunnel"] - p50["direct"],
            "shim's own work (remainder)": p50["shim"] - p50["imports"] - p50["tunnel"]
            + p50["direct"],
        },
        "top_imports_ms": import_breakdown(),
        "target_added_p50": 25.0,
    }


def report(result: dict[str, object]) -> str:
    stats = result["ms"]
    assert isinstance(stats, dict)
    lines = [f"{result['rounds']} interleaved rounds of `echo x` (ms, wall clock per process)",
             f"{'':10} {'p50':>8} {'p99':>8} {'min':>8}"]
    for name, s in stats.items():
        lines.append(f"{name:10} {s['p50']:8.2f} {s['p99']:8.2f} {s['min']:8.2f}")
    lines.append(f"added by the shim: p50 {result['added_p50']:.2f} ms, "
                 f"p99 {result['added_p99']:.2f} ms (target p50 <= 25 ms)")
    lines.append("where the p50 goes:")
    breakdown = result["breakdown_p50"]
    assert isinstance(breakdown, dict)
    for what, ms in breakdown.items():
        lines.append(f"  {what:42} {ms:7.2f} ms")
    lines.append("costliest shim imports (self time, one -X importtime run):")
    top = result["top_imports_ms"]
    assert isinstance(top, list)
    for module, ms in top:
        lines.append(f"  {module:42} {ms:7.2f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    result = run(args.rounds)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
