"""The events of one upstream read travel as a batch: one credit check, one audit count,
one metrics update — and still never more than the credit allows."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from carapace.protocol.flow import flow_cost
from carapace.protocol.messages import (
    Data,
    End,
    HttpHead,
    HttpRequest,
    HttpResponse,
    Message,
    SseComment,
    SseEvent,
    SseEvents,
)
from carapace.protocol.sse import Comment, Event
from carapace.server.metrics import ServerMetrics
from carapace.server.streams import ServerStream
from carapace.server.upstream import UpstreamClient, relay
from carapace.server.upstream.relay import (
    MAX_BATCH_CHARS,
    MAX_EVENTS_PER_FRAME,
    _frame_events,
    _send_items,
)


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.writes = 0
        self.server: Any = None

    def send(self, msg: Message) -> None:
        self.send_many([msg])

    def send_many(self, msgs: Sequence[Message]) -> None:
        self.sent.extend(msgs)
        self.writes += 1


def events(n: int, data: str = "x" * 100) -> list[SseEvent]:
    return [SseEvent(id=1, data=data, sse_id=str(i)) for i in range(n)]


async def test_a_batch_within_the_credit_goes_at_once() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=10_000)  # type: ignore[arg-type]
    batch = [*events(3), SseComment(id=1, text="c"), *events(2)]
    await stream.send_batch(batch)
    assert session.sent == batch and session.writes == 1
    assert stream.bytes_out == sum(flow_cost(m) for m in batch)
    assert not stream.finished


async def test_a_small_whole_answer_is_one_write_and_finishes_the_stream() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=10_000)  # type: ignore[arg-type]
    answer = [HttpHead(id=1, status=201, headers=(), sse=False), Data(id=1, data=b"{}"),
              End(id=1)]
    await stream.send_batch(answer)
    assert session.sent == answer and session.writes == 1
    assert stream.finished and stream.sent.status == 201 and stream.sent.body_bytes == 2
    await stream.send_batch([])
    assert session.writes == 1


async def test_a_whole_answer_finishes_the_stream_also_when_it_waited_for_credit() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=10_000)  # type: ignore[arg-type]
    whole = HttpResponse(id=1, status=201, headers=(), body=b"{}")
    await stream.send_batch([whole])
    assert session.sent == [whole] and stream.finished
    assert stream.sent.status == 201 and stream.sent.body_bytes == 2

    session = FakeSession()
    stream = ServerStream(session, 2, window=1)  # type: ignore[arg-type]
    first = Data(id=2, data=b"a")
    await stream.send_batch([first])  # overdraws the one byte: no credit left
    whole = HttpResponse(id=2, status=200, headers=(), body=b"x" * 100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_batch, [whole])
        await trio.testing.wait_all_tasks_blocked()
        assert session.sent == [first] and not stream.finished
        stream.grant(10_000)
    assert session.sent == [first, whole] and stream.finished


async def test_an_end_waiting_behind_credit_does_not_finish_the_stream_early() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=1)  # type: ignore[arg-type]
    answer = [Data(id=1, data=b"a" * 100), Data(id=1, data=b"b"), End(id=1)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_batch, answer)
        await trio.testing.wait_all_tasks_blocked()
        assert session.sent == answer[:1] and not stream.finished
        stream.grant(10_000)
    assert session.sent == answer and stream.finished


async def test_a_batch_beyond_the_credit_waits_for_it_frame_by_frame() -> None:
    session = FakeSession()
    cost = flow_cost(events(1)[0])  # 116
    stream = ServerStream(session, 1, window=2 * cost + 1)  # type: ignore[arg-type]
    batch = events(6)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_batch, batch)
        await trio.testing.wait_all_tasks_blocked()
        # Sent while the credit was positive: 3 frames (the third overdraws, as send does).
        assert session.sent == batch[:3]
        stream.grant(cost - 1)  # back to exactly 0 credit: nothing more may go
        await trio.testing.wait_all_tasks_blocked()
        assert len(session.sent) == 3
        stream.grant(10 * cost)
    assert session.sent == batch


async def test_the_stream_records_a_batch_for_the_audit() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=100_000)  # type: ignore[arg-type]
    await stream.send_batch([*events(2, "abc"), SseComment(id=1, text="ignored"),
                             SseEvent(id=1, data="é€"), SseEvent(id=1, data="")])
    assert stream.sent.events == 4
    assert stream.sent.body_bytes == 3 + 3 + len("é€".encode())
    await stream.send_batch([Data(id=1, data=b"12345")])
    assert stream.sent.body_bytes == 3 + 3 + len("é€".encode()) + 5 and stream.sent.events == 4



def test_the_stream_records_the_failure_it_answers_with() -> None:
    stream = ServerStream(FakeSession(), 1, window=100)  # type: ignore[arg-type]
    stream.fail(502, "upstream_unavailable", "the host service is unreachable")
    assert (stream.sent.status, stream.sent.failed, stream.sent.body_bytes) == (
        502, "upstream_unavailable", 0)


def scrape(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_batch_counts_every_event_in_the_metrics() -> None:
    server: Any = SimpleNamespace(policy=None, sessions={}, frame_observers=[],
                                  stats=SimpleNamespace(started=0.0, connections=0,
                                                        handshake_failures=0,
                                                        protocol_errors=0, errors=0,
                                                        limit_hits={},
                                                        unauthenticated_refused={},
                                                        transports={}),
                                  admission=SimpleNamespace(open=0), version="test",
                                  audit_counts=dict,
                                  sandbox_status=SimpleNamespace(mode="none"))
    metrics = ServerMetrics(server)
    stream = ServerStream(FakeSession(), 1, window=100_000,  # type: ignore[arg-type]
                          on_events=metrics.count_events)

    async def run() -> None:
        now = trio.current_time()
        await stream.send_batch(events(5), now)  # queued "now": latency ~0, first bucket
        await stream.send_batch(events(2))  # the end of a stream: counted, no latency

    # A clock that stands still: "queued now" is exactly zero latency however loaded the
    # machine is (on a real clock a busy host put it past the first bucket's 0.1 ms).
    trio.run(run, clock=trio.testing.MockClock())
    metrics.event_latency.observe(0.003, 4)
    m = scrape(metrics)
    assert m[("carapace_sse_events_total", ())] == 7
    assert m[("carapace_event_latency_seconds_count", ())] == 9
    assert m[("carapace_event_latency_seconds_bucket", (("le", "0.0001"),))] == 5
    assert m[("carapace_event_latency_seconds_bucket", (("le", "0.0025"),))] == 5
    assert m[("carapace_event_latency_seconds_bucket", (("le", "0.005"),))] == 9
    assert m[("carapace_event_latency_seconds_bucket", (("le", "+Inf"),))] == 9
    assert 0.012 <= m[("carapace_event_latency_seconds_sum", ())] < 0.013


def test_events_read_together_share_frames_and_cost_what_single_frames_would() -> None:
    parsed = [Event(event="receive" if i % 2 else None, data=f'{{"n": {i}}}', id=str(i))
              for i in range(600)]
    out: list[Any] = []
    _frame_events(1, parsed, out)
    assert all(type(m) is SseEvents for m in out)
    assert len(out) == 3  # 256 + 256 + 88: at most MAX_EVENTS_PER_FRAME per frame
    assert max(len(m.events) for m in out) == MAX_EVENTS_PER_FRAME
    flat = [f for m in out for f in m.events]
    assert flat == [(e.event, e.data, e.id, e.retry) for e in parsed]
    singles = [SseEvent(id=1, event=e.event, data=e.data, sse_id=e.id) for e in parsed]
    assert sum(flow_cost(m) for m in out) == sum(flow_cost(m) for m in singles)


def test_a_lone_event_is_still_its_own_sse_event_frame() -> None:
    out: list[Any] = []
    _frame_events(4, [Event(data="only", id="1", retry=10)], out)
    assert out == [SseEvent(id=4, data="only", sse_id="1", retry=10)]
    out = []  # a batch split by the size cap never leaves a batch of one
    big = "x" * (MAX_BATCH_CHARS // 2)
    _frame_events(4, [Event(data=big), Event(data=big), Event(data="tail")], out)
    assert [type(m) for m in out] == [SseEvents, SseEvent]
    assert out[1] == SseEvent(id=4, data="tail")


async def test_comments_keep_their_place_between_batches() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=100_000)  # type: ignore[arg-type]
    items = [Event(data="a"), Event(data="b"), Comment(" ping"), Event(data="c"),
             Event(data="d"), Event(data="e")]
    await _send_items(stream, 1, items, None, None)
    assert stream.sent.events == 5
    assert session.sent == [
        SseEvents(id=1, events=((None, "a", None, None), (None, "b", None, None))),
        SseComment(id=1, text=" ping"),
        SseEvents(id=1, events=((None, "c", None, None), (None, "d", None, None),
                                (None, "e", None, None))),
    ]


async def test_the_stream_records_the_events_of_a_batch_frame() -> None:
    session = FakeSession()
    stream = ServerStream(session, 1, window=100_000)  # type: ignore[arg-type]
    await stream.send_batch([SseEvents(id=1, events=(("e", "abc", "1", None),
                                                     (None, "é€", None, None),
                                                     (None, None, "3", None)))])
    assert stream.sent.events == 3
    assert stream.sent.body_bytes == 3 + len("é€".encode())


async def test_a_small_answer_is_one_frame_but_a_late_body_never_holds_the_head() -> None:
    """forward_http against a real socket: an answer whose body came with its head is
    one http_response frame; a body that comes later follows the head on its own."""
    body_may_come = trio.Event()

    async def upstream(sock: trio.SocketStream) -> None:
        async with sock:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await sock.receive_some(65536)
            if b"/late" in data:
                await sock.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                await body_may_come.wait()
                await sock.send_all(b"ok")
            else:
                await sock.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await sock.receive_some(1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        tool: Any = SimpleNamespace(upstream=f"http://127.0.0.1:{port}", timeout_secs=5)
        async with UpstreamClient() as client:
            session = FakeSession()
            stream = ServerStream(session, 1, window=10_000)  # type: ignore[arg-type]
            req = HttpRequest(id=1, tool="t", method="GET", target="/now", headers=(),
                              body=b"")
            await relay.forward_http(client, stream, req, "t", tool, [])
            assert session.sent == [HttpResponse(id=1, status=200,
                                                 headers=((b"Content-Length", b"2"),),
                                                 body=b"ok")]
            assert session.writes == 1 and stream.finished

            session = FakeSession()
            stream = ServerStream(session, 2, window=10_000)  # type: ignore[arg-type]
            req = HttpRequest(id=2, tool="t", method="GET", target="/late", headers=(),
                              body=b"")
            async with trio.open_nursery() as inner:
                inner.start_soon(relay.forward_http, client, stream, req, "t", tool, [])
                await trio.testing.wait_all_tasks_blocked()
                assert [m.TYPE for m in session.sent] == ["http_head"]  # not held for the body
                body_may_come.set()
            assert [m.TYPE for m in session.sent] == ["http_head", "data", "end"]
            assert session.writes == 2 and stream.finished
        nursery.cancel_scope.cancel()
