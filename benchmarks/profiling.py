"""Optional ``--profile DIR``: py-spy on the agent and the server while Carapace is measured.

py-spy is not a dependency (``pip install py-spy`` into the venv to use it).
It samples without pausing the target (``--nonblocking``), writes collapsed
stacks per scenario and process to DIR, and :meth:`Profiler.summary` reduces
them to the functions where the time goes (self time, and inclusive time).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` → ``func (path/file.py)``, shortened to the package path."""
    frame = _LINE.sub(")", frame)
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            tail = tail.split(marker, 1)[-1]
            frame = f"{head}({tail}"
    return frame


class Profiler:
    def __init__(self, outdir: Path, py_spy: str, rate: int = 250) -> None:
        self.outdir = outdir
        self.py_spy = py_spy
        self.rate = rate
        self.files: dict[tuple[str, str], list[Path]] = {}
        self.seconds: dict[tuple[str, str], float] = {}
        self.errors: list[str] = []
        outdir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def record(self, label: str, pids: dict[str, int]) -> Iterator[None]:
        procs: list[tuple[tuple[str, str], subprocess.Popen[bytes], Path]] = []
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        for name, pid in pids.items():
            key = (label, name)
            n = len(self.files.get(key, []))
            out = self.outdir / f"{slug}.{name}.{n}.txt"
            proc = subprocess.Popen(
                [self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate),
                 "--format", "raw", "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append((key, proc, out))
        time.sleep(0.3)  # py-spy attaches
        start = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            for key, proc, out in procs:
                proc.send_signal(signal.SIGINT)
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                if out.exists():
                    self.files.setdefault(key, []).append(out)
                    self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
                else:
                    self.errors.append(f"{key}: {err.decode(errors='replace').strip()[-300:]}")

    def summary(self, top: int = 12) -> list[dict[str, Any]]:
        out = []
        for key, files in self.files.items():
            self_time: Counter[str] = Counter()
            inclusive: Counter[str] = Counter()
            total = 0
            for path in files:
                for line in path.read_text(errors="replace").splitlines():
                    stack, _, count = line.rpartition(" ")
                    if not stack or not count.isdigit():
                        continue
                    n = int(count)
                    frames = [_frame_name(f) for f in stack.split(";")]
                    # py-spy puts the thread/process first; skip non-frames.
                    frames = [f for f in frames if "(" in f]
                    if not frames:
                        continue
                    total += n
                    self_time[frames[-1]] += n
                    for f in set(frames):
                        inclusive[f] += n
            seconds = self.seconds.get(key, 0.0)
            busy = total / (self.rate * seconds) if seconds else None
            out.append({
                "scenario": key[0], "process": key[1], "samples": total,
                "cpu_busy": busy,
                "self": [(f, n / total) for f, n in self_time.most_common(top)] if total else [],
                "inclusive": [(f, n / total) for f, n in inclusive.most_common(top * 2)]
                if total else [],
            })
        return out
