"""What the server sends upstream and what a compressed answer becomes, end to end.

The server's upstream client adds nothing the VM's client did not send (no
``User-Agent``, no ``Accept-Encoding``), relays a compressed body as it is,
and decodes a compressed event stream to parse it — or refuses one it cannot
decode. The host service here is a small stdlib server.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, deployment

STREAM = b"".join(b"id: %d\ndata: event %d\n\n" % (i, i) for i in range(1, 4))
JSON = json.dumps({"ok": True, "pad": "x" * 200}).encode()
JSON_GZ = gzip.compress(JSON, mtime=0)


class _Host(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/headers":
            self._answer("application/json", None, json.dumps(self.headers.items()).encode())
        elif self.path == "/json-gzip":
            self._answer("application/json", "gzip", JSON_GZ)
        elif self.path == "/sse-gzip":
            self._answer("text/event-stream", "gzip", gzip.compress(STREAM))
        elif self.path == "/sse-deflate":
            self._answer("text/event-stream", "deflate", zlib.compress(STREAM))
        elif self.path == "/sse-br":
            self._answer("text/event-stream", "br", b"\x0b\x02\x80not really brotli")
        else:
            self.send_error(404)

    def _answer(self, content_type: str, encoding: str | None, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
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
  host:
    type: http
    upstream: "http://127.0.0.1:{host.server_address[1]}"
    timeout_secs: 10
"""
    try:
        with deployment(tmp_path_factory.mktemp("encoding"), policy=policy,
                        tools=("host",)) as d:
            yield d
    finally:
        host.shutdown()


def raw_get(url: str, path: str) -> bytes:
    """A request with nothing but Host: what the upstream gets is what the server adds."""
    parts = httpx.URL(url)
    with socket.create_connection((parts.host, parts.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_nothing_is_added_to_the_request(dep: Deployment) -> None:
    raw = raw_get(dep.url("/", "host"), "/headers")
    assert raw.startswith(b"HTTP/1.1 200")
    body = raw.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in raw.split(b"\r\n\r\n", 1)[0].lower():
        size, rest = body.split(b"\r\n", 1)
        body = rest[: int(size, 16)]
    names = [name.lower() for name, _ in json.loads(body)]
    assert "user-agent" not in names and "accept-encoding" not in names
    assert names.count("host") == 1


def test_a_compressed_body_is_relayed_as_it_is(dep: Deployment) -> None:
    with httpx.stream("GET", dep.url("/json-gzip", "host"),
                      headers={"Accept-Encoding": "gzip"}, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert b"".join(r.iter_raw()) == JSON_GZ
    r = httpx.get(dep.url("/json-gzip", "host"), headers={"Accept-Encoding": "gzip"},
                  timeout=10)
    assert r.json()["ok"] is True  # httpx undid the gzip: the bytes arrived untouched


@pytest.mark.parametrize("path", ["/sse-gzip", "/sse-deflate"])
def test_a_compressed_event_stream_is_decoded_to_be_parsed(dep: Deployment, path: str) -> None:
    with httpx.stream("GET", dep.url(path, "host"), timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in r.headers
        body = b"".join(r.iter_raw())
    parser = SseParser()
    got = [e for e in [*parser.feed(body), *parser.close()] if isinstance(e, Event)]
    assert [(e.id, e.data) for e in got] == [("1", "event 1"), ("2", "event 2"),
                                             ("3", "event 3")]


def test_an_event_stream_in_an_unknown_encoding_is_refused(dep: Deployment) -> None:
    r = httpx.get(dep.url("/sse-br", "host"), timeout=10)
    assert r.status_code == 502
    assert "cannot read" in r.json()["message"]
