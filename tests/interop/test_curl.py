"""curl -N through the agent: events arrive one by one, while the stream is still open.

curl is the first thing an operator reaches for, and it does no SSE parsing:
what it prints is exactly the bytes the agent wrote, the moment they arrive.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from .conftest import Tunnel, skip_unless_starlette

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("curl") is None,
                       reason="curl is not installed (apt-get install curl)"),
]

COUNT = 5
INTERVAL_MS = 300


@dataclass
class CurlRun:
    lines: list[tuple[float, str]]
    """(arrival time, line) for every line curl printed."""
    ended: float
    """When curl saw the end of the response (it exited)."""
    headers: dict[str, str]
    returncode: int

    def ids(self) -> list[tuple[float, int]]:
        return [(t, int(line[3:].strip())) for t, line in self.lines if line.startswith("id:")]


def curl_stream(url: str, *extra: str, timeout: float = 20) -> CurlRun:
    proc = subprocess.Popen(
        ["curl", "--silent", "--show-error", "--no-buffer", "--dump-header", "/dev/stderr",
         "--max-time", str(timeout), *extra, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    watchdog = threading.Timer(timeout + 5, proc.kill)
    watchdog.start()
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.monotonic(), raw.decode().removesuffix("\n")))
        ended = time.monotonic()
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.stderr is not None
    head = proc.stderr.read().decode("latin-1")
    headers = {}
    for line in head.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return CurlRun(lines, ended, headers, proc.returncode)


def _stream_url(tunnel: Tunnel, upstream: str, count: int) -> str:
    if upstream == "sse-starlette":
        skip_unless_starlette()
        return tunnel.url("sse-app", f"/sse?total={count}&interval_ms={INTERVAL_MS}")
    return tunnel.url("upstream", f"/sse?count={count}&interval_ms={INTERVAL_MS}")


@pytest.mark.parametrize("upstream", ["built-in", "sse-starlette"])
def test_curl_sees_each_event_before_the_stream_ends(tunnel: Tunnel, upstream: str) -> None:
    run = curl_stream(_stream_url(tunnel, upstream, COUNT))
    assert run.returncode == 0, run
    ids = run.ids()
    assert [n for _, n in ids] == list(range(1, COUNT + 1))
    first, last = ids[0][0], ids[-1][0]
    # The upstream spaces events INTERVAL_MS apart: the span survives the tunnel,
    # and the first event was printed long before curl saw the end of the stream.
    spread = (COUNT - 1) * INTERVAL_MS / 1000
    assert last - first > spread * 0.6, f"events arrived together: {ids}"
    assert run.ended - first > spread * 0.6, f"first event only at the end: {ids}"
    assert run.headers["content-type"].startswith("text/event-stream")
    assert run.headers["cache-control"] == "no-cache"
    assert run.headers["x-accel-buffering"] == "no"
    for _, line in run.lines:
        assert not line.endswith("\r"), "the agent re-serialises events with LF line ends"


@pytest.mark.parametrize("upstream", ["built-in", "sse-starlette"])
def test_curl_last_event_id_resumes_the_stream(tunnel: Tunnel, upstream: str) -> None:
    run = curl_stream(_stream_url(tunnel, upstream, 6), "--header", "Last-Event-ID: 3")
    assert run.returncode == 0, run
    assert [n for _, n in run.ids()] == [4, 5, 6]
    if upstream == "sse-starlette":
        data = [json.loads(line[5:]) for _, line in run.lines if line.startswith("data:")]
        assert data[0]["last_event_id"] == "3"


def test_curl_jsonrpc_allowed_and_denied(tunnel: Tunnel) -> None:
    url = tunnel.url("signal-cli", "/api/v1/rpc")
    ok = subprocess.run(
        ["curl", "--silent", "--show-error", "--header", "Content-Type: application/json",
         "--data", '{"jsonrpc":"2.0","id":1,"method":"version"}',
         "--write-out", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=20, check=True,
    )
    body, status = ok.stdout.rsplit("\n", 1)
    assert status == "200" and "result" in json.loads(body)
    denied = subprocess.run(
        ["curl", "--silent", "--header", "Content-Type: application/json",
         "--data", '{"jsonrpc":"2.0","id":2,"method":"removeAccount"}',
         "--write-out", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=20, check=True,
    )
    body, status = denied.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body)["error"] == "denied"
    stats = httpx.get(f"{tunnel.d.upstream_url}/stats", timeout=5).json()
    assert "removeAccount" not in stats["rpc_calls"]
