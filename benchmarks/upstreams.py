"""The upstreams a run measures through every peer: the test upstream and third-party ones.

- ``test``: ``python -m carapace.debug.upstream`` as it is (``/sse-flood``
  writes 32 events at once: the batched write pattern).
- ``test-per-event``: the same with ``--write-pattern per-event`` (one chunk
  per event, a comment every ten events).
- ``nginx``: Debian's nginx on loopback with a generated config: fixed
  JSON-RPC answers (``return 200 '…'``) and a static file for the download.
- ``sse-starlette``: uvicorn serving :mod:`benchmarks.sse_app` (one event per
  write, as sse-starlette sends them).

Each is reached direct, through its own ``ssh -L`` forward (added to the one
ssh connection with ``ssh -O forward``) and through a Carapace pair whose
tool points at it. A third-party server that is not installed or will not
start is skipped with the reason; the run goes on.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .harness import HOST, HarnessError, Proc, SshForward, Upstream, children, free_port

NAMES = ("test", "test-per-event", "nginx", "sse-starlette")
TITLES = {"test": "test upstream, batched", "test-per-event": "test upstream, per-event",
          "nginx": "nginx", "sse-starlette": "uvicorn + sse-starlette"}
THIRD_PARTY = ("nginx", "sse-starlette")
NGINX_CANDIDATES = ("/usr/sbin/nginx", "nginx")
# What nginx answers to every JSON-RPC call: signal-cli's answer to "version".
NGINX_RPC_ANSWER = '{"jsonrpc":"2.0","result":{"version":"0.13.11"},"id":1}'
READ_CHUNK = 1 << 20


@dataclass
class Served:
    """One running upstream: its port, its processes, its ssh forward, its paths."""

    name: str
    port: int
    proc: Proc
    ssh_port: int | None = None
    # How much of a scenario's event count this upstream gets: the test upstream's
    # batched flood runs ~5x faster than a server that writes one event at a time.
    flood_share: float = 1.0
    files: dict[int, str] = field(default_factory=dict)
    root: Path | None = None

    @property
    def title(self) -> str:
        return TITLES[self.name]

    def pids(self) -> dict[str, int]:
        """The upstream's processes (nginx: master and its workers), for CPU accounting."""
        out = {"upstream": self.proc.pid}
        for i, pid in enumerate(children(self.proc.pid)):
            out[f"upstream.{i}"] = pid
        return out

    def download_path(self, nbytes: int) -> str:
        """A path that answers ``nbytes`` bytes with Content-Length."""
        if self.name != "nginx":
            return f"/bytes?n={nbytes}"
        if nbytes not in self.files:
            assert self.root is not None
            name = f"blob-{nbytes}.bin"
            block = os.urandom(READ_CHUNK)
            with open(self.root / "www" / name, "wb") as out:
                left = nbytes
                while left > 0:
                    out.write(block[: min(left, READ_CHUNK)])
                    left -= READ_CHUNK
            self.files[nbytes] = f"/{name}"
        return self.files[nbytes]

    def stop(self) -> None:
        self.proc.stop()


def find_nginx() -> str | None:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if found:
            return found
    return None


def nginx_config(root: Path, port: int) -> str:
    """A foreground nginx on loopback, everything it writes kept under ``root``."""
    temp = "\n".join(f"    {kind}_temp_path {root / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root the workers would drop to "nobody", who cannot enter the run's
    # private temporary directory; on loopback for a benchmark, keep root.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return textwrap.dedent(f"""\
        daemon off;
        {user}worker_processes 1;
        pid {root / 'nginx.pid'};
        error_log {root / 'error.log'} warn;
        events {{ worker_connections 4096; }}
        http {{
        {{temp}}
            access_log off;
            sendfile on;
            tcp_nopush on;
            tcp_nodelay on;
            # The JSON-RPC client keeps each connection for the whole run.
            keepalive_requests 10000000;
            keepalive_timeout 300s;
            server {{
                listen {HOST}:{port};
                root {root / 'www'};
                location = /api/v1/rpc {{
                    default_type application/json;
                    return 200 '{NGINX_RPC_ANSWER}\\n';
                }}
                location = /api/v1/check {{ return 200; }}
                location / {{ }}
            }}
        }}
        """).replace("{temp}", temp)


def start_nginx(tmp: Path) -> Served:
    binary = find_nginx()
    if binary is None:
        raise HarnessError("nginx is not installed (Debian: apt-get install nginx; "
                           "`make bench` installs it as root)")
    root = tmp / "nginx"
    (root / "www").mkdir(parents=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(root, port))
    proc = Proc("nginx", [binary, "-p", str(root), "-c", str(conf), "-e",
                          str(root / "error.log")], root)
    try:
        proc.wait_port(port, 15)
    except HarnessError as exc:
        proc.stop()
        raise HarnessError(f"nginx did not start: {exc}") from None
    return Served("nginx", port, proc, root=root)


def start_sse_starlette(tmp: Path) -> Served:
    try:
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise HarnessError(f"{exc.name} is not installed (pip install -e '.[bench]'; "
                           "`make bench` does)") from None
    logdir = tmp / "sse-starlette"
    logdir.mkdir()
    port = free_port()
    proc = Proc("uvicorn", [sys.executable, "-m", "uvicorn", "benchmarks.sse_app:app",
                            "--host", HOST, "--port", str(port), "--log-level", "warning",
                            "--no-access-log"], logdir)
    try:
        proc.wait_port(port, 20)
    except HarnessError as exc:
        proc.stop()
        raise HarnessError(f"uvicorn did not start: {exc}") from None
    return Served("sse-starlette", port, proc, flood_share=0.25)


def start_per_event(tmp: Path) -> Served:
    logdir = tmp / "test-per-event"
    logdir.mkdir()
    up = Upstream(logdir, ["--write-pattern", "per-event"])
    return Served("test-per-event", up.port, up.proc, flood_share=0.25)


def start_all(tmp: Path, names: list[str], test: Upstream,
              ssh: SshForward | None) -> tuple[dict[str, Served], dict[str, str]]:
    """Start ``names`` (``test`` is already running); each gets an ssh -L forward.

    Returns the running ones and, for the others, why they are skipped.
    """
    running: dict[str, Served] = {}
    skipped: dict[str, str] = {}
    starters = {"test-per-event": start_per_event, "nginx": start_nginx,
                "sse-starlette": start_sse_starlette}
    for name in names:
        try:
            if name == "test":
                served = Served("test", test.port, test.proc,
                                ssh_port=ssh.port if ssh is not None else None)
            else:
                served = starters[name](tmp)
                if ssh is not None:
                    try:
                        served.ssh_port = ssh.add_forward(served.port)
                    except HarnessError as exc:
                        served.stop()
                        raise HarnessError(f"ssh -L to it failed: {exc}") from None
        except (HarnessError, OSError) as exc:
            skipped[name] = str(exc)
            continue
        running[name] = served
    return running, skipped


def stop_all(running: dict[str, Served]) -> None:
    for served in running.values():
        if served.name != "test":  # the run stops its own test upstream
            served.stop()
