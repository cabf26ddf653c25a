"""A 256 MiB body through each peer: MB/s, and peak RSS growth of the processes between.

Peak RSS: before each download the harness resets the kernel's high-water mark
(``echo 5 > /proc/PID/clear_refs``) and also samples VmRSS every 10 ms; the
growth is the larger of (VmHWM after − VmRSS before) and (sampled max − before).
Upstreams: the test upstream's ``/bytes`` (64 KiB writes) and nginx serving a
static file of random bytes (sendfile), each with its own Carapace pair.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..common import Ctx, Row, ScenarioError, ScenarioResult, median, timed
from ..harness import proc_status, reset_peak_rss, rss_kib
from ..upstreams import Served
from ._peers import key_for, label_for, na_for_missing, ordered, skipped_notes

NAME = "download"
TITLE = "256 MiB download"
UPSTREAMS = ("test", "nginx")


def size(ctx: Ctx) -> int:
    return (64 if ctx.quick else 256) * 1024 * 1024


def rounds(ctx: Ctx) -> int:
    return 1 if ctx.quick else 2


def steps(ctx: Ctx) -> int:
    return (2 + (ctx.ssh is not None)) * rounds(ctx) * max(1, len(ctx.upstreams_for(UPSTREAMS)))


@contextmanager
def peak_rss(pids: dict[str, int]) -> Iterator[dict[str, int]]:
    """Yields a dict that, on exit, holds each process's peak RSS growth in KiB."""
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    hwm_ok = {name: reset_peak_rss(pid) for name, pid in pids.items()}
    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    growth: dict[str, int] = {}
    try:
        yield growth
    finally:
        stop.set()
        thread.join(5)
        for name, pid in pids.items():
            hwm = proc_status(pid).get("VmHWM", 0) if hwm_ok[name] else 0
            growth[name] = max(peak[name], hwm) - before[name]


def measure(ctx: Ctx, up: Served, nbytes: int, failures: list[str]
            ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[int]]]:
    """Every peer's rounds against ``up``: MB/s, CPU per MB, peak RSS growth (KiB)."""
    path = up.download_path(nbytes)
    warm = up.download_path(4 * 1024 * 1024)
    speeds: dict[str, list[float]] = {}
    growth: dict[str, list[int]] = {}
    cpu: dict[str, list[float]] = {}
    with ctx.carapace(up=up) as carapace:
        ports = ctx.peer_ports(carapace, up)
        for port in ports.values():  # warm-up
            ctx.client({"mode": "download", "peer": ["127.0.0.1", port],
                        "path": warm, "bytes": 4 * 1024 * 1024}, 60)
        for rnd in range(rounds(ctx)):
            for peer, port in ports.items():
                ctx.advance(f"download: {up.name} via {peer}, round {rnd + 1}")
                watched = (carapace.pids() if peer == "carapace"
                           else ctx.ssh.all_pids() if peer == "ssh" and ctx.ssh else {})
                try:
                    with peak_rss(watched) as grew:
                        out = ctx.measure(peer, carapace,
                                          {"mode": "download", "peer": ["127.0.0.1", port],
                                           "path": path, "bytes": nbytes}, 300, up=up)
                except ScenarioError as exc:
                    failures.append(f"{up.name} via {peer}: {exc}")
                    continue
                speeds.setdefault(peer, []).append(out["mb_per_s"])
                cpu.setdefault(peer, []).append(out["cpu_us_per_unit"] * 1000)  # µs/B → ms/MB
                sshd = [kib for name, kib in grew.items() if name.startswith("sshd.")]
                if sshd:  # the sshd processes serving the forward, together
                    growth.setdefault("sshd", []).append(sum(sshd))
                for name, kib in grew.items():
                    if not name.startswith("sshd."):
                        growth.setdefault(name, []).append(kib)
    return speeds, cpu, growth


@timed
def run(ctx: Ctx) -> ScenarioResult:
    nbytes = size(ctx)
    res = ScenarioResult(NAME, TITLE if not ctx.quick else f"{nbytes >> 20} MiB download")
    failures: list[str] = skipped_notes(ctx, UPSTREAMS)
    ups = ctx.upstreams_for(UPSTREAMS)
    several = len(ups) > 1
    for up in ups:
        try:
            speeds, cpu, growth = measure(ctx, up, nbytes, failures)
        except (ScenarioError, OSError) as exc:  # warm-up or file: the others go on
            failures.append(f"{up.name}: {exc}")
            continue
        if not speeds.get("direct"):
            failures.append(f"{up.name}: the direct download failed")
            continue
        res.rows.append(na_for_missing(ctx, Row(
            key=key_for("download.mbps", up), label=label_for("throughput", up, several),
            unit="MB/s", values=ordered({p: median(v) for p, v in speeds.items()}),
            compare="ratio", decimals=0)))
        res.rows.append(na_for_missing(ctx, Row(
            key=key_for("download.cpu", up),
            label=label_for("CPU per MB, all processes", up, several), unit="ms",
            values=ordered({p: median(v) for p, v in cpu.items()}), compare="ratio",
            decimals=1)))
        peak_mb = {name: max(v) / 1024 for name, v in growth.items()}
        res.rows.append(na_for_missing(ctx, Row(
            key=key_for("download.rss.agent", up),
            label=label_for("peak RSS growth, agent (ssh: client)", up, several), unit="MB",
            values=ordered({"carapace": peak_mb.get("agent"), "ssh": peak_mb.get("ssh")}),
            decimals=1, na={"direct": "no process between"})))
        res.rows.append(na_for_missing(ctx, Row(
            key=key_for("download.rss.server", up),
            label=label_for("peak RSS growth, server (ssh: sshd)", up, several), unit="MB",
            values=ordered({"carapace": peak_mb.get("server"), "ssh": peak_mb.get("sshd")}),
            decimals=1, na={"direct": "no process between"})))
        res.raw[key_for("mb_per_s", up)] = speeds
        res.raw[key_for("rss_growth_kib", up)] = growth
    res.notes += failures
    res.notes.append(f"{nbytes >> 20} MiB (test upstream: /bytes, 64 KiB writes; nginx: a "
                     f"static file, sendfile), {rounds(ctx)} round(s): median throughput, "
                     "largest peak RSS growth")
    if not res.rows:
        raise ScenarioError("no download worked: " + "; ".join(failures))
    return res
