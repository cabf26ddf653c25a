"""Short, secret-free summaries of wire messages, for the sniff feeds.

Sans-IO like the rest of the package: :func:`summarize` turns one message
into a small JSON-ready dict (its ``type``, request ``id``, ``tool`` when the
message names one, a one-line ``summary`` and a few type-specific fields);
:class:`RequestTracker` remembers which tool each live request belongs to so
that every later frame of the request can show it; :class:`SummaryFilter`
is the small filter language both feeds share. The server's debug listener
and ``carapace-debug sniff --proxy`` both use them, so a frame reads the same
wherever it was caught.

What never shows:

- handshake secrets: nonces, proofs, the session id and the resume ticket
  (``hello`` shows the agent name and versions, ``challenge`` the version);
- environment values: a ``cli_request`` shows its argv preview and how many
  variables it carries, never their values;
- the values of credential headers — ``Authorization``, ``Proxy-Authorization``,
  ``Cookie``, ``Set-Cookie``, ``X-Api-Key`` and any header whose name contains
  ``token``, ``secret``, ``key`` or ``auth`` — which read ``[REDACTED]``;
- any byte string given to :class:`Redactor` (the server passes its policy's
  injected secrets), wherever it appears in a preview.

Bodies and other payloads are previewed, not shown: at most ``limit``
characters (default 120), control characters and invalid UTF-8 escaped
repr-style (``\\n``, ``\\x00``), and an ellipsis when cut.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .messages import (
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
    Headers,
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
    RequestMessage,
    Signal,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
    Welcome,
)

__all__ = [
    "DEFAULT_PREVIEW",
    "FRAME_TYPES",
    "REDACTED",
    "Direction",
    "Redactor",
    "RequestTracker",
    "SummaryFilter",
    "frame_record",
    "human_bytes",
    "is_sensitive_header",
    "summarize",
]

Direction = Literal["in", "out"]
"""``in``: agent → server; ``out``: server → agent (the server's point of view)."""

REDACTED = "[REDACTED]"
DEFAULT_PREVIEW = 120
"""Characters of a body, event data or argument shown before it is cut."""

FRAME_TYPES: tuple[str, ...] = tuple(cls.TYPE for cls in ALL_MESSAGES)

_SENSITIVE_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"x-api-key"}
)
_SENSITIVE_WORDS = (b"token", b"secret", b"key", b"auth")

# Control characters (C0, DEL, C1) escaped so that a preview stays on one line and
# cannot drive the terminal; everything else printable is kept as is.
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def is_sensitive_header(name: bytes | str) -> bool:
    """True for a header whose value is a credential and must never be shown."""
    raw = name.encode("latin-1", "replace") if isinstance(name, str) else name
    lower = raw.strip().lower()
    return lower in _SENSITIVE_HEADERS or any(word in lower for word in _SENSITIVE_WORDS)


