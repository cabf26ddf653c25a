"""One real deployment shared by the interop tests, and skips that say what to install.

The tunnel (built-in test upstream, carapace-server with --audit-log,
carapace-agent) exposes three HTTP tools:

- ``signal-cli``: the built-in signal-cli look-alike under the policy of
  ``examples/policies/signal-cli.yaml`` (only its upstream changed), for
  OpenClaw's Signal client and curl's JSON-RPC calls;
- ``upstream``: the same upstream with every path open (``/sse``, ``/echo``, ...);
- ``sse-app``: ``tests/interop/sse_app.py``, an sse-starlette app under uvicorn,
  when those are installed (``pip install -e '.[interop]'``).

Clients that are not installed skip with the command that installs them;
``make test-interop`` installs them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers.deployment import Deployment, deployment
from helpers.procs import free_port, running

from .support import HERE, chromium, node, node_package_version

REPO = HERE.parents[1]
EXAMPLE_SIGNAL_POLICY = REPO / "examples" / "policies" / "signal-cli.yaml"
AGENT_ARGS = ("--link-wait", "10")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: drives a real third-party client")


def have_starlette() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sse_starlette", "uvicorn"))


def skip_unless_starlette() -> None:
    if not have_starlette():
        pytest.skip("sse-starlette/uvicorn not installed: pip install -e '.[interop]' "
                    "(make test-interop does)")


def skip_unless_node_package(name: str) -> str:
    if node() is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs npm)")
    version = node_package_version(name)
    if version is None:
        pytest.skip(f"npm package {name} is not installed in tests/interop/node_modules: "
                    "run make test-interop (npm ci there)")
    return version


def skip_unless_chromium() -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed: make test-interop installs it as root "
                    "(apt-get install chromium)")
    return exe


def interop_policy(sse_app_port: int) -> str:
    """The example signal-cli policy pointed at the test upstream, plus two open tools."""
    example = yaml.safe_load(EXAMPLE_SIGNAL_POLICY.read_text())
    signal = example["tools"]["signal-cli"]
    signal["upstream"] = "http://127.0.0.1:{upstream_port}"
    policy = {
        "tools": {
            "signal-cli": signal,
            "upstream": {"type": "http", "upstream": "http://127.0.0.1:{upstream_port}",
                         "timeout_secs": 30},
            "sse-app": {"type": "http", "upstream": f"http://127.0.0.1:{sse_app_port}",
                        "timeout_secs": 30},
        }
    }
    return yaml.safe_dump(policy, sort_keys=False)


@dataclass
class Tunnel:
    d: Deployment
    audit_log: Path
    sse_app: bool

    def url(self, tool: str, path: str) -> str:
        return self.d.url(path, tool)


@pytest.fixture(scope="session")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    tmp = tmp_path_factory.mktemp("interop")
    audit_log = tmp / "audit.jsonl"
    app_port = free_port()
    with _maybe_sse_app(app_port) as started, deployment(
        tmp, policy=interop_policy(app_port), tools=("signal-cli", "upstream", "sse-app"),
        server_args=["--audit-log", str(audit_log)], agent_args=AGENT_ARGS,
    ) as d:
        yield Tunnel(d=d, audit_log=audit_log, sse_app=started)


@contextlib.contextmanager
def _maybe_sse_app(port: int) -> Iterator[bool]:
    """Run tests/interop/sse_app.py under uvicorn when it is installed."""
    if not have_starlette():
        yield False
        return
    with running([sys.executable, str(HERE / "sse_app.py"), "--port", str(port)],
                 port=port, timeout=20):
        yield True


@pytest.fixture
def sse_app_tunnel(tunnel: Tunnel) -> Tunnel:
    skip_unless_starlette()
    assert tunnel.sse_app
    return tunnel
