"""Requests made to be expensive to judge: refused by a parse limit, nobody else waits.

A raw link (agent ``prober``) sends what no real agent's local listener would
pass on — a 16 MiB JSON-RPC batch, a 16 MiB argv, a hundred thousand headers —
while the real agent (``default``) keeps making ordinary calls through its
local port. Each attack must get its own clear error naming the limit, the
real agent's calls must keep being answered, and the server must live on.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from carapace.protocol.framing import DEFAULT_MAX_FRAME
from carapace.protocol.messages import CliRequest, HttpRequest, Message, Ping, Pong, RequestFailed
from helpers.deployment import Deployment, deployment, rpc
from helpers.jsonlines import read_records
from helpers.procs import free_port, poll
from helpers.rawlink import RawLink

POLICY = """\
tools:
  signal-cli:
    type: http
    upstream: "http://127.0.0.1:{upstream_port}"
    jsonrpc_allow_methods: [version]
  echo:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
"""

HUGE = DEFAULT_MAX_FRAME - 64 * 1024
"""As large as one frame can carry, with room for the rest of the message."""


class Attacker:
    """The prober's raw link, read by a thread that records every request's end."""

    def __init__(self, d: Deployment) -> None:
        self.link = RawLink(d.server_port, timeout=60)
        self.link.handshake("prober", d.prober_token.encode())
        self.answers: dict[int, RequestFailed | Message] = {}
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            msg = self.link.receive()
            if msg is None:
                self.closed = True
                return
            if isinstance(msg, Ping):
                self.link.send(Pong(nonce=msg.nonce))
            elif isinstance(msg, RequestFailed) or msg.TYPE in ("http_response", "exit"):
                self.answers[msg.id] = msg  # type: ignore[attr-defined]

    def answer(self, rid: int) -> RequestFailed:
        found = poll(lambda: self.answers.get(rid), timeout=60, what=f"answer to {rid}")
        assert isinstance(found, RequestFailed), found
        return found


def while_attacking(d: Deployment, attack: Callable[[], None]) -> list[float]:
    """Run ``attack`` in a thread; meanwhile the real agent keeps calling. Returns the
    durations of its calls, each of which must succeed."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            attack()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    took: list[float] = []
    while not done.is_set() or len(took) < 3:
        start = time.monotonic()
        r = rpc(d, "version")  # with a generous timeout of its own
        took.append(time.monotonic() - start)
        assert r.status_code == 200, r.text
    thread.join(60)
    assert not errors, errors
    return took


def refused(answer: RequestFailed, limit: str, seen: int) -> None:
    assert answer.status == 400 and answer.code == "bad_request", answer
    assert limit in answer.message and str(seen) in answer.message
    assert f"--{limit.replace('_', '-')}" in answer.message


