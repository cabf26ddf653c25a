"""carapace-debug sniff: the server's live feed, and the standalone proxy."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from carapace.protocol.sse import Event, SseParser
from helpers.deployment import Deployment, rpc, wait_until_tunnel_up
from helpers.jsonlines import json_lines
from helpers.operator import POLICY_SECRET, wait_for_subscribers
from helpers.procs import (
    CapturedProcess,
    free_port,
    poll,
    script,
    start_process,
    stop_process,
    wait_for_port,
)

RPC_AND_SSE_TYPES = ["http_request", "http_head", "http_response", "sse_event", "end"]


def sniff(d: Deployment, *args: str) -> CapturedProcess:
    proc = start_process([script("carapace-debug"), "sniff", "--debug",
                          f"127.0.0.1:{d.debug_port}", *args])
    return proc


def records_of(proc: CapturedProcess, request_id: int | None = None,
               type: str | None = None) -> list[dict[str, Any]]:
    return [r for r in json_lines(proc)
            if (request_id is None or r.get("id") == request_id)
            and (type is None or r.get("type") == type)]


def event_frames(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``sse_event`` and ``sse_events`` records: events that reached the server in
    one read travel as one batch frame, which timing on a loaded machine decides."""
    return [r for r in records if r.get("type") in ("sse_event", "sse_events")]


def events_in(records: list[dict[str, Any]]) -> int:
    return sum(r.get("events", 1) for r in event_frames(records))


def test_sniff_json_shows_rpc_and_sse_frames_as_they_happen(dep: Deployment) -> None:
    filters = [a for t in RPC_AND_SSE_TYPES for a in ("--filter", t)]
    # RPC: http_request, http_response (a small answer is one frame);
    # SSE of 4: http_request, http_head, 4 events, end
    proc = sniff(dep, "--json", "--tool", "signal-cli", "--count", "9", *filters)
    try:
        wait_for_subscribers(dep, 1)
        assert rpc(dep, "version").status_code == 200
        rpc_frames = poll(lambda: [r for r in json_lines(proc)][:2]
                          if len(json_lines(proc)) >= 2 else None, what="the RPC's frames")
        req, whole = rpc_frames
        assert (req["type"], req["direction"], req["method"], req["target"]) == (
            "http_request", "in", "POST", "/api/v1/rpc")
        assert req["agent"] == "default" and req["tool"] == "signal-cli"
        assert '"method": "version"' in req["body"] or '"method":"version"' in req["body"]
        assert (whole["type"], whole["direction"], whole["status"], whole["sse"]) == (
            "http_response", "out", 200, False)
        assert whole["id"] == req["id"] and '"version"' in whole["preview"]

        parser = SseParser()
        with httpx.stream("GET", dep.url("/sse?count=4&interval_ms=300&event=receive"),
                          timeout=10) as response:
            chunks = response.iter_raw()
            first: list[Event] = []
            while not first:
                first = [e for e in parser.feed(next(chunks)) if isinstance(e, Event)]
            # the client has event 1; the upstream has not even made event 4 yet
            seen = poll(lambda: records_of(proc, type="sse_event"), 5, "the first sse_event")
            seen_at = time.time()
            events = [e for chunk in chunks for e in parser.feed(chunk) if isinstance(e, Event)]
        all_events = first + events
        assert len(all_events) == 4
        last_made = json.loads(all_events[-1].data or "{}")["ts"]
        assert seen_at < last_made, "sniff showed the event only after the stream was over"
        event = seen[0]
        assert event["event"] == "receive" and event["sse_id"] == "1"
        assert event["direction"] == "out" and event["tool"] == "signal-cli"
        assert '"seq": 1' in event["data"]
        assert event["summary"].startswith("event=receive id=1 data={")

        proc.wait(timeout=10)  # --count 9 ends it
        assert proc.returncode == 0, proc.output()
        records = json_lines(proc)
        assert len(records) == 9
        sse_id = records[2]["id"]
        assert [r["type"] for r in records[2:]] == [
            "http_request", "http_head", "sse_event", "sse_event", "sse_event", "sse_event",
            "end"]
        assert all(r["id"] == sse_id for r in records[2:])
        assert records[2]["target"].startswith("/sse?count=4")
        assert records[3]["sse"] is True and records[3]["content_type"] == "text/event-stream"
        assert [r["sse_id"] for r in records[4:8]] == ["1", "2", "3", "4"]
    finally:
        stop_process(proc)


