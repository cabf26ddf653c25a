"""Host-side test programs that the CLI tests run through the tunnel (``hostproc.py MODE ARGS``).

Each mode is a small, observable behaviour: print on a clock, die by a
signal, record its pids, flood stdout while recording progress. Files are
written atomically (temp file + rename) so a polling test never reads half
a write.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time


def _put(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ticker(count: str, interval: str) -> None:
    """A line every ``interval`` seconds, flushed at once, ``count`` times."""
    for i in range(int(count)):
        sys.stdout.write(f"tick {i}\n")
        sys.stdout.flush()
        time.sleep(float(interval))


def selfkill(signum: str) -> None:
    """Die by a signal on the host (the shim must exit 128+N)."""
    sys.stdout.write("about to die\n")
    sys.stdout.flush()
    os.kill(os.getpid(), int(signum))
    time.sleep(10)


def pidsleep(pidfile: str) -> None:
    """Start a grandchild in our process group, record both pids, then wait for a long time."""
    child = subprocess.Popen(["/bin/sleep", "60"], stdin=subprocess.DEVNULL)
    _put(pidfile, f"{os.getpid()} {child.pid}\n")
    time.sleep(60)


def flood(progress: str, total: str) -> None:
    """Write ``total`` bytes to stdout in 64 KiB chunks, recording how many went out."""
    chunk = b"x" * 65536
    written = 0
    limit = int(total)
    while written < limit:
        written += os.write(1, chunk[: limit - written])
        _put(progress, str(written))


def envcheck(name: str, sha256: str) -> None:
    """Exit 0 if ``$name`` has the value whose sha256 is given (so no test prints the value)."""
    value = os.environb.get(name.encode(), b"")
    sys.exit(0 if hashlib.sha256(value).hexdigest() == sha256 else 3)


MODES = {f.__name__: f for f in (ticker, selfkill, pidsleep, flood, envcheck)}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
