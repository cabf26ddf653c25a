"""Injected secrets never reach the VM through an HTTP tool, end to end.

Real upstream, server and agent processes. The policy injects
``Authorization: Bearer <40-character token>``; the test upstream echoes it
back in a JSON body (``/echo``), in SSE events (``/echo-header-sse``), also
split across two events; a second upstream (a small stdlib server here)
answers gzip-compressed and with the secret in a response header. The local
client sees ``[REDACTED]`` and never the token, and events still arrive
when they are sent.
"""

from __future__ import annotations

import gzip
import json
import secrets
import string
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, deployment

TOKEN = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
SECRET = f"Bearer {TOKEN}"


class _Host(BaseHTTPRequestHandler):
    """A host service that compresses its answers and leaks a credential in a header."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        _Host.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"error": "invalid credentials", "got": SECRET}).encode()
        self.send_response(401 if self.path != "/br" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("WWW-Authenticate", f'Bearer realm="x", token="{TOKEN}"')
        if self.path == "/br":
            self.send_header("Content-Encoding", "br")
        else:
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    policy = f"""\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{{upstream_port}}"
    timeout_secs: 10
    headers_inject: {{Authorization: "{SECRET}"}}
  host:
    type: http
    upstream: "http://127.0.0.1:{host.server_address[1]}"
    timeout_secs: 10
"""
    try:
        with deployment(tmp_path_factory.mktemp("masking"), policy=policy,
                        tools=("signal-cli", "host")) as d:
            yield d
            assert d.server is not None and d.agent is not None
            assert TOKEN not in d.server.stderr_text() + d.agent.stderr_text()
    finally:
        host.shutdown()


def no_token_fragment(text: str) -> bool:
    """Not even 8 consecutive characters of the token."""
    return not any(TOKEN[i:i + 8] in text for i in range(len(TOKEN) - 7))


def events_of(r: httpx.Response) -> list[Event]:
    parser = SseParser()
    items = [*parser.feed(b"".join(r.iter_raw())), *parser.close()]
    return [e for e in items if isinstance(e, Event)]


def test_echoed_authorization_in_a_json_body(dep: Deployment) -> None:
    r = httpx.get(dep.url("/echo"), headers={"Accept-Encoding": "gzip, br"})
    assert r.status_code == 200
    seen = {k.lower(): v for k, v in r.json()["headers"]}  # still valid JSON
    assert seen["authorization"] == "[REDACTED]"
    assert seen["accept-encoding"] == "identity"  # asked uncompressed, to be scrubbable
    assert "content-length" not in r.headers  # the length changed: chunked instead
    assert no_token_fragment(r.text)


def test_echoed_authorization_in_sse_events(dep: Deployment) -> None:
    with httpx.stream("GET", dep.url("/echo-header-sse?name=Authorization"), timeout=10) as r:
        assert r.status_code == 200
        events = events_of(r)
    values = [json.loads(e.data or "{}")["value"] for e in events]
    assert values == ["[REDACTED]"] * 3
    assert all(no_token_fragment(e.data or "") for e in events)


@pytest.mark.parametrize("cut", [3, 9, 27, 45])
def test_a_secret_split_across_two_sse_events(dep: Deployment, cut: int) -> None:
    # The upstream sends SECRET[:cut] as event 1's data and SECRET[cut:] as event 2's.
    url = dep.url(f"/echo-header-sse?name=Authorization&split={cut}&interval_ms=30")
    with httpx.stream("GET", url, timeout=10) as r:
        events = events_of(r)
    assert [e.id for e in events] == ["1", "2", "3"]
    shown = (events[0].data or "") + (events[1].data or "")
    assert "[REDACTED]" in shown
    assert no_token_fragment(shown), shown
    assert TOKEN[3:] not in shown.replace("[REDACTED]", "")


def test_events_are_not_held_back(dep: Deployment) -> None:
    """Masking adds no wait: each event arrives when it is sent, not with the next one."""
    late = []
    with httpx.stream("GET", dep.url("/sse?count=4&interval_ms=400"), timeout=10) as r:
        parser = SseParser()
        for chunk in r.iter_raw():
            now = time.time()
            for item in parser.feed(chunk):
                if isinstance(item, Event) and item.data:
                    late.append(now - json.loads(item.data)["ts"])
    assert len(late) == 4
    assert max(late) < 0.25, late  # the next event is 400 ms away


def test_compressed_answer_and_response_headers(dep: Deployment) -> None:
    """A host service that ignores Accept-Encoding: identity is decoded and scrubbed; the
    secret of one tool is masked in every tool's answers (here in a header too)."""
    r = httpx.get(dep.url("/gz", "host"), headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 401
    assert _Host.seen[-1]["accept-encoding"] == "identity"
    assert "content-encoding" not in r.headers
    assert r.json() == {"error": "invalid credentials", "got": "[REDACTED]"}
    assert r.headers["www-authenticate"] == 'Bearer realm="x", token="[REDACTED]"'
    assert no_token_fragment(r.text + json.dumps(dict(r.headers)))


def test_an_encoding_that_cannot_be_scrubbed_is_refused(dep: Deployment) -> None:
    r = httpx.get(dep.url("/br", "host"))
    assert r.status_code == 502
    assert "cannot check for secrets" in r.text
    assert no_token_fragment(r.text + json.dumps(dict(r.headers)))

