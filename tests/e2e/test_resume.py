"""Nothing lost when the link drops: sessions resume and replay what was missed."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, deployment, free_port, start_agent
from helpers.forwarder import Forwarder
from helpers.procs import CapturedProcess, wait_until


@contextmanager
def agent_via_forwarder(d: Deployment, tmp: Path, *args: str
                        ) -> Iterator[tuple[Forwarder, CapturedProcess]]:
    """A second agent (``prober``) whose link runs through a forwarder we can cut."""
    forwarder = Forwarder(d.server_port)
    token = tmp / "prober-token"
    token.write_text(f"prober:{d.prober_token}\n")
    d.tool_ports = {"signal-cli": free_port()}
    agent = start_agent(d, ["--link-wait", "10", *args], server_port=forwarder.port,
                        token_file=token)
    try:
        yield forwarder, agent
    finally:
        agent.terminate()
        agent.wait()
        print(agent.output())
        forwarder.close()


def read_events(url: str, out: list[Event], done: threading.Event,
                connections: list[int]) -> None:
    parser = SseParser()
    try:
        with httpx.stream("GET", url, timeout=60) as r:
            for chunk in r.iter_raw():
                out.extend(e for e in parser.feed(chunk) if isinstance(e, Event))
            out.extend(e for e in parser.close() if isinstance(e, Event))
        connections.append(1)
    finally:
        done.set()


def test_sse_stream_survives_two_link_cuts_exactly_once_in_order(tmp_path: Path) -> None:
    with deployment(tmp_path) as d, agent_via_forwarder(d, tmp_path) as (forwarder, agent):
        events: list[Event] = []
        done = threading.Event()
        connections: list[int] = []
        reader = threading.Thread(target=read_events, args=(
            d.url("/sse?count=1000&interval_ms=10"), events, done, connections))
        reader.start()
        for cut_at in (200, 600):
            wait_until(lambda n=cut_at: len(events) >= n, 30, f"{cut_at} events")
            with forwarder.outage():
                # The outage lasts while events keep being produced upstream.
                time.sleep(2)  # the outage itself, not synchronisation
        done.wait(60)
        reader.join(5)
        ids = [int(e.id) for e in events if e.data is not None and e.id]
        assert ids == list(range(1, 1001)), f"{len(ids)} events, first gap near " + str(
            next((i for i, (a, b) in enumerate(itertools.pairwise(ids)) if b != a + 1),
                 None))
        assert connections == [1], "the local client had to reconnect"
        assert agent.stderr_text().count("resumed the session") >= 2, agent.output()


def test_killing_the_server_ends_local_streams_cleanly_and_fast(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        events: list[Event] = []
        done = threading.Event()
        reader = threading.Thread(target=read_events, args=(
            d.url("/sse-forever?interval_ms=20"), events, done, []))
        reader.start()
        wait_until(lambda: len(events) >= 3, 10, "the first events")
        assert d.server is not None
        d.server.kill()
        killed = time.monotonic()
        assert done.wait(10)
        assert time.monotonic() - killed < 2
        reader.join(5)


def test_session_not_resumed_after_grace_ends_streams_cleanly(tmp_path: Path) -> None:
    with deployment(tmp_path, server_args=["--resume-grace", "0.5"]) as d, \
            agent_via_forwarder(d, tmp_path) as (forwarder, agent):
        events: list[Event] = []
        done = threading.Event()
        connections: list[int] = []
        reader = threading.Thread(target=read_events, args=(
            d.url("/sse-forever?interval_ms=20"), events, done, connections))
        reader.start()
        wait_until(lambda: len(events) >= 3, 10, "the first events")
        with forwarder.outage():
            wait_until(lambda: "did not come back" in d.server.stderr_text(),  # type: ignore[union-attr]
                       10, "the server to give up on the session")
        # Back online: the server cannot resume, so the agent ends the stream cleanly.
        assert done.wait(15), agent.output()
        reader.join(5)
        assert connections == [1]
        assert "could not resume" in agent.stderr_text()
        # New requests work on the new session.
        assert httpx.get(d.url("/api/v1/check"), timeout=10).status_code == 200
