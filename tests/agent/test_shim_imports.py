"""The shim starts once per command: it must never import the daemons' heavy dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("trio", "click", "rich", "httpx", "httpcore", "h11", "yaml", "asyncio",
             "prometheus_client", "carapace.server", "carapace.debug",
             # The shim uses the C modules beneath these: the wrappers' enums cost ~7 ms.
             "socket", "threading", "signal", "selectors", "subprocess")


def test_shim_imports_only_the_stdlib_msgpack_and_the_protocol() -> None:
    code = ("import sys, json, carapace.agent.shim; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    loaded = json.loads(out)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"carapace.agent.shim pulls in {bad}"
    carapace = {m for m in loaded if m.startswith("carapace.")}
    assert carapace <= {"carapace.agent", "carapace.agent.shim", "carapace.protocol",
                        "carapace.protocol.errors", "carapace.protocol.framing",
                        "carapace.protocol.messages"}, carapace