def human_bytes(n: int) -> str:
    """``57 B``, ``1.2 KiB``, ``3.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _render(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace").translate(_ESCAPES)


_LINE_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _LINE_ESCAPES:
        return _LINE_ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped ``repr``-style (``\\n``,
    ``\\x1b``, ``\\u2028``, a bidi override as ``\\u202e``): a VM-chosen string shown on
    a terminal or written to a log can neither drive it nor break or forge a line.
    Backslashes are not doubled, so a Windows path stays readable."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


class Redactor:
    """Makes previews: cut to ``limit`` characters, with every secret replaced.

    A secret that starts inside the shown part is always replaced whole, even
    when it runs past the cut; bytes past the cut are never shown at all, so a
    secret cannot leak half-way through either.
    """

    def __init__(self, secrets: Iterable[bytes] = (), limit: int = DEFAULT_PREVIEW) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        unique = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.secrets: tuple[bytes, ...] = tuple(unique)
        self._pattern: re.Pattern[bytes] | None = (
            re.compile(b"|".join(re.escape(s) for s in unique)) if unique else None
        )
        self._longest = len(unique[0]) if unique else 0

    def _cut(self, data: bytes, end: int) -> int:
        """``end`` moved back to a UTF-8 character boundary (never before 0)."""
        while 0 < end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1
        return end

    def preview(self, data: bytes) -> str:
        """A one-line preview of ``data``: about ``limit`` characters, secrets redacted.

        Every shown byte costs at least one character, so no more than the
        remaining budget of bytes can show after ``pos``: a secret that starts
        in that span is found (the search reaches one secret length past it)
        and replaced whole; bytes past the span never show.
        """
        limit = self.limit
        pattern = self._pattern
        pieces: list[str] = []
        used = 0
        pos = 0
        size = len(data)
        truncated = False
        while pos < size:
            remaining = limit - used
            if remaining <= 0:
                truncated = True
                break
            match = None
            if pattern is not None:
                match = pattern.search(data, pos, pos + remaining + self._longest)
                if match is not None and match.start() >= pos + remaining:
                    match = None
            if match is None:
                end = self._cut(data, min(size, pos + remaining))
                rendered = _render(data[pos:end])
                pieces.append(rendered[:remaining])
                truncated = len(rendered) > remaining or end < size
                break
            rendered = _render(data[pos : match.start()])
            if len(rendered) > remaining:
                pieces.append(rendered[:remaining])
                truncated = True
                break
            pieces.append(rendered)
            pieces.append(REDACTED)
            used += len(rendered) + len(REDACTED)
            pos = match.end()
        if truncated:
            pieces.append("…")
        return "".join(pieces)

    def text(self, value: str) -> str:
        """:meth:`preview` for a string field."""
        return self.preview(value.encode("utf-8", "surrogateescape"))

    def header_value(self, name: bytes, value: bytes) -> str:
        return REDACTED if is_sensitive_header(name) else self.preview(value)

    def headers(self, headers: Headers) -> list[list[str]]:
        return [
            [_render(name[:80]), self.header_value(name, value)] for name, value in headers
        ]

    def argv(self, argv: Iterable[bytes]) -> str:
        """The arguments as one shell-quoted line, each redacted, the whole cut to ``limit``."""
        words = [shlex.quote(self.preview(arg)) for arg in argv]
        line = " ".join(words)
        return line if len(line) <= self.limit else line[: self.limit] + "…"


_PLAIN = Redactor()


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


_Fields = dict[str, Any]
_Summarizer = Callable[[Any, "Redactor"], tuple[_Fields, str]]
"""Turns one message of one type into its type-specific fields and its summary line."""


def _content_type(msg: HttpHead | HttpResponse, r: Redactor) -> str | None:
    ctype = _header(msg.headers, b"content-type")
    return None if ctype is None else r.preview(ctype)


def _sse_size(*values: str | None) -> int:
    """Bytes of the event's data, name and id: what the sniff feed counts for an event."""
    return sum(len(v.encode("utf-8", "surrogateescape")) for v in values if v is not None)


def _http_request(msg: HttpRequest, r: Redactor) -> tuple[_Fields, str]:
    target = r.text(msg.target)
    body = r.preview(msg.body)
    method = printable(msg.method[:20])
    fields = {"tool": printable(msg.tool), "method": method, "target": target,
              "headers": r.headers(msg.headers), "bytes": len(msg.body), "body": body}
    summary = f"{method} {target}"
    if msg.body:
        summary += f" ({human_bytes(len(msg.body))}) {body}"
    return fields, summary


def _http_head(msg: HttpHead, r: Redactor) -> tuple[_Fields, str]:
    ctype = _content_type(msg, r)
    fields = {"status": msg.status, "sse": msg.sse, "headers": r.headers(msg.headers),
              "content_type": ctype}
    summary = f"{msg.status}"
    if ctype is not None:
        summary += f" {ctype}"
    if msg.sse:
        summary += " (SSE)"
    return fields, summary


def _http_response(msg: HttpResponse, r: Redactor) -> tuple[_Fields, str]:
    ctype = _content_type(msg, r)
    preview = r.preview(msg.body)
    fields = {"status": msg.status, "sse": False, "headers": r.headers(msg.headers),
              "content_type": ctype, "bytes": len(msg.body), "preview": preview}
    summary = f"{msg.status}"
    if ctype is not None:
        summary += f" {ctype}"
    summary += f", whole: {human_bytes(len(msg.body))} {preview}"
    return fields, summary


def _data(msg: Data, r: Redactor) -> tuple[_Fields, str]:
    preview = r.preview(msg.data)
    return ({"bytes": len(msg.data), "preview": preview},
            f"{human_bytes(len(msg.data))} {preview}")


