"""A tiny MCP server over Streamable HTTP for the tests (standard library only).

``python -I mcp_http_server.py PORT LOG [--sse]``: serves ``POST /mcp`` with
the tools, resources and prompts of :mod:`mcp_server` (the stdio one), JSON
answers (or, with ``--sse``, each answer as an event stream), an
``Mcp-Session-Id`` on the answer to ``initialize``, 202 for notifications,
405 for GET and 200 for DELETE. ``print_secret`` answers with the
``Authorization`` header it was sent (what the host policy injects). Every
request appends a line to LOG: its method, the MCP method and tool, and
whether an Authorization header came, so a test can show what reached it.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # after the stdlib: operator.py is here

import mcp_server

SESSION = "carapace-test-session-1"


class Handler(BaseHTTPRequestHandler):
    sse = False
    log_path = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _log(self, what: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{self.command} {what} auth={self.headers.get('Authorization')!r}\n")

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json",
              session: bool = False) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", ctype)
        if session:
            self.send_header("Mcp-Session-Id", SESSION)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        method = msg.get("method")
        params = msg.get("params") or {}
        self._log(f"{method} {params.get('name') or params.get('uri') or ''}".strip())
        if "id" not in msg or not isinstance(method, str):
            return None
        if method == "tools/call" and params.get("name") == "print_secret":
            result = mcp_server._text(f"auth was {self.headers.get('Authorization')}")
        else:
            try:
                result = mcp_server._answer(method, params)
            except KeyError:
                return {"jsonrpc": "2.0", "id": msg["id"],
                        "error": {"code": -32601, "message": f"method not found: {method}"}}
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        msgs = doc if isinstance(doc, list) else [doc]
        answers = [a for a in (self._answer(m) for m in msgs) if a is not None]
        first = msgs[0].get("method") if msgs and isinstance(msgs[0], dict) else None
        if not answers:
            self._send(202)
            return
        out: Any = answers if isinstance(doc, list) else answers[0]
        if self.sse:
            progress = {"jsonrpc": "2.0", "method": "notifications/message",
                        "params": {"level": "info", "data": "working"}}
            body = (f"event: message\ndata: {json.dumps(progress)}\n\n"
                    f"id: 1\nevent: message\ndata: {json.dumps(out)}\n\n").encode()
            self._send(200, body, "text/event-stream", session=first == "initialize")
        else:
            self._send(200, json.dumps(out).encode(), session=first == "initialize")

    def do_GET(self) -> None:
        self._log("GET-stream")
        self._send(405)

    def do_DELETE(self) -> None:
        self._log("DELETE-session")
        self._send(200)


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    Handler.sse = "--sse" in sys.argv
    Handler.log_path = log_path
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