def test_sniff_never_shows_tokens_or_secrets(dep: Deployment) -> None:
    proc = sniff(dep, "--json")
    human = sniff(dep)
    try:
        wait_for_subscribers(dep, 2)
        token = dep.token
        r = httpx.post(
            dep.url("/echo?marker=secrets"),
            headers={"Authorization": f"Bearer {token}", "Cookie": f"s={token}",
                     "X-Api-Key": token, "X-Custom-Token": token, "X-Note": token},
            content=f"secret={POLICY_SECRET} token={token}".encode(), timeout=10)
        assert r.status_code == 403  # not JSON-RPC: denied, but the frame was on the wire
        # the denied call is shown; then one with the policy secret echoed back by the upstream
        r = httpx.get(dep.url("/echo-header-sse?name=X-Upstream-Key&interval_ms=1"), timeout=10)
        # The upstream echoes the injected header; masking keeps it from the VM too.
        assert "[REDACTED]" in r.text and POLICY_SECRET not in r.text
        poll(lambda: events_in(records_of(proc)) >= 3, what="echoed events")
        poll(lambda: "echo-header-sse" in human.stdout_text(), what="human rendering")
        records = records_of(proc)
        request = next(r for r in records if r.get("target") == "/echo?marker=secrets")
        headers = dict(request["headers"])
        for name in ("Authorization", "Cookie", "X-Api-Key", "X-Custom-Token"):
            assert headers[name] == "[REDACTED]"
        assert headers["X-Note"] == "[REDACTED]"  # an agent token, by value
        assert "[REDACTED]" in request["body"]
        echoed = event_frames(records_of(proc))
        assert echoed and all("[REDACTED]" in e["data"] for e in echoed)
    finally:
        stop_process(proc)
        stop_process(human)
    for text in (proc.stdout_text() + proc.stderr_text(),
                 human.stdout_text() + human.stderr_text()):
        assert dep.token not in text
        assert dep.prober_token not in text
        assert POLICY_SECRET not in text


def test_sniff_human_output_is_one_readable_line_per_frame(dep: Deployment) -> None:
    proc = sniff(dep, "--tool", "signal-cli", "--filter", "http_*", "--count", "2")
    try:
        wait_for_subscribers(dep, 1)
        assert rpc(dep, "version").status_code == 200
        proc.wait(timeout=10)
        assert proc.returncode == 0, proc.output()
        lines = proc.stdout_text().splitlines()
        assert lines[0].split() == ["time", "agent", "id", "tool", "type", "summary"]
        assert "default" in lines[1] and "→" in lines[1] and "signal-cli" in lines[1]
        assert "http_request" in lines[1] and "POST /api/v1/rpc" in lines[1]
        assert "←" in lines[2] and "http_response" in lines[2]
        assert "200 application/json, whole:" in lines[2]
    finally:
        stop_process(proc)


def test_sniff_rejects_unknown_filter_types() -> None:
    proc = start_process([script("carapace-debug"), "sniff", "--filter", "sse"])
    proc.wait(timeout=10)
    assert proc.returncode == 2
    assert "unknown frame type 'sse'" in proc.stderr_text()
    stop_process(proc)


