"""The completion record of an event stream counts its events, also when the reader leaves."""

from __future__ import annotations

from pathlib import Path

import httpx

from helpers.deployment import deployment
from helpers.jsonlines import read_records
from helpers.procs import wait_until


def test_stream_closed_by_its_reader_is_audited_with_its_events(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with deployment(tmp_path, server_args=["--audit-log", str(audit)]) as d:
        seen = 0
        with httpx.stream("GET", d.url("/sse-forever?interval_ms=10"), timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == 5:
                        break

        def completion() -> dict[str, object] | None:
            records = read_records(audit)
            ids = {r["request_id"] for r in records
                   if r["event"] == "decision" and r.get("path") == "/sse-forever"}
            done = [r for r in records if r["event"] == "completion" and r["request_id"] in ids]
            return done[0] if done else None

        wait_until(completion, 10, "the stream's completion record")
        record = completion()
        assert record is not None
        assert record["outcome"] == "cancelled"
        assert isinstance(record["events"], int) and record["events"] >= 5
