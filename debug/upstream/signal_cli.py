"""The test upstream's signal-cli look-alike: its JSON-RPC endpoint, health check and events.

Shaped like signal-cli's HTTP daemon, the service the demo and the policy
examples put behind the tunnel: JSON-RPC errors are answered with HTTP 200,
and events arrive as ``event: receive`` with a message envelope.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .http import Request, Responder
from .sse import sse_block, stream_events
from .state import Upstream

FAKE_VERSION = "0.13.x-fake"
SENDER = "+15559999999"
"""The number every fake incoming message comes from."""


def jsonrpc_error(code: int, message: str, id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id}


def _rpc_one(up: Upstream, call: Any) -> dict[str, Any] | None:
    """The answer to one call of a request or batch; None for a notification."""
    if not isinstance(call, dict) or call.get("jsonrpc") != "2.0":
        return jsonrpc_error(-32600, "Invalid Request")
    method = call.get("method")
    if not isinstance(method, str):
        return jsonrpc_error(-32600, "Invalid Request", call.get("id"))
    up.stats.rpc_calls[method] += 1
    params = call.get("params") or {}
    result: Any
    if method == "version":
        result = {"version": FAKE_VERSION}
    elif method == "send":
        recipients = params.get("recipient", []) if isinstance(params, dict) else []
        if isinstance(recipients, str):
            recipients = [recipients]
        result = {
            "timestamp": int(time.time() * 1000),
            "results": [
                {"recipientAddress": {"number": r}, "type": "SUCCESS"}
                for r in recipients
                if isinstance(r, str)
            ],
        }
    elif method == "listAccounts":
        result = [{"number": up.account}]
    else:
        return jsonrpc_error(-32601, "Method not found", call.get("id"))
    if "id" not in call:
        return None  # a notification gets no answer
    return {"jsonrpc": "2.0", "result": result, "id": call["id"]}


async def rpc(up: Upstream, req: Request, resp: Responder) -> None:
    """``POST /api/v1/rpc``: JSON-RPC 2.0, one call or a batch."""
    try:
        payload = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        await resp.json(200, jsonrpc_error(-32700, "Parse error"))
        return
    if isinstance(payload, list):
        if not payload:
            await resp.json(200, jsonrpc_error(-32600, "Invalid Request"))
            return
        answers = [a for a in (_rpc_one(up, c) for c in payload) if a is not None]
        if answers:
            await resp.json(200, answers)
        else:
            await resp.full(200, b"")
        return
    answer = _rpc_one(up, payload)
    if answer is None:
        await resp.full(200, b"")
    else:
        await resp.json(200, answer)


async def check(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /api/v1/check``: 200, empty body."""
    await resp.full(200, b"")


async def events(up: Upstream, req: Request, resp: Responder) -> None:
    """``GET /api/v1/events``: [account, interval_ms=1000, count=inf] incoming messages."""
    account = req.q_str("account") or up.account
    count = req.q_count("count", None)
    interval = req.q_ms("interval_ms", 1000.0)

    def block(n: int) -> bytes:
        ts = time.time()
        ms = int(ts * 1000)
        envelope = {
            "source": SENDER,
            "sourceNumber": SENDER,
            "sourceUuid": "00000000-0000-4000-8000-000000000001",
            "sourceName": "Fake Sender",
            "sourceDevice": 1,
            "timestamp": ms,
            "serverReceivedTimestamp": ms,
            "serverDeliveredTimestamp": ms,
            "dataMessage": {
                "timestamp": ms,
                "message": f"fake message {n}",
                "expiresInSeconds": 0,
                "viewOnce": False,
            },
        }
        data = {"envelope": envelope, "account": account, "seq": n, "ts": ts}
        return sse_block(data=json.dumps(data), id=str(n), event="receive")

    await stream_events(
        up, resp, block, first=req.last_event_id() + 1, count=count, interval_ms=interval
    )
