"""health, connections and /metrics against a running server: real counters that move."""

from __future__ import annotations

import json
import re
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from carapace.protocol.messages import CliRequest, HttpRequest, Ping, RequestFailed
from helpers.deployment import Deployment, rpc
from helpers.operator import debug_url, get_json
from helpers.procs import free_port, poll, run_debug
from helpers.rawlink import RawLink


def metrics(d: Deployment) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(debug_url(d, "/metrics"), timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_counters_move_with_traffic(dep: Deployment) -> None:
    before = json.loads(run_debug("health", "--json", "--debug",
                                  f"127.0.0.1:{dep.debug_port}").stdout)
    assert before["status"] == "ok"
    assert before["agents_connected"] >= 1 and "default" in before["agents"]
    assert before["uptime_s"] > 0
    assert rpc(dep, "version").status_code == 200
    assert rpc(dep, "deleteAccount").status_code == 403
    # a raw connection that is not an agent: one handshake failure
    with socket.create_connection(("127.0.0.1", dep.server_port)) as s:
        s.sendall(b"\x00\x00\x00\x03abc")
        s.settimeout(5)
        while s.recv(4096):
            pass
    result = run_debug("health", "--json", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert result.returncode == 0, result.stderr
    after = json.loads(result.stdout)
    assert after["requests"]["http"]["allow"] == before["requests"]["http"]["allow"] + 1
    assert after["requests"]["http"]["deny"] == before["requests"]["http"]["deny"] + 1
    assert after["denied_total"] == before["denied_total"] + 1
    assert after["handshake_failures"] == before["handshake_failures"] + 1
    assert after["frames_in"] >= before["frames_in"] + 2
    assert after["frames_out"] >= before["frames_out"] + 2  # http_response, failed
    assert after["connections_total"] == before["connections_total"] + 1
    assert after["policy"]["tools"] == ["signal-cli"]

    table = run_debug("health", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert table.returncode == 0
    assert "status" in table.stdout and "ok" in table.stdout
    assert f"{after['requests']['http']['deny']} denied" in table.stdout


def test_metrics_move_with_traffic(dep: Deployment) -> None:
    before = metrics(dep)
    assert value(before, "carapace_agents_connected") >= 1
    assert rpc(dep, "version").status_code == 200
    assert rpc(dep, "deleteAccount").status_code == 403
    r = httpx.get(dep.url("/sse?count=3&interval_ms=10"), timeout=10)
    assert r.text.count("data:") == 3
    after = poll(lambda: (m := metrics(dep)) and value(
        m, "carapace_sse_events_total") >= value(before, "carapace_sse_events_total") + 3 and m,
        what="sse events counted")
    labels = {"kind": "http", "agent": "default", "tool": "signal-cli"}
    assert value(after, "carapace_requests_total", decision="allow", **labels) == value(
        before, "carapace_requests_total", decision="allow", **labels) + 2
    assert value(after, "carapace_requests_total", decision="deny", **labels) == value(
        before, "carapace_requests_total", decision="deny", **labels) + 1
    assert value(after, "carapace_denials_total", **labels) == value(
        before, "carapace_denials_total", **labels) + 1
    assert value(after, "carapace_event_latency_seconds_count") == value(
        before, "carapace_event_latency_seconds_count") + 3
    assert value(after, "carapace_event_latency_seconds_sum") > 0
    for direction in ("in", "out"):
        assert value(after, "carapace_frame_bytes_total", direction=direction) > value(
            before, "carapace_frame_bytes_total", direction=direction)
    assert value(after, "carapace_frames_total", direction="in", type="http_request") == value(
        before, "carapace_frames_total", direction="in", type="http_request") + 3
    # Three events: three sse_event frames, or fewer if two reached the server in one
    # read (then they share an sse_events frame).
    event_frames = sum(
        value(after, "carapace_frames_total", direction="out", type=kind)
        - value(before, "carapace_frames_total", direction="out", type=kind)
        for kind in ("sse_event", "sse_events"))
    assert 1 <= event_frames <= 3
    assert ("carapace_inflight_streams", (("agent", "default"),)) in after


def test_metrics_count_invented_tools_under_one_label(dep: Deployment) -> None:
    """An agent may name any tool; the label set must not grow with what it invents."""
    link = RawLink(dep.server_port)
    try:
        link.handshake("prober", dep.prober_token.encode())
        for i in range(1, 4):
            link.send(HttpRequest(id=i, tool=f"invented-{i}", method="GET", target="/",
                                  headers=(), body=b""))
            reply = link.receive()
            while isinstance(reply, Ping):
                reply = link.receive()
            assert isinstance(reply, RequestFailed) and reply.status in (403, 404)
        link.send(CliRequest(id=10, tool="invented-cli", argv=(b"--version",), cwd=b"/",
                             env=(), tty=(False, False, False)))
        reply = link.receive()
        while isinstance(reply, Ping):
            reply = link.receive()
        assert isinstance(reply, RequestFailed)
    finally:
        link.close()
    after = metrics(dep)
    tools = {dict(k[1]).get("tool") for k in after if k[0] == "carapace_requests_total"}
    assert tools <= {"signal-cli", "(unknown)"}
    assert value(after, "carapace_denials_total", kind="http", agent="prober",
                 tool="(unknown)") >= 3
    assert value(after, "carapace_requests_total", kind="cli", decision="deny",
                 agent="prober", tool="(unknown)") >= 1


def test_connections_lists_the_agent(dep: Deployment) -> None:
    assert rpc(dep, "version").status_code == 200
    result = run_debug("connections", "--json", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    (agent,) = [a for a in doc["agents"] if a["name"] == "default"]
    assert agent["address"].startswith("127.0.0.1:")
    assert agent["protocol_version"] == 1
    assert agent["bytes_in"] > 0 and agent["bytes_out"] > 0
    assert agent["frames_in"] > 0 and agent["frames_out"] > 0
    assert agent["open_streams"] == 0
    assert agent["connected_since"].endswith("Z")
    table = run_debug("connections", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert table.returncode == 0
    assert "default" in table.stdout and "127.0.0.1:" in table.stdout


def test_connections_watch_refreshes(dep: Deployment) -> None:
    from helpers.jsonlines import json_lines
    from helpers.procs import script, start_process, stop_process

    proc = start_process([script("carapace-debug"), "connections", "--watch", "0.2", "--json",
                          "--debug", f"127.0.0.1:{dep.debug_port}"])
    try:
        lines = poll(lambda: len(json_lines(proc)) >= 2 and json_lines(proc), what="2 refreshes")
        assert all(line["agents"][0]["name"] == "default" for line in lines)
    finally:
        stop_process(proc)


def test_health_and_connections_lead_with_a_sentence(dep: Deployment) -> None:
    """The words the Rust Carapace's users look for come first; --json stays as it was."""
    health = run_debug("health", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert health.returncode == 0, health.stderr
    first = health.stdout.splitlines()[0]
    assert first.startswith("Server is healthy (carapace-server "), first
    # Other tests' raw links may leave a session waiting to resume: default is one of them.
    assert f"at 127.0.0.1:{dep.debug_port}" in first
    assert re.search(r", \d+ agents? connected: (\S+, )*default\b", first), first
    doc = json.loads(run_debug("health", "--json", "--debug",
                               f"127.0.0.1:{dep.debug_port}").stdout)
    assert doc["status"] == "ok" and "Server" not in json.dumps(doc)

    table = run_debug("connections", "--debug", f"127.0.0.1:{dep.debug_port}")
    assert table.returncode == 0, table.stderr
    assert table.stdout.lstrip().startswith("1 connection from agent default"), table.stdout


def test_headlines_for_a_draining_server_and_a_link_that_is_down() -> None:
    from carapace.debug.ops import connections_headline, health_headline

    draining = health_headline({"status": "draining", "version": "1", "agents": []}, "h:1")
    assert draining.plain.startswith("Server is draining: it is shutting down")
    assert "0 agents connected" in draining.plain
    odd = health_headline({"status": "broken"}, "h:1").plain
    assert odd.startswith("Server is not healthy: it reports status 'broken'")
    doc = {"agents": [{"name": "vm1", "attached": True}, {"name": "vm2", "attached": True},
                      {"name": "vm3", "attached": False}]}
    assert connections_headline(doc, "h:1") == (
        "2 connections from agents vm1, vm2; link down, waiting to resume: vm3 (server at h:1)")
    assert connections_headline({"agents": []}, "h:1") == "No agent connected (server at h:1)"


def test_unreachable_listener_exits_2_and_names_the_address() -> None:
    port = free_port()
    for args in (["health"], ["connections"], ["sniff", "--count", "1"]):
        result = run_debug(*args, "--debug", f"127.0.0.1:{port}")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f"127.0.0.1:{port}" in result.stderr
        assert "--debug-listen" in result.stderr
        assert "Traceback" not in result.stderr


def test_debug_listener_answers_unknown_paths_and_methods(dep: Deployment) -> None:
    r = httpx.get(debug_url(dep, "/nope"), timeout=5)
    assert r.status_code == 404 and "/debug/health" in r.text
    r = httpx.post(debug_url(dep, "/debug/health"), timeout=5)
    assert r.status_code == 405
    r = httpx.get(debug_url(dep, "/debug/sniff?type=bogus"), timeout=5)
    assert r.status_code == 400 and "unknown frame type" in r.text
    assert get_json(dep, "/debug/health")["status"] == "ok"  # keep-alive still fine


def test_no_per_frame_log_lines_at_info(dep: Deployment) -> None:
    assert dep.server is not None and dep.agent is not None
    server_before = dep.server.stderr_text().count("\n")
    agent_before = dep.agent.stderr_text().count("\n")
    r = httpx.get(dep.url("/sse?count=50&interval_ms=0"), timeout=10)
    assert r.text.count("data:") == 50
    for _ in range(5):
        assert rpc(dep, "version").status_code == 200
    assert dep.server.stderr_text().count("\n") - server_before <= 2
    assert dep.agent.stderr_text().count("\n") - agent_before <= 2


def test_a_burst_of_events_travels_in_batch_frames_and_arrives_whole(dep: Deployment) -> None:
    """An upstream that writes its events in bursts: the server sends each burst as
    ``sse_events`` frames, and the client still gets every event, in order, intact."""
    before = metrics(dep)
    r = httpx.get(dep.url("/sse-buffered?count=40&interval_ms=1&hold_ms=300&size=200"),
                  timeout=20)
    assert r.status_code == 200
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    assert [line for b in blocks for line in b.splitlines() if line.startswith("id:")] == [
        f"id: {i}" for i in range(1, 41)]
    assert all(b.count("data:") >= 1 for b in blocks) and len(blocks) == 40
    after = poll(lambda: (m := metrics(dep)) and value(
        m, "carapace_sse_events_total") >= value(before, "carapace_sse_events_total") + 40
        and m, what="events counted")
    batches = value(after, "carapace_frames_total", direction="out", type="sse_events") - value(
        before, "carapace_frames_total", direction="out", type="sse_events")
    singles = value(after, "carapace_frames_total", direction="out", type="sse_event") - value(
        before, "carapace_frames_total", direction="out", type="sse_event")
    assert batches >= 1
    assert batches + singles < 40
