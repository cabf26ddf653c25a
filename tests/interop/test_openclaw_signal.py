"""OpenClaw's Signal channel (npm @openclaw/signal) against signal-cli through the agent.

The package's own HTTP client runs unchanged -- the ``signalCheck``,
``signalRpcRequest`` and ``streamSignalEvents`` its probe, send and monitor
code call, with its line-based SSE parser -- against ``--expose signal-cli=...``
under the policy of examples/policies/signal-cli.yaml. Only the OpenClaw
host's generic SDK helpers (timeouts, error text, a UUID) are stand-ins
(clients/openclaw-sdk/), because they ship with the whole OpenClaw application.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers.jsonlines import read_records

from .conftest import Tunnel, skip_unless_node_package
from .support import node_client

pytestmark = pytest.mark.interop

ACCOUNT = "+15550100"
EVENTS_PER_ROUND = 2


def test_openclaw_signal_channel_through_the_agent(tunnel: Tunnel) -> None:
    version = skip_unless_node_package("@openclaw/signal")
    upstream = tunnel.d.upstream_url
    httpx.post(f"{upstream}/stats/reset", timeout=5)
    base_url = tunnel.url("signal-cli", "")
    with node_client("openclaw_signal.mjs", [base_url, ACCOUNT, str(EVENTS_PER_ROUND)],
                     what=f"@openclaw/signal {version}",
                     node_args=["--import", "./clients/openclaw-sdk/register.mjs"]) as (log, _):
        log.wait_for(lambda e: e.get("type") == "done", timeout=40)
    by_type: dict[str, list[dict]] = {}
    for e in log.events:
        by_type.setdefault(e["type"], []).append(e)
    print("client:", by_type["version"][0])

    # The probe: GET /api/v1/check, then the daemon's version over JSON-RPC.
    check = by_type["check"][0]
    assert check["ok"] is True and check["status"] == 200, check
    rpcs = {(e["method"], i): e for i, e in enumerate(by_type["rpc"] + by_type["rpc_error"])}
    version_call = next(e for (m, _), e in rpcs.items() if m == "version")
    assert version_call["type"] == "rpc" and version_call["result"], version_call

    # Sending: the allowed recipient goes through and returns signal-cli's timestamp;
    # the call that smuggles a +44 number past the first element is refused, and so
    # is a method the policy does not list. Neither reaches signal-cli.
    sends = [e for e in log.events if e.get("method") == "send"]
    assert sends[0]["type"] == "rpc" and "timestamp" in sends[0]["result"], sends[0]
    assert sends[1]["type"] == "rpc_error", sends[1]
    print("a denied send, as OpenClaw reports it:", sends[1]["message"])
    accounts = next(e for e in log.events if e.get("method") == "listAccounts")
    assert accounts["type"] == "rpc_error", accounts
    stats = httpx.get(f"{upstream}/stats", timeout=5).json()
    assert stats["rpc_calls"].get("send") == 1, stats["rpc_calls"]
    assert "listAccounts" not in stats["rpc_calls"]

    # The monitor's stream: events parsed by OpenClaw's own SSE parser, one by one
    # (the second arrives about a second after the first, while the stream stays
    # open), then the client aborts and the monitor opens a new stream.
    for round_ in (1, 2):
        opened = [e for e in by_type["open"] if e["round"] == round_]
        messages = [e for e in by_type["message"] if e["round"] == round_]
        assert len(opened) == 1 and len(messages) == EVENTS_PER_ROUND, log.events
        for m in messages:
            assert m["event"] == "receive"
            data = json.loads(m["data"])
            assert data["account"] == ACCOUNT and "envelope" in data
        gap = messages[1]["arrived"] - messages[0]["arrived"]
        assert gap > 0.5, f"events of round {round_} arrived together ({gap:.3f} s apart)"
        assert [e for e in by_type["aborted"] if e["round"] == round_], log.events

    # Aborting the stream in OpenClaw cancels the upstream request at once.
    deadline = time.monotonic() + 10
    while (open_streams := httpx.get(f"{upstream}/stats", timeout=5).json()["open_streams"]):
        assert time.monotonic() < deadline, f"{open_streams} upstream stream(s) still open"
        time.sleep(0.05)

    # The refused calls are in the audit trail, with the rule that refused them.
    records = read_records(tunnel.audit_log)
    denies = [r for r in records if r.get("tool") == "signal-cli" and r["decision"] == "deny"]
    rules = " ".join(str(r.get("rule")) for r in denies)
    assert "jsonrpc_param_filters.send" in rules and "listAccounts" in " ".join(
        str(r.get("reason")) for r in denies), denies
