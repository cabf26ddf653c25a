"""The npm `eventsource` package (a WHATWG EventSource for Node) through the agent.

Two ways a stream ends under a real client, both of which must resume with
``Last-Event-ID`` and lose or repeat nothing:

- the agent restarts mid-stream (an upgrade, ``systemctl restart carapace-agent``):
  it ends the stream cleanly on SIGTERM, the client reconnects to the new agent;
- the upstream ends each connection after a few events (sse-starlette app), so
  the client reconnects through the tunnel again and again.
"""

from __future__ import annotations

import json

import pytest

from .conftest import AGENT_ARGS, Tunnel, skip_unless_node_package
from .support import (
    assert_resumed_without_gaps,
    message_at_least,
    message_with_id,
    node_client,
    restart_agent,
)

pytestmark = pytest.mark.interop

LAST = 12


@pytest.fixture
def eventsource_version() -> str:
    return skip_unless_node_package("eventsource")


def test_eventsource_resumes_after_the_agent_restarts(
    tunnel: Tunnel, eventsource_version: str
) -> None:
    url = tunnel.url("upstream", f"/sse?count={LAST}&interval_ms=100&retry=100")
    with node_client("eventsource_client.mjs", [url, str(LAST)],
                     what=f"eventsource {eventsource_version}") as (log, _):
        version = log.wait_for(lambda e: e.get("type") == "version")
        print(f"client: eventsource {version['eventsource']} on node {version['node']}")
        log.wait_for(message_at_least(4))
        restart_agent(tunnel.d, AGENT_ARGS)
        log.wait_for(message_with_id(LAST), timeout=30)
        log.wait_for(lambda e: e.get("type") == "done")
    assert_resumed_without_gaps(log, LAST, min_opens=2)
    assert log.count("error") >= 1  # the end of the first stream, seen by the client


def test_eventsource_resumes_across_upstream_ended_streams(
    sse_app_tunnel: Tunnel, eventsource_version: str
) -> None:
    url = sse_app_tunnel.url("sse-app", f"/sse?total={LAST}&per=4&interval_ms=50&retry=100")
    with node_client("eventsource_client.mjs", [url, str(LAST)],
                     what=f"eventsource {eventsource_version}") as (log, _):
        log.wait_for(message_with_id(LAST), timeout=30)
    assert_resumed_without_gaps(log, LAST, min_opens=3)
    sent = {int(e["id"]): json.loads(e["data"])["last_event_id"] for e in log.messages()}
    # What the client sent on each (re)connection, as the upstream received it.
    assert (sent[1], sent[5], sent[9]) == (None, "4", "8")
