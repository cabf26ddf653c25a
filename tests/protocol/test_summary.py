"""protocol/summary.py: one summary per message type, and no secret in any of them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol.messages import (
    ALL_MESSAGES,
    Ack,
    Auth,
    Cancel,
    Challenge,
    CliRequest,
    Credit,
    Data,
    End,
    Exit,
    GoAway,
    Hello,
    HttpHead,
    HttpRequest,
    HttpResponse,
    Message,
    Output,
    Ping,
    Pong,
    Reject,
    RequestFailed,
    Signal,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
    Welcome,
)
from carapace.protocol.summary import (
    _SUMMARIZERS,
    REDACTED,
    Redactor,
    RequestTracker,
    SummaryFilter,
    frame_record,
    human_bytes,
    is_sensitive_header,
    summarize,
)

NONCE = bytes(range(32))
PROOF = bytes(range(100, 132))
SESSION = b"session-id-bytes-0123456789"
SECRET = b"policy-secret-value-XYZ"

EXAMPLES: list[Message] = [
    Hello(versions=(1,), agent="vm1", nonce=NONCE, resume=SESSION, received=3),
    Challenge(version=1, nonce=NONCE, proof=PROOF),
    Auth(proof=PROOF),
    Welcome(session=SESSION, window=262144, max_frame=1 << 24, server="0.1.0"),
    Reject(code="bad_token", message="authentication failed"),
    Ping(nonce=4),
    Pong(nonce=4),
    GoAway(reason="server shutting down"),
    Ack(received=9),
    HttpRequest(id=1, tool="signal-cli", method="POST", target="/api/v1/rpc?x=1",
                headers=((b"Authorization", b"Bearer " + SECRET),
                         (b"Cookie", b"sid=" + SECRET),
                         (b"X-Api-Key", SECRET),
                         (b"X-Session-Token", SECRET),
                         (b"Content-Type", b"application/json")),
                body=b'{"jsonrpc":"2.0","method":"send","id":1}'),
    HttpHead(id=1, status=200, headers=((b"Content-Type", b"text/event-stream"),
                                        (b"Set-Cookie", SECRET)), sse=True),
    Data(id=1, data=b"hello\x00\xff world"),
    SseEvent(id=1, event="receive", data='{"seq": 1}\nline two', sse_id="7", retry=1000),
    SseComment(id=1, text=" keepalive"),
    End(id=1),
    CliRequest(id=2, tool="op", argv=(b"item", b"get", b"my item"), cwd=b"/home/u",
               env=((b"OP_SESSION", SECRET), (b"HOME", b"/home/u")),
               tty=(False, True, True), peer_uid=1000, peer_gid=1000, peer_pid=42),
    Output(id=2, fd=2, data=b"warning: x\n"),
    Exit(id=2, code=130, signal=2, reason="killed by signal"),
    Signal(id=2, signum=15),
    Cancel(id=2, reason="local client went away"),
    Credit(id=2, amount=131072),
    RequestFailed(id=3, status=429, code="rate_limited", message="slow down", retry_after=5),
    SseEvents(id=1, events=(("receive", "token " + SECRET.decode(), "8", None),
                            (None, '{"seq": 3}', SECRET.decode(), 500),
                            ("receive", None, "10", None))),
    SseRaw(id=1, data=b"id: 9\ndata: token " + SECRET + b"\n\n: ping\n\n", events=1),
    HttpResponse(id=4, status=200, headers=((b"Content-Type", b"application/json"),
                                            (b"Set-Cookie", SECRET)),
                 body=b'{"jsonrpc":"2.0","result":"' + SECRET + b'","id":1}'),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(ALL_MESSAGES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_summary_is_json_and_names_type_id_tool(msg: Message) -> None:
    out = summarize(msg, Redactor([SECRET]))
    json.dumps(out)  # JSON-ready
    assert out["type"] == msg.TYPE
    assert out["id"] == getattr(msg, "id", None)
    assert isinstance(out["summary"], str) and out["summary"]
    assert "\n" not in out["summary"]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_no_secret_in_any_summary(msg: Message) -> None:
    text = json.dumps(summarize(msg, Redactor([SECRET])))
    for secret in (SECRET, NONCE, PROOF, SESSION):
        assert secret.decode("latin-1") not in text
        assert secret.hex() not in text
    assert repr(NONCE)[2:-1] not in text
    assert repr(PROOF)[2:-1] not in text


def test_handshake_summaries() -> None:
    assert summarize(EXAMPLES[0])["summary"] == (
        "hello agent=vm1 versions=[1] (resume requested)")
    assert "proof" not in summarize(EXAMPLES[1])
    assert "nonce" not in summarize(EXAMPLES[1])
    assert summarize(EXAMPLES[2])["summary"] == "auth (proof hidden)"
    welcome = summarize(EXAMPLES[3])
    assert "session" not in welcome
    assert welcome["summary"].startswith("welcome server=0.1.0 window=262144")


def test_http_request_summary_redacts_credential_headers() -> None:
    out = summarize(EXAMPLES[9])
    assert out["tool"] == "signal-cli"
    assert out["method"] == "POST" and out["target"] == "/api/v1/rpc?x=1"
    headers = dict((k, v) for k, v in out["headers"])
    assert headers["Authorization"] == REDACTED
    assert headers["Cookie"] == REDACTED
    assert headers["X-Api-Key"] == REDACTED
    assert headers["X-Session-Token"] == REDACTED
    assert headers["Content-Type"] == "application/json"
    assert out["summary"].startswith("POST /api/v1/rpc?x=1 (40 B) {")


def test_sensitive_header_names() -> None:
    for name in ("Authorization", "proxy-authorization", "COOKIE", "Set-Cookie", "X-API-Key",
                 "X-Auth-User", "X-Github-Token", "Client-Secret", "api_key"):
        assert is_sensitive_header(name), name
    for name in ("Content-Type", "Accept", "Last-Event-ID", "Keep-Alive", "Host"):
        assert not is_sensitive_header(name), name


def test_http_head_and_sse_summaries() -> None:
    head = summarize(EXAMPLES[10])
    assert head["status"] == 200 and head["sse"] is True
    assert head["summary"] == "200 text/event-stream (SSE)"
    assert dict(head["headers"])["Set-Cookie"] == REDACTED
    event = summarize(EXAMPLES[12])
    assert event["event"] == "receive" and event["sse_id"] == "7" and event["retry"] == 1000
    assert event["data"] == '{"seq": 1}\\nline two'
    assert event["summary"] == 'event=receive id=7 retry=1000 data={"seq": 1}\\nline two'
    assert summarize(SseEvent(id=1))["summary"] == "event=message (no data)"


def test_whole_answer_summary() -> None:
    out = summarize(EXAMPLES[-1], Redactor([SECRET]))
    assert out["status"] == 200 and out["sse"] is False and out["bytes"] == 59
    assert dict(out["headers"])["Set-Cookie"] == REDACTED
    assert out["summary"].startswith('200 application/json, whole: 59 B {"jsonrpc":"2.0"')
    assert REDACTED in out["preview"]


def test_data_preview_is_escaped() -> None:
    out = summarize(EXAMPLES[11])
    assert out["bytes"] == 13
    assert out["preview"] == "hello\\x00\\xff world"
    assert out["summary"] == "13 B hello\\x00\\xff world"


def test_cli_request_shows_argv_and_env_names_count_only() -> None:
    out = summarize(EXAMPLES[15], Redactor([SECRET]))
    assert out["tool"] == "op"
    assert out["argv"] == "item get 'my item'"
    assert out["env_count"] == 2
    text = json.dumps(out)
    assert "OP_SESSION" not in text and "/home/u'" not in text.replace("cwd", "")
    assert SECRET.decode() not in text
    assert out["summary"] == "op item get 'my item'  (cwd /home/u, 2 env names)"


def test_exit_failed_and_others() -> None:
    assert summarize(EXAMPLES[17])["summary"] == "exit 130 (signal 2) killed by signal"
    assert summarize(EXAMPLES[17])["exit_code"] == 130
    assert summarize(EXAMPLES[16])["summary"] == "stderr 11 B warning: x\\n"
    failed = summarize(EXAMPLES[21])
    assert failed["summary"] == "429 rate_limited: slow down (retry after 5 s)"
    assert summarize(EXAMPLES[20])["summary"] == "credit +131072"
    assert summarize(EXAMPLES[14])["summary"] == "end"
    assert summarize(EXAMPLES[13])["summary"] == ": keepalive"


def test_event_batch_summary() -> None:
    out = summarize(EXAMPLES[22], Redactor([SECRET]))
    assert out["events"] == 3
    assert out["sse_ids"] == ["8", "10"]
    assert out["summary"] == f"3 events id=8…10 first: data=token {REDACTED}"
    assert out["bytes"] == sum(len(v.encode()) for e in EXAMPLES[22].events  # type: ignore[attr-defined]
                               for v in e[:3] if v is not None)


def test_preview_truncates() -> None:
    r = Redactor(limit=10)
    assert r.preview(b"0123456789abcdef") == "0123456789…"
    assert r.preview(b"short") == "short"
    # a multi-byte character is never cut in half
    assert r.preview("ééééééé".encode()) == "ééééé…"


def test_secret_anywhere_is_redacted_even_across_the_cut() -> None:
    r = Redactor([SECRET], limit=20)
    assert r.preview(b"abc" + SECRET + b"def") == f"abc{REDACTED}def"
    # the secret starts before the cut and ends after it: replaced whole
    text = r.preview(b"x" * 15 + SECRET + b"tail")
    assert text.startswith("x" * 15 + REDACTED)
    assert "policy" not in text
    # a secret that starts after the cut: nothing of it shows
    text = r.preview(b"y" * 19 + SECRET)
    assert "p" not in text.replace("y", "")
    out = summarize(HttpRequest(id=1, tool="t", method="GET", target="/x?k=" + SECRET.decode(),
                                headers=((b"X-Note", SECRET),), body=SECRET * 3), r)
    assert SECRET.decode() not in json.dumps(out)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_secret_never_leaks_property(noise: bytes, where: int) -> None:
    secret = b"s3cr3t-VALUE"
    data = noise[:where] + secret + noise[where:]
    for limit in (5, 20, 120):
        text = Redactor([secret], limit=limit).preview(data)
        assert "s3cr3t-VALUE" not in text
        assert "VALUE" not in text or "VALUE" in noise.decode("utf-8", "replace")


def test_tracker_follows_tools_and_forgets_finished_requests() -> None:
    t = RequestTracker(max_ids=2)
    assert t.observe("in", EXAMPLES[9]) == "signal-cli"
    assert t.observe("out", HttpHead(id=1, status=200, headers=(), sse=False)) == "signal-cli"
    assert t.observe("in", Credit(id=1, amount=10)) == "signal-cli"
    assert t.observe("out", End(id=1)) == "signal-cli"
    assert len(t) == 0
    t.observe("in", HttpRequest(id=2, tool="signal-cli", method="POST", target="/",
                                headers=(), body=b""))
    assert t.observe("out", HttpResponse(id=2, status=200, headers=(), body=b"")) == "signal-cli"
    assert len(t) == 0  # a whole answer is final too
    # a late frame that crossed the final one still shows its tool
    assert t.observe("in", Cancel(id=1, reason="gone")) == "signal-cli"
    assert t.observe("in", End(id=99)) is None
    assert t.observe("in", Ping(nonce=1)) is None
    for i in range(10, 15):
        t.observe("in", HttpRequest(id=i, tool=f"t{i}", method="GET", target="/",
                                    headers=(), body=b""))
    assert len(t) == 2  # bounded


def test_frame_record() -> None:
    rec = frame_record(End(id=5), "out", ts=12.5, agent="vm1", tool="signal-cli")
    assert rec == {"ts": 12.5, "direction": "out", "agent": "vm1", "type": "end", "id": 5,
                   "tool": "signal-cli", "summary": "end"}


def test_filter() -> None:
    f = SummaryFilter(types=frozenset({"sse_*", "end"}), tool="signal-cli")
    assert f.matches("sse_event", 1, "signal-cli", "a")
    assert f.matches("end", 1, "signal-cli", "a")
    assert not f.matches("data", 1, "signal-cli", "a")
    assert not f.matches("end", 1, "op", "a")
    assert SummaryFilter().matches("ping", None, None, None)
    assert not SummaryFilter(id=3).matches("end", 4, None, None)
    assert not SummaryFilter(agent="b").matches("end", 4, None, "a")
    with pytest.raises(ValueError, match="unknown frame type 'sse'"):
        SummaryFilter(types=frozenset({"sse"}))
    q = SummaryFilter.from_query({"type": ["sse_event,end", "data"], "id": ["7"], "tool": [""]})
    assert q.types == {"sse_event", "end", "data"} and q.id == 7 and q.tool is None
    with pytest.raises(ValueError):
        SummaryFilter.from_query({"id": ["x"]})


def test_human_bytes() -> None:
    assert human_bytes(57) == "57 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"


def test_every_message_type_has_a_summarizer() -> None:
    assert set(_SUMMARIZERS) == set(ALL_MESSAGES)
