"""One real deployment (upstream, carapace-server with --debug-listen and --audit-log,
carapace-agent) shared by the operator-view tests, and helpers to drive carapace-debug."""

from __future__ import annotations

import secrets
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from helpers.deployment import Deployment, deployment
from helpers.procs import free_port, script

T = TypeVar("T")

POLICY_SECRET = "injected-" + secrets.token_urlsafe(24)
"""A headers_inject value: a policy secret that must never show in a sniff feed."""

POLICY = textwrap.dedent(
    f"""\
    tools:
      signal-cli:
        type: http
        upstream: "http://127.0.0.1:{{upstream_port}}"
        timeout_secs: 5
        jsonrpc_allow_methods: [version, send, listAccounts]
        headers_inject:
          X-Upstream-Key: "{POLICY_SECRET}"
    """
)


@pytest.fixture(scope="session")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("ops")
    debug_port = free_port()
    audit_log = tmp / "audit.log"
    with deployment(
        tmp, policy=POLICY,
        server_args=["--debug-listen", f"127.0.0.1:{debug_port}", "--audit-log", str(audit_log)],
    ) as d:
        d.debug_port = debug_port
        d.extra["audit_log"] = audit_log
        yield d


def debug_url(d: Deployment, path: str) -> str:
    return f"http://127.0.0.1:{d.debug_port}{path}"


def get_json(d: Deployment, path: str) -> dict[str, Any]:
    r = httpx.get(debug_url(d, path), timeout=5)
    r.raise_for_status()
    doc = r.json()
    assert isinstance(doc, dict)
    return doc


def run_debug(*args: str, timeout: float = 20, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run ``carapace-debug ARGS`` to completion and capture its output."""
    import os

    return subprocess.run(
        [script("carapace-debug"), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def poll(fn: Callable[[], T | None], timeout: float = 10.0, what: str = "condition",
         interval: float = 0.02) -> T:
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
        except AssertionError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last}")
        time.sleep(interval)


def wait_for_subscribers(d: Deployment, n: int, timeout: float = 10.0) -> None:
    poll(lambda: get_json(d, "/debug/health")["sniff"]["subscribers"] >= n, timeout,
         f"{n} sniff subscriber(s)")


def rpc(d: Deployment, method: str, **extra: Any) -> httpx.Response:
    return httpx.post(d.url("/api/v1/rpc"), json={"jsonrpc": "2.0", "method": method, "id": 1},
                      timeout=10, **extra)


def token_file(tmp: Path, token: str) -> Path:
    path = tmp / "debug-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
