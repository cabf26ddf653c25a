"""CLI round trip through the shim vs running the binary directly.

Measured by ``benchmarks/shim_roundtrip.py``: ``echo x`` through shim →
agent → server → exec, interleaved with ``/bin/echo x`` run directly and,
where the ssh forward runs, ``ssh HOST /bin/echo x`` over the forward's own
connection (a ControlMaster: no key exchange per run, as the shim has the
agent's standing link). This adapter maps the result into the table:
direct = ``/bin/echo``, ssh = the remote command, Carapace = through the shim.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from typing import Any

from ..common import Ctx, Row, ScenarioError, ScenarioResult, timed
from ._peers import na_for_missing

NAME = "shim"
TITLE = "CLI round trip (echo x)"
MODULE = "benchmarks.shim_roundtrip"


def available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ImportError:
        return False


def rounds(ctx: Ctx) -> int:
    return 40 if ctx.quick else 150


def steps(ctx: Ctx) -> int:
    return 1


@timed
def run(ctx: Ctx) -> ScenarioResult:
    if not available():
        return ScenarioResult(NAME, TITLE, skipped="benchmarks/shim_roundtrip.py is not here "
                              "yet; this scenario runs it once it exists")
    module = importlib.import_module(MODULE)
    ctx.advance(f"shim: {rounds(ctx)} interleaved rounds (shim_roundtrip.run)")
    res = ScenarioResult(NAME, TITLE)
    extra = {}
    if ctx.ssh is not None:
        ssh_echo = ctx.ssh.exec_argv("/bin/echo", "x")
        check = subprocess.run(ssh_echo, capture_output=True, timeout=30)
        if check.returncode == 0 and check.stdout == b"x\n":
            extra["ssh"] = ssh_echo
        else:
            res.notes.append(f"ssh HOST /bin/echo x failed ({check.returncode}): "
                             f"{check.stderr.decode(errors='replace').strip()[:200]}")
    try:
        out: dict[str, Any] = module.run(rounds=rounds(ctx), warmup=5, extra=extra)
    except SystemExit as exc:  # the module reports its failures this way
        raise ScenarioError(f"shim_roundtrip: {exc}") from None
    ms = out["ms"]
    for q in ("p50", "p99"):
        res.rows.append(na_for_missing(ctx, Row(
            key=f"shim.{q}", label=f"round trip {q}", unit="ms",
            values={"direct": ms["direct"][q], "ssh": ms.get("ssh", {}).get(q),
                    "carapace": ms["shim"][q]},
            compare="diff", decimals=2)))
    parts = ", ".join(f"{what} {v:.1f} ms" for what, v in out["breakdown_p50"].items())
    res.notes.append(f"{out['rounds']} rounds by benchmarks/shim_roundtrip.py; "
                     f"the added p50 splits into: {parts}")
    res.raw = out
    return res
