"""A reload that lands while a request is still being decided reaches it before it runs.

The end-to-end tests (tests/e2e/test_reload_revokes.py) cover running requests;
a request that waits for a worker thread cannot be held there on purpose from
outside, so this drives the real pipeline (real policy, audit file, stream)
with the worker pool held by the test.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
import trio.testing

from carapace.protocol.messages import CliRequest, Message, RequestFailed
from carapace.server.audit import AuditLog, AuditTrail
from carapace.server.pipeline import RequestPipeline
from carapace.server.policy import DECIDE_WORKERS, INLINE_DECIDE_BYTES, load_policy
from carapace.server.stats import Stats
from carapace.server.streams import ServerStream
from carapace.server.upstream import UpstreamClient

ALLOWING = """\
tools:
  sleep:
    type: cli
    binary: /bin/sleep
    argv_allow_patterns: ["*"]
    audit: {log_argv: false}
"""
DENYING = """\
tools:
  sleep:
    type: cli
    binary: /bin/sleep
    argv_allow_patterns: ["never *"]
    audit: {log_argv: false}
"""


class Sink:
    """The agent's session as the stream sees it: the frames it was sent."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_many(self, msgs: Sequence[Message]) -> None:
        self.sent.extend(msgs)


class Counts:
    """The metrics the pipeline reports to (the server's are tested with the server)."""

    def __init__(self) -> None:
        self.revoked: list[str] = []

    def count_request(self, *args: Any) -> None:
        pass

    def count_parse_limit(self, limit: str) -> None:
        pass

    def count_revoked(self, kind: str) -> None:
        self.revoked.append(kind)


async def test_reload_while_deciding_is_judged_again_before_it_runs(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    counts = Counts()
    pipeline = RequestPipeline(audit=AuditTrail(AuditLog(str(audit_path))),
                               metrics=counts,  # type: ignore[arg-type]
                               stats=Stats(), http_client=UpstreamClient())
    old, new = load_policy(ALLOWING), load_policy(DENYING)
    # A long argv is decided in a worker thread; with every worker held, it waits there.
    argv = (b"60",) + (b"x" * 1024,) * (INLINE_DECIDE_BYTES // 1024 + 1)
    req = CliRequest(id=1, tool="sleep", argv=argv, cwd=b"/", env=(), tty=(False, False, False))
    sink = Sink()
    stream = ServerStream(sink, 1, 1 << 20)
    async with trio.open_nursery() as nursery:
        held = [object() for _ in range(DECIDE_WORKERS)]
        for borrower in held:
            await pipeline.deciders.acquire_on_behalf_of(borrower)
        nursery.start_soon(pipeline.handle, "default", b"\0" * 16, stream, req, old)
        await trio.testing.wait_all_tasks_blocked()
        assert pipeline.open[stream].entry is None  # still being decided
        assert await pipeline.revoke_denied(new, lambda: new) == 0  # nothing runs yet
        for borrower in held:
            pipeline.deciders.release_on_behalf_of(borrower)
    assert [type(m) for m in sink.sent] == [RequestFailed]
    failed = sink.sent[0]
    assert isinstance(failed, RequestFailed)
    assert failed.code == "denied" and failed.status == 403
    assert failed.message.startswith("the host's policy changed: denied by policy")
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["decision", "revoked", "completion"]
    assert records[0]["decision"] == "allow"
    assert records[1]["decision"] == "deny"
    assert records[1]["rule"] == "default deny: no tools.sleep.argv_allow_patterns entry matches"
    assert records[2]["outcome"] == "cancelled" and "host_pid" not in records[2]
    assert counts.revoked == ["cli"]
    assert not pipeline.open
