"""Graceful shutdown: SIGTERM drains in-flight requests and ends event streams cleanly."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx

from helpers.deployment import Deployment, deployment
from helpers.procs import CapturedProcess, wait_until


def stream_until_end(url: str, result: dict[str, object]) -> None:
    """Read an SSE response to its end; record whether it ended cleanly."""
    try:
        with httpx.stream("GET", url, timeout=30) as r:
            result["status"] = r.status_code
            result["body"] = b"".join(r.iter_raw())
            result["clean"] = True
    except httpx.HTTPError as exc:
        result["clean"] = False
        result["error"] = repr(exc)


def both_in_flight(upstream: str) -> bool:
    stats = httpx.get(upstream + "/stats").json()
    return bool(stats["open_streams"] >= 1 and stats["paths"].get("/slow", 0) >= 1)


def sigterm_mid_flight(d: Deployment, proc: CapturedProcess, slow_ms: int
                       ) -> tuple[dict[str, object], httpx.Response]:
    """An endless event stream and a slow request in flight; SIGTERM ``proc``; both results."""
    sse: dict[str, object] = {}
    slow: dict[str, httpx.Response] = {}
    t_sse = threading.Thread(target=stream_until_end,
                             args=(d.url("/sse-forever?interval_ms=20"), sse))
    t_sse.start()
    t_slow = threading.Thread(target=lambda: slow.update(
        r=httpx.get(d.url(f"/slow?delay_ms={slow_ms}"), timeout=30)))
    t_slow.start()
    wait_until(lambda: both_in_flight(d.upstream_url), 10, "both requests to reach the upstream")
    proc.send_signal(signal.SIGTERM)
    t_sse.join(10)
    t_slow.join(10)
    return sse, slow["r"]


def test_server_sigterm_drains_requests_and_ends_streams_cleanly(tmp_path: Path) -> None:
    with deployment(tmp_path, server_args=["--drain-timeout", "5"]) as d:
        assert d.server is not None
        sse, slow = sigterm_mid_flight(d, d.server, 1500)
        assert sse.get("clean") is True, sse
        assert b"id: 1" in sse["body"]  # type: ignore[operator]
        assert slow.status_code == 200
        assert d.server.wait(10) == 0
        assert "shutting down" in d.server.stderr_text()


def test_agent_sigterm_ends_local_streams_cleanly_and_exits(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        assert d.agent is not None
        sse, slow = sigterm_mid_flight(d, d.agent, 1000)
        assert sse.get("clean") is True, sse
        assert slow.status_code == 200
        assert d.agent.wait(10) == 0
        # The upstream's event stream was cancelled, not left running.
        wait_until(lambda: httpx.get(d.upstream_url + "/stats").json()["open_streams"] == 0,
                   5, "the upstream stream to be cancelled")
