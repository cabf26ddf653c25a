"""One real deployment (upstream, carapace-server with --debug-listen and --audit-log,
carapace-agent) for the operator-view tests, and helpers to read its debug listener.

The tests of the server's operator API (tests/server/operator_api) and of
``carapace-debug sniff`` (tests/debug) each start one, once per session, from
their folder's conftest (fixture ``dep``).
"""

from __future__ import annotations

import contextlib
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .deployment import Deployment, deployment
from .procs import free_port, poll

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


@contextlib.contextmanager
def operator_deployment(tmp: Path) -> Iterator[Deployment]:
    """A deployment under :data:`POLICY` whose server has a debug listener
    (``d.debug_port``) and an audit log (``d.extra["audit_log"]``)."""
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


def wait_for_subscribers(d: Deployment, n: int, timeout: float = 10.0) -> None:
    poll(lambda: get_json(d, "/debug/health")["sniff"]["subscribers"] >= n, timeout,
         f"{n} sniff subscriber(s)")


def token_file(tmp: Path, token: str) -> Path:
    path = tmp / "debug-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