def _sse_event(msg: SseEvent, r: Redactor) -> tuple[_Fields, str]:
    data = None if msg.data is None else r.text(msg.data)
    event = None if msg.event is None else r.text(msg.event)
    sse_id = None if msg.sse_id is None else r.text(msg.sse_id)
    fields = {"event": event, "data": data, "sse_id": sse_id, "retry": msg.retry,
              "bytes": _sse_size(msg.data, msg.event, msg.sse_id)}
    parts = [f"event={event or 'message'}"]
    if sse_id is not None:
        parts.append(f"id={sse_id}")
    if msg.retry is not None:
        parts.append(f"retry={msg.retry}")
    parts.append("(no data)" if data is None else f"data={data}")
    return fields, " ".join(parts)


def _sse_events(msg: SseEvents, r: Redactor) -> tuple[_Fields, str]:
    size = sum(_sse_size(data, event, sse_id) for event, data, sse_id, _ in msg.events)
    ids = [r.text(e[2]) for e in (msg.events[0], msg.events[-1]) if e[2] is not None]
    first_data = msg.events[0][1]
    data = None if first_data is None else r.text(first_data)
    fields = {"events": len(msg.events), "bytes": size, "sse_ids": ids, "data": data}
    parts = [f"{len(msg.events)} events"]
    if ids:
        parts.append("id=" + "…".join(dict.fromkeys(ids)))
    parts.append("first: (no data)" if data is None else f"first: data={data}")
    return fields, " ".join(parts)


def _sse_comment(msg: SseComment, r: Redactor) -> tuple[_Fields, str]:
    text = r.text(msg.text)
    return {"text": text}, f":{text}"


def _sse_raw(msg: SseRaw, r: Redactor) -> tuple[_Fields, str]:
    preview = r.preview(msg.data)
    noun = "event" if msg.events == 1 else "events"
    return ({"events": msg.events, "bytes": len(msg.data), "preview": preview},
            f"{msg.events} {noun} as sent, {human_bytes(len(msg.data))} {preview}")


def _end(msg: End, r: Redactor) -> tuple[_Fields, str]:
    return {}, "end"


def _cli_request(msg: CliRequest, r: Redactor) -> tuple[_Fields, str]:
    argv = r.argv(msg.argv)
    cwd = r.preview(msg.cwd)
    fields = {"tool": printable(msg.tool), "argv": argv, "argc": len(msg.argv), "cwd": cwd,
              "env_count": len(msg.env), "tty": list(msg.tty),
              # what the VM's agent says SO_PEERCRED told it: a claim, not a fact
              "vm_claimed_peer_uid": msg.peer_uid, "vm_claimed_peer_gid": msg.peer_gid,
              "vm_claimed_peer_pid": msg.peer_pid}
    summary = (f"{shlex.quote(printable(msg.tool))} {argv}".rstrip()
               + f"  (cwd {cwd}, {len(msg.env)} env names)")
    return fields, summary


def _output(msg: Output, r: Redactor) -> tuple[_Fields, str]:
    stream = {1: "stdout", 2: "stderr"}.get(msg.fd, f"fd{msg.fd}")
    preview = r.preview(msg.data)
    return ({"fd": msg.fd, "bytes": len(msg.data), "preview": preview},
            f"{stream} {human_bytes(len(msg.data))} {preview}")


def _exit(msg: Exit, r: Redactor) -> tuple[_Fields, str]:
    reason = r.text(msg.reason)
    summary = f"exit {msg.code}"
    if msg.signal is not None:
        summary += f" (signal {msg.signal})"
    if msg.reason:
        summary += f" {reason}"
    return {"exit_code": msg.code, "signal": msg.signal, "reason": reason}, summary


def _signal(msg: Signal, r: Redactor) -> tuple[_Fields, str]:
    return {"signum": msg.signum}, f"signal {msg.signum}"


def _cancel(msg: Cancel, r: Redactor) -> tuple[_Fields, str]:
    reason = r.text(msg.reason)
    return {"reason": reason}, f"cancel: {reason}"


def _credit(msg: Credit, r: Redactor) -> tuple[_Fields, str]:
    return {"amount": msg.amount}, f"credit +{msg.amount}"