def limit_metric(d: Deployment, limit: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{d.debug_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "carapace_parse_limit_refusals_total" and s.labels == {"limit": limit}:
                return s.value
    return 0.0


@contextlib.contextmanager
def hostile(tmp_path: Path) -> Iterator[tuple[Deployment, Path]]:
    """A deployment with an audit log and a debug listener (for /metrics)."""
    audit = tmp_path / "audit.jsonl"
    debug_port = free_port()
    with deployment(tmp_path, policy=POLICY, server_args=[
            "--audit-log", str(audit), "--debug-listen", f"127.0.0.1:{debug_port}"]) as d:
        d.debug_port = debug_port
        yield d, audit


def decision_records(audit: Path, agent: str) -> list[dict[str, object]]:
    return [r for r in read_records(audit)
            if r.get("event") == "decision" and r.get("agent") == agent]


def test_a_16_mib_jsonrpc_batch_is_refused_unparsed_and_others_are_served(
        tmp_path: Path) -> None:
    with hostile(tmp_path) as (d, audit):
        attacker = Attacker(d)
        batch = b"[" + b"{}," * ((HUGE - 4) // 3) + b"{}]"
        # Many frames under the cap, each judged in full: 100 calls of ~10 KiB params,
        # the last one of a method the policy does not allow.
        call = {"jsonrpc": "2.0", "method": "version", "id": 1,
                "params": {"list": [{"k": "v" * 8}] * 500}}
        calls = [call] * 99 + [{**call, "method": "deleteEverything"}]
        heavy = json.dumps(calls).encode()
        assert 900_000 < len(heavy) < 1024 * 1024

        def attack() -> None:
            attacker.link.send(HttpRequest(id=1, tool="signal-cli", method="POST",
                                           target="/api/v1/rpc", headers=(), body=batch))
            for rid in range(2, 12):
                attacker.link.send(HttpRequest(id=rid, tool="signal-cli", method="POST",
                                               target="/api/v1/rpc", headers=(), body=heavy))
            attacker.answer(11)

        took = while_attacking(d, attack)
        print(f"the real agent's calls during the attack: max {max(took) * 1000:.0f} ms")
        refused(attacker.answer(1), "max_jsonrpc_body_bytes", len(batch))
        for rid in range(2, 12):
            answer = attacker.answer(rid)
            assert answer.code == "denied" and "deleteEverything" in answer.message
        # The attacker's own link survived (keepalive answered), the server lives.
        assert not attacker.closed
        assert d.server is not None and d.server.poll() is None
        records = [r for r in decision_records(audit, "prober") if r.get("limit")]
        assert len(records) == 1 and records[0]["limit"] == "max_jsonrpc_body_bytes"
        assert records[0]["bytes_in"] == len(batch)
        assert len(json.dumps(records[0])) < 2000
        assert limit_metric(d, "max_jsonrpc_body_bytes") == 1


def test_huge_argv_env_and_headers_are_refused_by_their_limits(tmp_path: Path) -> None:
    with hostile(tmp_path) as (d, audit):
        attacker = Attacker(d)
        many_args = (b"x" * 1000,) * (HUGE // 1010)
        one_arg = (b"\xc3\xa9" * (HUGE // 2),)
        env = ((b"A", b"1"),) * 200_000
        headers = ((b"x-a", b"v" * 100),) * 100_000
        target = "/api/v1/check?" + "a" * (1024 * 1024)
        cases = [
            (1, CliRequest(id=1, tool="echo", argv=many_args, cwd=b"/", env=(),
                           tty=(False, False, False)), "max_argv", len(many_args)),
            (2, CliRequest(id=2, tool="echo", argv=one_arg, cwd=b"/", env=(),
                           tty=(False, False, False)), "max_argv_bytes", len(one_arg[0])),
            (3, CliRequest(id=3, tool="echo", argv=(b"hi",), cwd=b"/", env=env,
                           tty=(False, False, False)), "max_env", len(env)),
            (4, HttpRequest(id=4, tool="signal-cli", method="GET", target="/api/v1/check",
                            headers=headers, body=b""), "max_headers", len(headers)),
            (5, HttpRequest(id=5, tool="signal-cli", method="GET", target=target,
                            headers=(), body=b""), "max_header_bytes", len(target) + 3),
        ]

        def attack() -> None:
            for _, msg, _, _ in cases:
                attacker.link.send(msg)
            attacker.answer(5)

        while_attacking(d, attack)
        for rid, _, limit, seen in cases:
            refused(attacker.answer(rid), limit, seen)
        assert not attacker.closed
        assert d.server is not None and d.server.poll() is None
        assert rpc(d, "version").status_code == 200
        limits = {str(r.get("limit")): r for r in decision_records(audit, "prober")}
        assert sorted(limits) == sorted(case[2] for case in cases)
        for record in limits.values():
            assert record["code"] == "bad_request"
            assert len(json.dumps(record)) < 2000, record  # sizes only, not the values
        for _, _, limit, _ in cases:
            assert limit_metric(d, limit) == 1
