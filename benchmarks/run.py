"""``make bench`` / ``python -m benchmarks.run``: every scenario, every peer, one run.

Peers: a direct connection to the upstream, an ``ssh -L`` forward to it
(OpenSSH on loopback with throwaway keys; skipped with the reason when sshd
is missing or refuses to run), and Carapace (agent → server → upstream).
Upstreams (``--upstream``): the test upstream, batched and per-event, and the
third-party nginx (JSON-RPC, download) and uvicorn + sse-starlette (SSE); one
that is not installed is skipped with the reason.
Prints a table and the targets, writes JSON and a PNG of the latency
distributions. Benchmarks never fail a build: the exit status is 0 unless the
harness itself could not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import report
from .common import PEERS, Ctx, ScenarioError, ScenarioResult
from .harness import HarnessError, SshForward, Upstream, dumps, git_commit, machine_info
from .profiling import Profiler, find_py_spy
from .scenarios import BY_NAME, SCENARIOS
from .upstreams import NAMES as UPSTREAM_NAMES
from .upstreams import Served, start_all, stop_all

REPO = Path(__file__).resolve().parent.parent


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [m.NAME for m in SCENARIOS]
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smaller counts, one round (~1-2 minutes)")
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                   help=f"run only these scenarios: {', '.join(names)}")
    p.add_argument("--skip", action="append", default=[], metavar="NAME[,NAME]",
                   help="leave these scenarios out")
    p.add_argument("--upstream", action="append", default=[], metavar="NAME[,NAME]",
                   help=f"measure through these upstreams where a scenario supports them: "
                        f"{', '.join(UPSTREAM_NAMES)} or all (default all); scenarios "
                        "with only the test upstream always use it")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "latest.json",
                   help="where to write the results (default bench-results/latest.json)")
    p.add_argument("--png", type=Path, default=REPO / "bench-results" / "latest.png",
                   help="where to write the latency plot (default bench-results/latest.png)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the tables as markdown (for the README)")
    p.add_argument("--no-ssh", action="store_true", help="leave the ssh -L column out")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="run py-spy on the agent and server while Carapace is measured "
                        "(sse-throughput, jsonrpc; many-agents: server, load generator, upstream); "
                        "collapsed stacks and a summary go to DIR")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temporary directory with every process's log")
    args = p.parse_args(argv)

    def names_of(values: list[str]) -> list[str]:
        out = [n.strip() for v in values for n in v.split(",") if n.strip()]
        unknown = [n for n in out if n not in BY_NAME]
        if unknown:
            p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return out

    only, skip = names_of(args.only), names_of(args.skip)
    args.scenarios = [n for n in names if (not only or n in only) and n not in skip]
    chosen = [n.strip() for v in args.upstream for n in v.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in (*UPSTREAM_NAMES, "all")]
    if unknown:
        p.error(f"unknown upstream(s) {', '.join(unknown)}; "
                f"known: {', '.join(UPSTREAM_NAMES)}, all")
    wanted = UPSTREAM_NAMES if not chosen or "all" in chosen else tuple(chosen)
    used = {u for n in args.scenarios for u in getattr(BY_NAME[n], "UPSTREAMS", ("test",))}
    args.upstreams = [u for u in UPSTREAM_NAMES if u in wanted and u in used]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # make bench | tee, CI logs: keep the table on one line a row
        console = Console(width=150)
    started = time.monotonic()
    nofile = raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="carapace-bench-"))
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "commit": git_commit(REPO),
        "machine": machine_info(),
        "nofile_limit": nofile[0],
        "scenarios": args.scenarios,
        "peers": {"direct": "the upstream itself (see upstreams)",
                  "ssh": "ssh -N -L through a private sshd on loopback",
                  "carapace": "carapace-agent → carapace-server → upstream"},
    }
    results: dict[str, ScenarioResult] = {}
    upstream: Upstream | None = None
    served: dict[str, Served] = {}
    ssh: SshForward | None = None
    profiler: Profiler | None = None
    try:
        console.print(f"[bold]Carapace benchmarks[/bold] ({meta['mode']} run, "
                      f"commit {meta['commit']}, {meta['machine'].get('cpus')} CPUs); "
                      f"logs in {tmp}")
        try:
            upstream = Upstream(tmp)
        except HarnessError as exc:
            console.print(f"[red]cannot start the test upstream:[/red] {exc}")
            return 2
        ssh_reason: str | None = None
        if args.no_ssh:
            ssh_reason = "left out (--no-ssh)"
        else:
            try:
                ssh = SshForward(tmp, upstream.port).start()
                meta["ssh"] = ssh.version()
                for note in ssh.notes:
                    console.print(f"[dim]ssh: {note}[/dim]")
            except (HarnessError, OSError) as exc:
                ssh_reason = str(exc)
                ssh = None
        if ssh is None:
            console.print(f"[yellow]ssh -L column skipped:[/yellow] {ssh_reason}")
        meta["ssh_skipped"] = ssh_reason
        if args.profile is not None:
            py_spy = find_py_spy()
            if py_spy is None:
                console.print("[yellow]--profile: py-spy not found "
                              "(.venv/bin/pip install py-spy); not profiling[/yellow]")
            else:
                profiler = Profiler(args.profile, py_spy)
        served, not_served = start_all(tmp, args.upstreams, upstream, ssh)
        for name, why in not_served.items():
            console.print(f"[yellow]upstream {name} skipped:[/yellow] {why}")
        meta["upstreams"] = {name: "running" for name in served} | {
            name: f"skipped: {why}" for name, why in not_served.items()}
        ctx = Ctx(quick=args.quick, tmp=tmp, upstream=upstream, ssh=ssh, ssh_reason=ssh_reason,
                  profiler=profiler, upstreams=served, upstream_skipped=not_served)
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console, refresh_per_second=4, transient=False) as progress:
            tasks = {name: progress.add_task(f"{name}: waiting", start=False,
                                             total=BY_NAME[name].steps(ctx) + 1)
                     for name in args.scenarios}
            for name in args.scenarios:
                task = tasks[name]

                def advance(desc: str, task: Any = task) -> None:
                    progress.update(task, description=desc, advance=1)

                ctx.advance = advance
                progress.start_task(task)
                progress.update(task, description=f"{name}: starting")
                module = BY_NAME[name]
                try:
                    res = module.run(ctx)
                except (ScenarioError, HarnessError) as exc:
                    res = ScenarioResult(name, module.TITLE, skipped=f"failed: {exc}")
                except Exception as exc:
                    traceback.print_exc()
                    res = ScenarioResult(name, module.TITLE,
                                         skipped=f"crashed: {type(exc).__name__}: {exc}")
                results[name] = res
                state = "skipped" if res.skipped else f"done in {res.seconds:.0f} s"
                progress.update(task, description=f"{name}: {state}",
                                completed=progress.tasks[task].total)
    finally:
        stop_all(served)
        if ssh is not None:
            ssh.stop()
        if upstream is not None:
            upstream.stop()

    targets = report.evaluate_targets(results, args.quick)
    report.print_report(console, results, targets, ssh is not None)
    meta["seconds"] = round(time.monotonic() - started, 1)
    document = {
        "meta": meta,
        "peers": list(PEERS),
        "scenarios": {name: res.as_json() for name, res in results.items()},
        "targets": targets,
    }
    if profiler is not None:
        summary = profiler.summary()
        document["profile"] = summary
        (args.profile / "summary.json").write_text(json.dumps(summary, indent=1))
        print_profile(console, summary)
        for err in profiler.errors:
            console.print(f"[yellow]py-spy: {err}[/yellow]")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(dumps(document) + "\n")
    console.print(f"JSON: {args.json}")
    why = report.plot(results, args.png)
    console.print(f"plot: {args.png}" if why is None else f"[yellow]plot skipped:[/yellow] {why}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.markdown(results, targets))
        console.print(f"markdown: {args.markdown}")
    console.print(f"total {meta['seconds']:.0f} s")
    if args.keep_tmp:
        console.print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def print_profile(console: Console, summary: list[dict[str, Any]]) -> None:
    for entry in summary:
        busy = entry["cpu_busy"]
        console.print(f"[bold]profile[/bold] {entry['scenario']} / {entry['process']}: "
                      f"{entry['samples']} samples"
                      + (f", on CPU {busy * 100:.0f}% of the time" if busy else ""))
        for func, share in entry["self"][:8]:
            console.print(f"   {share * 100:5.1f}%  {func}")


if __name__ == "__main__":
    sys.exit(main())
