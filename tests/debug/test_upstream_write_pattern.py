"""The test upstream's ``--write-pattern``: how its SSE routes put events on the wire.

Read over a raw socket so that the chunks themselves are seen (httpx would
hide the chunked framing): ``per-event`` must send one chunk per event with a
comment in every tenth event; ``batched`` keeps ``/sse-flood``'s many events
per chunk.
"""

from __future__ import annotations

import pytest
import trio

from carapace.debug.upstream import UpstreamServer, serve_upstream
from carapace.debug.upstream.__main__ import main as upstream_main
from carapace.protocol.sse import Comment, Event, SseParser


async def start(nursery: trio.Nursery, pattern: str) -> UpstreamServer:
    server: UpstreamServer = await nursery.start(
        lambda task_status: serve_upstream(
            "127.0.0.1", 0, write_pattern=pattern, task_status=task_status
        )
    )
    return server


async def raw_chunks(port: int, path: str) -> tuple[bytes, list[bytes]]:
    """GET ``path``; the response head and the body's chunks, as sent."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = b""
        with trio.fail_after(10):
            while not buf.endswith(b"\r\n0\r\n\r\n"):
                data = await stream.receive_some(65536)
                assert data, f"connection closed early: {buf[-200:]!r}"
                buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def events_and_comments(chunks: list[bytes]) -> tuple[list[Event], list[Comment]]:
    parser = SseParser()
    items = [item for chunk in chunks for item in parser.feed(chunk)]
    return ([i for i in items if isinstance(i, Event)],
            [i for i in items if isinstance(i, Comment)])


@pytest.mark.parametrize("path", ["/sse-flood?count=25&batch=32&size=100",
                                  "/sse?count=25&interval_ms=0&size=100"])
async def test_per_event_writes_one_chunk_per_event_and_a_comment_every_ten(
    nursery: trio.Nursery, path: str
) -> None:
    up = await start(nursery, "per-event")
    head, chunks = await raw_chunks(up.port, path)
    assert b"transfer-encoding: chunked" in head.lower()
    assert len(chunks) == 25
    for i, chunk in enumerate(chunks, 1):
        assert chunk.count(b"\n\n") == 1 and chunk.endswith(b"\n\n")  # exactly one event
        assert f"id: {i}\n".encode() in chunk
    events, comments = events_and_comments(chunks)
    assert [e.id for e in events] == [str(i) for i in range(1, 26)]
    ticks = [c.text.strip() for c in comments if "tick" in c.text]
    assert ticks == ["tick 10", "tick 20"]


async def test_batched_flood_keeps_many_events_per_chunk(nursery: trio.Nursery) -> None:
    up = await start(nursery, "batched")
    _, chunks = await raw_chunks(up.port, "/sse-flood?count=25&batch=32&size=100")
    assert len(chunks) == 1
    events, comments = events_and_comments(chunks)
    assert len(events) == 25 and comments == []


async def test_unknown_write_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="write_pattern must be one of batched, per-event"):
        await serve_upstream("127.0.0.1", 0, write_pattern="bursty")


def test_cli_rejects_unknown_write_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        upstream_main(["--write-pattern", "bursty"])
    assert exc.value.code == 2
    assert "invalid choice: 'bursty'" in capsys.readouterr().err