def _failed(msg: RequestFailed, r: Redactor) -> tuple[_Fields, str]:
    code = r.text(msg.code)
    message = r.text(msg.message)
    summary = f"{msg.status} {code}: {message}"
    if msg.retry_after is not None:
        summary += f" (retry after {msg.retry_after} s)"
    fields = {"status": msg.status, "code": code, "message": message,
              "retry_after": msg.retry_after}
    return fields, summary


def _hello(msg: Hello, r: Redactor) -> tuple[_Fields, str]:
    agent = r.text(msg.agent)
    summary = f"hello agent={agent} versions={list(msg.versions)}"
    if msg.resume is not None:
        summary += " (resume requested)"
    return {"agent": agent, "versions": list(msg.versions),
            "resume": msg.resume is not None}, summary


def _challenge(msg: Challenge, r: Redactor) -> tuple[_Fields, str]:
    return ({"version": msg.version},
            f"challenge version={msg.version} (nonce and proof hidden)")


def _auth(msg: Auth, r: Redactor) -> tuple[_Fields, str]:
    return {}, "auth (proof hidden)"


def _welcome(msg: Welcome, r: Redactor) -> tuple[_Fields, str]:
    server = r.text(msg.server)
    fields = {"server": server, "window": msg.window, "max_frame": msg.max_frame,
              "resumed": msg.resumed}
    summary = (f"welcome server={server} window={msg.window} "
               f"max_frame={msg.max_frame} resumed={str(msg.resumed).lower()}")
    return fields, summary


def _reject(msg: Reject, r: Redactor) -> tuple[_Fields, str]:
    code = r.text(msg.code)
    message = r.text(msg.message)
    return {"code": code, "message": message}, f"reject {code}: {message}"


def _ping_pong(msg: Ping | Pong, r: Redactor) -> tuple[_Fields, str]:
    return {"nonce": msg.nonce}, f"{msg.TYPE} {msg.nonce}"


def _goaway(msg: GoAway, r: Redactor) -> tuple[_Fields, str]:
    reason = r.text(msg.reason)
    return {"reason": reason}, f"goaway: {reason}"


def _ack(msg: Ack, r: Redactor) -> tuple[_Fields, str]:
    return {"received": msg.received}, f"ack received={msg.received}"


_SUMMARIZERS: dict[type[Message], _Summarizer] = {
    HttpRequest: _http_request,
    HttpHead: _http_head,
    HttpResponse: _http_response,
    Data: _data,
    SseEvent: _sse_event,
    SseEvents: _sse_events,
    SseComment: _sse_comment,
    SseRaw: _sse_raw,
    End: _end,
    CliRequest: _cli_request,
    Output: _output,
    Exit: _exit,
    Signal: _signal,
    Cancel: _cancel,
    Credit: _credit,
    RequestFailed: _failed,
    Hello: _hello,
    Challenge: _challenge,
    Auth: _auth,
    Welcome: _welcome,
    Reject: _reject,
    Ping: _ping_pong,
    Pong: _ping_pong,
    GoAway: _goaway,
    Ack: _ack,
}
"""One summarizer per message class: a new message type without an entry here fails
the summary tests (every type in ``ALL_MESSAGES`` must have one)."""


def summarize(msg: Message, redactor: Redactor | None = None) -> dict[str, Any]:
    """A JSON-ready description of ``msg`` without any secret in it.

    Always has ``type``, ``id`` (None for session messages), ``tool`` (None
    unless the message names one) and ``summary`` (one line); the other keys
    depend on the type (``method``/``target``, ``status``, ``event``/``data``,
    ``argv``, ``exit_code``, ``bytes``, …).
    """
    out: dict[str, Any] = {
        "type": msg.TYPE,
        "id": msg.id if isinstance(msg, RequestMessage) else None,
        "tool": None,
    }
    summarizer = _SUMMARIZERS.get(type(msg))
    if summarizer is None:  # pragma: no cover - every type in ALL_MESSAGES has one
        out["summary"] = msg.TYPE
        return out
    fields, summary = summarizer(msg, redactor or _PLAIN)
    out.update(fields)
    out["summary"] = summary
    return out


