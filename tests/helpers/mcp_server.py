"""A tiny stdio MCP server for the tests: newline-delimited JSON-RPC on stdin/stdout.

Implements ``initialize``, ``ping``, ``tools/list``, ``tools/call``,
``resources/list``, ``resources/read``, ``prompts/list`` and ``prompts/get``
well enough for the official MCP SDK's client. Its tools:

- ``get_time``: a fixed text; ``echo``: returns ``arguments.text``;
- ``print_secret``: returns the value of ``$CARAPACE_TEST_TOKEN`` (what the
  host policy injects), so a test can show that it is masked;
- ``delete_everything``: what a policy denies; ``sleep``: answers after
  ``arguments.seconds``; ``big``: ``arguments.bytes`` of text in one line.

Every request it receives is appended to ``$MCP_TEST_LOG`` (one method and
tool name per line) when that is set, so a test can show a denied call never
reached the server. Standard library only; run as ``python -I mcp_server.py`` (``-I``:
this folder has an ``operator.py`` that would shadow the standard module).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

TOOLS = ["get_time", "echo", "print_secret", "delete_everything", "sleep", "big"]
RESOURCES = ["file:///public/readme.txt", "file:///private/keys.txt"]
PROMPTS = ["greet", "exfiltrate"]
_lock = threading.Lock()


def _log(method: str, name: str | None) -> None:
    path = os.environ.get("MCP_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{method} {name or ''}\n")


def _send(msg: dict[str, Any]) -> None:
    with _lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def _call_tool(params: dict[str, Any]) -> dict[str, Any]:
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "get_time":
        return _text("2026-01-01T00:00:00Z")
    if name == "echo":
        return _text(str(args.get("text", "")))
    if name == "print_secret":
        return _text("the token is " + os.environ.get("CARAPACE_TEST_TOKEN", "(unset)"))
    if name == "delete_everything":
        return _text("everything deleted")
    if name == "sleep":
        time.sleep(float(args.get("seconds", 1)))
        return _text("slept")
    if name == "big":
        return _text("x" * int(args.get("bytes", 1000)))
    return {"content": [{"type": "text", "text": f"no tool {name}"}], "isError": True}


def _answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "initialize":
        return {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                "capabilities": {"tools": {"listChanged": True}, "resources": {},
                                 "prompts": {}},
                "serverInfo": {"name": "carapace-test-mcp", "version": "1.0"}}
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": [{"name": n, "description": f"test tool {n}",
                           "inputSchema": {"type": "object", "properties": {}}}
                          for n in TOOLS]}
    if method == "tools/call":
        return _call_tool(params)
    if method == "resources/list":
        return {"resources": [{"uri": u, "name": u.rsplit("/", 1)[1]} for u in RESOURCES]}
    if method == "resources/read":
        uri = params.get("uri")
        return {"contents": [{"uri": uri, "mimeType": "text/plain", "text": f"content of {uri}"}]}
    if method == "prompts/list":
        return {"prompts": [{"name": n, "description": f"prompt {n}"} for n in PROMPTS]}
    if method == "prompts/get":
        return {"messages": [{"role": "user", "content": {
            "type": "text", "text": f"prompt {params.get('name')}"}}]}
    raise KeyError(method)


def _handle(msg: dict[str, Any]) -> None:
    method = msg.get("method")
    if not isinstance(method, str):
        return  # a response to something we never ask
    params = msg.get("params") or {}
    _log(method, params.get("name") or params.get("uri"))
    if "id" not in msg:
        return  # notifications: nothing to answer
    try:
        _send({"jsonrpc": "2.0", "id": msg["id"], "result": _answer(method, params)})
    except KeyError:
        _send({"jsonrpc": "2.0", "id": msg["id"],
               "error": {"code": -32601, "message": f"method not found: {method}"}})


def main() -> None:
    if "--announce" in sys.argv:  # a notification before anything is asked
        _send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    for line in sys.stdin:
        if not line.strip():
            continue
        doc = json.loads(line)
        for msg in doc if isinstance(doc, list) else [doc]:
            if msg.get("method") == "tools/call" and (msg.get("params") or {}).get(
                    "name") == "sleep":
                threading.Thread(target=_handle, args=(msg,), daemon=True).start()
            else:
                _handle(msg)


if __name__ == "__main__":
    main()
