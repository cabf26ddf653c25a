"""One agent's flood of large or numerous denied requests cannot push another agent's
earlier records out of the audit trail, and its own records stay small (real processes).

The server runs with a small rotation (3 files of 100 kB: 300 kB of trail) and the
default record cap and deny budgets. Agent ``default`` (the real agent, "vm2") makes an
allowed call; then agent ``prober`` ("vm1", a raw link) floods denied ``cli_request``s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from carapace.protocol.messages import CliRequest, RequestFailed
from carapace.server.audit.caps import DEFAULT_MAX_RECORD_BYTES
from carapace.server.audit.throttle import DEFAULT_DENY_BYTES
from helpers.deployment import Deployment, deployment, free_port, rpc
from helpers.procs import stop_process
from helpers.rawlink import RawLink

ROTATION = ["--audit-max-bytes", "100000", "--audit-backups", "2"]
EMOJI_ARGV = tuple(("😀" * 2048).encode() for _ in range(256))
"""256 arguments of 2,048 emoji: a 2 MiB frame, 6 MiB of JSON-escaped argv."""
WIDE_ARGV = tuple(bytes([65 + n]) * 2000 for n in range(7))
"""Under every per-field cap, ~14 kB a record: harmless alone, a flood in numbers."""


def all_lines(tmp: Path) -> Iterator[bytes]:
    """Every line of every audit file, oldest file first."""
    files = sorted((p for p in tmp.iterdir() if p.name.startswith("audit.jsonl")),
                   key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    for path in files:
        yield from path.read_bytes().splitlines()


def flood(d: Deployment, argv: tuple[bytes, ...], count: int) -> None:
    """``count`` denied cli_requests from agent prober; returns once all are answered."""
    link = RawLink(d.server_port, timeout=30)
    try:
        link.handshake("prober", d.prober_token.encode())
        for rid in range(1, count + 1):
            link.send(CliRequest(id=rid, tool="gh", argv=argv, cwd=b"/", env=(),
                                 tty=(False, False, False), peer_uid=0, peer_gid=0,
                                 peer_pid=1))
        answered: set[int] = set()
        while len(answered) < count:
            msg = link.receive()
            assert msg is not None, f"link closed after {len(answered)} answers"
            if isinstance(msg, RequestFailed):
                assert msg.status == 403
                answered.add(msg.id)
    finally:
        link.close()


@pytest.mark.parametrize(("argv", "count"), [(EMOJI_ARGV, 12), (WIDE_ARGV, 300)],
                         ids=["huge-records", "many-records"])
def test_a_flood_cannot_rotate_away_another_agents_records(
        tmp_path: Path, argv: tuple[bytes, ...], count: int) -> None:
    audit = tmp_path / "audit.jsonl"
    debug = free_port()
    with deployment(tmp_path, server_args=["--audit-log", str(audit), *ROTATION,
                                           "--debug-listen", f"127.0.0.1:{debug}"]) as d:
        assert rpc(d, "version").status_code == 200  # vm2's allowed call, before the flood
        flood(d, argv, count)
        metrics = httpx.get(f"http://127.0.0.1:{debug}/metrics", timeout=10).text
        assert d.server is not None
        stop_process(d.server)  # shutdown writes the count of what was suppressed
        log = d.server.stderr_text()
    lines = list(all_lines(tmp_path))
    assert all(len(line) + 1 <= DEFAULT_MAX_RECORD_BYTES for line in lines), \
        max(len(line) for line in lines)
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    called = {r["request_id"] for r in records
              if r.get("agent") == "default" and r.get("path") == "/api/v1/rpc"}
    vm2 = [r for r in records if r.get("request_id") in called]
    assert [r["event"] for r in vm2] == ["decision", "completion"], \
        "vm1's flood rotated vm2's earlier records away"
    denies = [r for r in records if r.get("agent") == "prober" and r["event"] == "decision"]
    written = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in denies)
    assert 0 < len(denies) < count and written <= DEFAULT_DENY_BYTES
    [summary] = [r for r in records if r["event"] == "denials_suppressed"]
    assert summary["agent"] == "prober" and summary["count"] == count - len(denies)
    assert summary["suppressed_bytes"] > 0 and "--audit-deny-bytes" in summary["reason"]
    assert "carapace_audit_denied_bytes_suppressed_total" in metrics
    # The journal is not flooded either: a suppressed deny is logged at debug level.
    assert log.count("denied cli tool gh for agent prober") == len(denies)
    assert log.count("is over its deny byte budget") == 1
    if argv is EMOJI_ARGV:
        # Cut, not dropped: the byte count and SHA-256 of the whole argv stay checkable.
        whole = json.dumps([a.decode() for a in argv], ensure_ascii=False,
                           separators=(",", ":")).encode()
        for rec in denies:
            assert rec["truncated"] == ["argv"]
            assert rec["argv"].endswith(
                f"…[truncated: {len(whole)} bytes, sha256 {hashlib.sha256(whole).hexdigest()}]")
            assert rec["argv"].startswith('["😀😀')
        truncated = [line for line in metrics.splitlines()
                     if line.startswith("carapace_audit_records_truncated_total ")]
        assert truncated and float(truncated[0].split()[1]) >= len(denies)