def test_sniff_filter_takes_the_rust_message_names_in_any_case() -> None:
    from carapace.debug.sniff import resolve_frame_types

    assert resolve_frame_types(["SseEvent"]) == {"sse_event", "sse_events", "sse_raw"}
    assert resolve_frame_types(["sseevent"]) == resolve_frame_types(["SSEEVENT"])
    assert resolve_frame_types(["HttpRequest", "CliRequest"]) == {"http_request", "cli_request"}
    assert resolve_frame_types(["HttpResponse"]) == {"http_head", "http_response", "data", "end"}
    assert resolve_frame_types(["CliResponse"]) == {"output", "exit"}
    # our own names stay themselves, in any case; CamelCase of ours needs no table entry
    assert resolve_frame_types(["http_response", "HTTP_HEAD"]) == {"http_response", "http_head"}
    assert resolve_frame_types(["SseComment", "GoAway"]) == {"sse_comment", "goaway"}
    assert resolve_frame_types(["SSE_*"]) == {"sse_*"}

    help_text = subprocess.run([script("carapace-debug"), "sniff", "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    flat = " ".join(help_text.split())
    assert "SseEvent = sse_event, sse_events" in flat
    assert "HttpResponse = http_head, http_response, data, end" in flat
    assert "CliResponse = output, exit" in flat
    proc = start_process([script("carapace-debug"), "sniff", "--filter", "SseEvnt"])
    proc.wait(timeout=10)
    assert proc.returncode == 2, proc.output()
    assert "unknown frame type 'SseEvnt'" in proc.stderr_text()
    assert "SseEvent = sse_event, sse_events" in proc.stderr_text()
    stop_process(proc)


def test_sniff_filter_sse_event_as_the_rust_notes_write_it(dep: Deployment) -> None:
    proc = sniff(dep, "--json", "--tool", "signal-cli", "--filter", "SseEvent")
    try:
        wait_for_subscribers(dep, 1)
        assert rpc(dep, "version").status_code == 200  # not an event: must not show
        r = httpx.get(dep.url("/sse?count=5&interval_ms=20"), timeout=10)
        assert r.text.count("data:") == 5
        poll(lambda: events_in(json_lines(proc)) >= 5, 10, "five events in the feed")
        records = json_lines(proc)
        assert {r["type"] for r in records} <= {"sse_event", "sse_events"}, records
        assert events_in(records) == 5
    finally:
        stop_process(proc)


def test_sniff_proxy_decodes_both_directions(dep: Deployment, tmp_path: Path) -> None:
    proxy_port = free_port()
    tool_port = free_port()
    proxy = start_process([script("carapace-debug"), "sniff", "--json",
                           "--proxy", f"127.0.0.1:{proxy_port}",
                           "--upstream", f"127.0.0.1:{dep.server_port}"])
    agent: CapturedProcess | None = None
    try:
        wait_for_port("127.0.0.1", proxy_port, 10, proc=proxy)
        token_file = tmp_path / "prober-token"
        token_file.write_text(f"prober:{dep.prober_token}\n")
        token_file.chmod(0o600)
        agent = start_process([script("carapace-agent"), "--server", f"127.0.0.1:{proxy_port}",
                               "--token-file", str(token_file),
                               "--expose", f"signal-cli=127.0.0.1:{tool_port}"])
        wait_for_port("127.0.0.1", tool_port, 10, proc=agent)
        base = f"http://127.0.0.1:{tool_port}"
        wait_until_tunnel_up(base + "/api/v1/check")
        r = httpx.post(base + "/api/v1/rpc", json={"jsonrpc": "2.0", "method": "version",
                                                   "id": 3}, timeout=10)
        assert r.status_code == 200
        r = httpx.get(base + "/sse?count=2&interval_ms=10&event=tick", timeout=10)
        assert r.text.count("data:") == 2

        def complete() -> list[dict[str, Any]] | None:
            recs = [r for r in json_lines(proxy) if r.get("type") != "notice"]
            # answers to /check and the RPC are whole (http_response), the stream ends
            finals = [r for r in recs if r["type"] in ("end", "http_response")]
            return recs if len(finals) >= 3 else None

        records = poll(complete, 10, "the proxied frames")
        kinds = [(r["direction"], r["type"]) for r in records]
        assert kinds[:4] == [("in", "hello"), ("out", "challenge"), ("in", "auth"),
                             ("out", "welcome")]
        assert records[0]["summary"].startswith("hello agent=prober versions=[1]")
        for rec in records[:4]:
            assert not {"nonce", "proof", "session"} & set(rec), rec
        assert ("in", "http_request") in kinds and ("out", "http_head") in kinds
        assert ("out", "http_response") in kinds and ("out", "end") in kinds
        rpc_req = next(r for r in records if r["type"] == "http_request"
                       and r["target"] == "/api/v1/rpc")
        assert rpc_req["agent"] == "prober" and rpc_req["tool"] == "signal-cli"
        assert events_in(records) == 2
        assert all(e["tool"] == "signal-cli" for e in event_frames(records))
        assert all(e["event"] == "tick" for e in records if e["type"] == "sse_event")
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(proxy)
    text = proxy.stdout_text() + proxy.stderr_text()
    assert dep.prober_token not in text and dep.token not in text


def test_sniff_proxy_keeps_forwarding_what_it_cannot_decode(tmp_path: Path) -> None:
    """Garbage through the proxy: a warning, and the bytes still arrive untouched."""
    import socket
    import threading

    backend = socket.create_server(("127.0.0.1", 0))
    backend_port = backend.getsockname()[1]
    received = bytearray()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                received.extend(data)
                conn.sendall(data[::-1])

    def serve() -> None:  # wait_for_port's probe is a connection too
        while True:
            try:
                conn, _ = backend.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    proxy_port = free_port()
    proxy = start_process([script("carapace-debug"), "sniff", "--json",
                           "--proxy", f"127.0.0.1:{proxy_port}",
                           "--upstream", f"127.0.0.1:{backend_port}"])
    try:
        wait_for_port("127.0.0.1", proxy_port, 10, proc=proxy)
        payload = b"\xff\xff\xff\xff not a carapace frame at all"
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as s:
            s.sendall(payload)
            back = b""
            while len(back) < len(payload):
                back += s.recv(65536)
            assert back == payload[::-1]
            s.sendall(b"more bytes after the warning")
            expected = payload + b"more bytes after the warning"
            poll(lambda: bytes(received) == expected, 5, "forwarding after the warning")
        notices = poll(lambda: [r for r in json_lines(proxy) if "cannot decode" in
                                r.get("summary", "")], 5, "a decode warning")
        assert notices[0]["direction"] == "in"
    finally:
        stop_process(proxy)
        backend.close()
