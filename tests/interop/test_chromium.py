"""A real browser: headless Chromium's EventSource through the agent.

The page is loaded through the agent too (same origin as the stream, as a web
app behind the agent would be), and it reports every ``open``, ``message`` and
``error`` over the DevTools protocol as it happens. Chromium must reconnect
with ``Last-Event-ID`` when the agent restarts mid-stream and when the upstream
(sse-starlette) ends each connection, and see every id exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import AGENT_ARGS, Tunnel, skip_unless_chromium
from .support import (
    Chromium,
    assert_resumed_without_gaps,
    message_at_least,
    message_with_id,
    restart_agent,
    start_browser_eventsource,
)

pytestmark = pytest.mark.interop

LAST = 12


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    exe = skip_unless_chromium()
    b = Chromium(exe, tmp_path / "profile")
    try:
        print(f"client: {b.version()}")
        yield b
    finally:
        print(b.output())
        b.close()


def test_chromium_eventsource_resumes_after_the_agent_restarts(
    tunnel: Tunnel, browser: Chromium
) -> None:
    browser.open_page(tunnel.url("upstream", "/echo"))
    start_browser_eventsource(browser, f"/sse?count={LAST}&interval_ms=100&retry=100", LAST)
    browser.log.wait_for(message_at_least(4))
    restart_agent(tunnel.d, AGENT_ARGS)
    browser.log.wait_for(message_with_id(LAST), timeout=30)
    assert_resumed_without_gaps(browser.log, LAST, min_opens=2)
    assert browser.log.count("error") >= 1


def test_chromium_eventsource_resumes_across_upstream_ended_streams(
    sse_app_tunnel: Tunnel, browser: Chromium
) -> None:
    browser.open_page(sse_app_tunnel.url("sse-app", "/"))
    start_browser_eventsource(browser, f"/sse?total={LAST}&per=4&interval_ms=50&retry=100",
                              LAST)
    browser.log.wait_for(message_with_id(LAST), timeout=30)
    assert_resumed_without_gaps(browser.log, LAST, min_opens=3)
    sent = {int(e["id"]): json.loads(e["data"])["last_event_id"]
            for e in browser.log.messages()}
    assert (sent[1], sent[5], sent[9]) == (None, "4", "8")