def frame_record(
    msg: Message,
    direction: Direction,
    *,
    ts: float,
    agent: str | None,
    tool: str | None = None,
    redactor: Redactor | None = None,
) -> dict[str, Any]:
    """One entry of a sniff feed: :func:`summarize` plus when, which way and whose.

    ``tool`` (from a :class:`RequestTracker`) fills in the tool of frames
    that do not name it themselves.
    """
    record: dict[str, Any] = {"ts": ts, "direction": direction, "agent": agent}
    record.update(summarize(msg, redactor))
    if record["tool"] is None:
        record["tool"] = tool
    return record


_FINAL_OUT = (End, HttpResponse, RequestFailed, Exit)


class RequestTracker:
    """Which tool each live request id on one link belongs to.

    Feed it every frame of the link, both directions, in order: a request
    frame registers its id, the server's final frame (``end``,
    ``http_response``, ``failed``, ``exit``) retires it (the last
    ``max_done`` retired ids are remembered for frames that cross the final
    one). At most ``max_ids`` live ids are kept (the oldest go first), so a
    peer that never finishes its requests cannot grow it.
    """

    def __init__(self, max_ids: int = 4096, max_done: int = 256) -> None:
        self.max_ids = max_ids
        self.max_done = max_done
        self._tools: dict[int, str] = {}
        self._done: dict[int, str] = {}
        """Recently finished requests, so that late frames (a ``cancel`` or ``credit``
        crossing the final frame) still show their tool."""

    def __len__(self) -> int:
        return len(self._tools)

    def tool_of(self, request_id: int) -> str | None:
        return self._tools.get(request_id) or self._done.get(request_id)

    def observe(self, direction: Direction, msg: Message) -> str | None:
        """Note ``msg``; return the tool of its request (None for session messages)."""
        if not isinstance(msg, RequestMessage):
            return None
        if isinstance(msg, HttpRequest | CliRequest):
            shown = printable(msg.tool)  # as every summary shows it
            self._tools[msg.id] = shown
            if len(self._tools) > self.max_ids:
                del self._tools[next(iter(self._tools))]
            return shown
        if direction == "out" and isinstance(msg, _FINAL_OUT):
            tool = self._tools.pop(msg.id, None)
            if tool is not None:
                self._done[msg.id] = tool
                if len(self._done) > self.max_done:
                    del self._done[next(iter(self._done))]
            return tool
        return self.tool_of(msg.id)


@dataclass(frozen=True)
class SummaryFilter:
    """Which frames a sniff subscriber wants. Empty fields match everything.

    ``types`` holds frame type names or shell-style patterns (``sse_*``,
    ``http_*``); ``tool``, ``id`` and ``agent`` must equal the frame's.
    """

    types: frozenset[str] = field(default_factory=frozenset)
    tool: str | None = None
    id: int | None = None
    agent: str | None = None

    def __post_init__(self) -> None:
        for pattern in self.types:
            if not any(fnmatch.fnmatchcase(t, pattern) for t in FRAME_TYPES):
                raise ValueError(
                    f"unknown frame type {pattern!r}; known: {', '.join(FRAME_TYPES)}"
                )

    @classmethod
    def from_query(cls, query: Mapping[str, list[str]]) -> SummaryFilter:
        """From URL query parameters ``type`` (repeatable, or comma-separated), ``tool``,
        ``id`` and ``agent``; ValueError names a bad value."""

        def last(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values and values[-1] != "" else None

        types = frozenset(
            t.strip() for v in query.get("type", []) for t in v.split(",") if t.strip()
        )
        raw_id = last("id")
        request_id: int | None = None
        if raw_id is not None:
            if not raw_id.isdigit():
                raise ValueError(f"id={raw_id[:40]!r} is not a request id")
            request_id = int(raw_id)
        return cls(types=types, tool=last("tool"), id=request_id, agent=last("agent"))

    def type_matches(self, frame_type: str) -> bool:
        return not self.types or any(fnmatch.fnmatchcase(frame_type, p) for p in self.types)

    def matches(
        self, frame_type: str, request_id: int | None, tool: str | None, agent: str | None
    ) -> bool:
        if self.id is not None and request_id != self.id:
            return False
        if self.tool is not None and tool != self.tool:
            return False
        if self.agent is not None and agent != self.agent:
            return False
        return self.type_matches(frame_type)
