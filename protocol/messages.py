"""The message catalogue: one frozen, slotted class per message type on the wire.

A message travels as a msgpack map: ``{"t": <type>, <field>: <value>, ...}``.
Decoding is strict — the schema of each field is derived from its annotation
once, at import, and every map from the peer is checked against it: unknown
types, unknown or missing fields and wrong value types (``True`` is not an
int, ``"x"`` is not bytes) raise :class:`ProtocolError`. Nothing is coerced.
Locally built messages are trusted (mypy checks them) and not re-validated,
which keeps the hot path cheap.

To type checkers the classes are dataclasses (``@message`` is a
``dataclass_transform``). At run time ``@message`` is a small decorator of our
own: ``dataclasses`` and ``typing`` cost the shim, which starts once per
command, some 25 ms of imports and class generation. Use :func:`replace` and
:func:`message_fields` where you would use ``dataclasses.replace``/``fields``.
"""

from __future__ import annotations

from .errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, TypeAlias, TypeVar, dataclass_transform

    _T = TypeVar("_T")
    _M = TypeVar("_M", bound="Message")

    @dataclass_transform(frozen_default=True)
    def message(cls: type[_T]) -> type[_T]: ...

else:

    def message(cls):
        return _build_message_class(cls)


def _build_message_class(cls: type) -> type:
    annotations: dict[str, str] = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    names = tuple(n for n, text in annotations.items() if not text.startswith("ClassVar"))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    namespace = {k: v for k, v in cls.__dict__.items()
                 if k not in defaults and k not in ("__dict__", "__weakref__")}
    namespace.update(
        __slots__=names,
        __match_args__=names,
        _FIELDS=names,
        _DEFAULTS=defaults,
        _ANNOTATIONS={n: annotations[n] for n in names},
        __init__=_first_init,
    )
    built = type(cls.__name__, cls.__bases__, namespace)
    built.__qualname__ = cls.__qualname__
    return built


def _first_init(self: Message, *args: Any, **kwargs: Any) -> None:
    """Compile this class's real ``__init__`` on first use, so import stays cheap."""
    cls = type(self)
    names: tuple[str, ...] = cls._FIELDS
    defaults: dict[str, object] = cls._DEFAULTS  # type: ignore[attr-defined]
    params = ", ".join(f"{n}=_d[{n!r}]" if n in defaults else n for n in names)
    body = "".join(f"    _set(self, {n!r}, {n})\n" for n in names) or "    pass\n"
    scope: dict[str, Any] = {"_set": object.__setattr__, "_d": defaults}
    exec(f"def __init__(self, {params}):\n{body}", scope)  # our own field names only
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    type.__setattr__(cls, "__init__", init)
    init(self, *args, **kwargs)

PROTOCOL_VERSION = 1
"""Wire version; the handshake refuses peers that share no version."""

SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)

MAX_REQUEST_ID = 2**63 - 1

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]
"""HTTP headers (or environment entries) as raw ``(name, value)`` byte pairs."""

SseFields: TypeAlias = tuple[str | None, str | None, str | None, int | None]
"""One event of an ``sse_events`` batch: ``(event, data, sse_id, retry)`` as in ``sse_event``."""


class FrozenMessageError(AttributeError):
    """Messages are immutable; build a new one with :func:`replace`."""


class Message:
    """Base of every wire message. ``TYPE`` is the value of the ``"t"`` key."""

    TYPE: ClassVar[str]
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenMessageError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise FrozenMessageError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__.__name__, *self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{type(self).__name__}({inner})"


class RequestMessage(Message):
    """A message that belongs to one request and carries its ``id``."""

    __slots__ = ()
    id: int


# --------------------------------------------------------------------------
# Handshake (before the session starts). See protocol/README.md.


@message
class Hello(Message):
    """Agent → server: first frame on a new link."""

    TYPE: ClassVar[str] = "hello"
    versions: tuple[int, ...]
    agent: str
    nonce: bytes
    resume: bytes | None = None
    received: int = 0


@message
class Challenge(Message):
    """Server → agent: chosen version, server nonce and the server's proof."""

    TYPE: ClassVar[str] = "challenge"
    version: int
    nonce: bytes
    proof: bytes


@message
class Auth(Message):
    """Agent → server: the agent's proof that it holds its token."""

    TYPE: ClassVar[str] = "auth"
    proof: bytes


@message
class Welcome(Message):
    """Server → agent: the session is open."""

    TYPE: ClassVar[str] = "welcome"
    session: bytes
    window: int
    max_frame: int
    server: str
    resumed: bool = False
    received: int = 0


@message
class Reject(Message):
    """Either side: the handshake failed; the link closes after this frame."""

    TYPE: ClassVar[str] = "reject"
    code: str
    message: str


# --------------------------------------------------------------------------
# Session-wide messages.


@message
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    nonce: int


@message
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    nonce: int


@message
class GoAway(Message):
    """Server → agent: stop sending new requests; the server is shutting down."""

    TYPE: ClassVar[str] = "goaway"
    reason: str


@message
class Ack(Message):
    """Either side: how many session frames it has received (for resumption)."""

    TYPE: ClassVar[str] = "ack"
    received: int


# --------------------------------------------------------------------------
# Request messages. Every one carries the request id the agent chose.


@message
class HttpRequest(RequestMessage):
    """Agent → server: a whole HTTP request for an HTTP tool."""

    TYPE: ClassVar[str] = "http_request"
    id: int
    tool: str
    method: str
    target: str
    headers: Headers
    body: bytes


@message
class HttpHead(RequestMessage):
    """Server → agent: the upstream's status and headers; body frames follow."""

    TYPE: ClassVar[str] = "http_head"
    id: int
    status: int
    headers: Headers
    sse: bool


@message
class HttpResponse(RequestMessage):
    """Server → agent: a whole plain (not SSE) answer whose body came with its head.

    The same as ``http_head`` (``sse`` false), a ``data`` with the body (none
    when it is empty) and ``end``, in one frame: a small answer costs one
    frame to encode, send, decode and hand on instead of three. It ends the
    request.
    """

    TYPE: ClassVar[str] = "http_response"
    id: int
    status: int
    headers: Headers
    body: bytes


@message
class Data(RequestMessage):
    """A body chunk (server → agent) or a stdin chunk (agent → server)."""

    TYPE: ClassVar[str] = "data"
    id: int
    data: bytes


@message
class SseEvent(RequestMessage):
    """Server → agent: one complete SSE event block, as parsed.

    ``None`` means the field was absent from the block (which differs from
    present-but-empty for ``sse_id`` and ``data``).
    """

    TYPE: ClassVar[str] = "sse_event"
    id: int
    event: str | None = None
    data: str | None = None
    sse_id: str | None = None
    retry: int | None = None


@message
class SseEvents(RequestMessage):
    """Server → agent: consecutive events that were already at hand, in one frame.

    Means exactly what ``len(events)`` ``sse_event`` frames would, and costs
    the same credit; it only saves the per-frame work when an upstream read
    brought several events at once. Nothing ever waits to fill a batch.
    """

    TYPE: ClassVar[str] = "sse_events"
    id: int
    events: tuple[SseFields, ...]


@message
class SseComment(RequestMessage):
    """Server → agent: an SSE comment line from the upstream."""

    TYPE: ClassVar[str] = "sse_comment"
    id: int
    text: str


@message
class SseRaw(RequestMessage):
    """Server → agent: whole event blocks exactly as the upstream wrote them.

    Sent instead of ``sse_event`` frames when nothing has to be rewritten
    (no masking, no event filter): ``data`` is one upstream read's worth of
    complete blocks (events, comment lines, blank lines) in UTF-8 with LF line
    ends and ends with a blank line, so the agent writes it to its client as
    it is and the client's parser is between events afterwards. ``events`` is
    how many events (blocks that dispatch one) it holds, for the counts.
    """

    TYPE: ClassVar[str] = "sse_raw"
    id: int
    data: bytes
    events: int


@message
class End(RequestMessage):
    """End of a response body (server → agent) or of stdin (agent → server)."""

    TYPE: ClassVar[str] = "end"
    id: int


@message
class CliRequest(RequestMessage):
    """Agent → server (and shim → agent): run a CLI tool."""

    TYPE: ClassVar[str] = "cli_request"
    id: int
    tool: str
    argv: tuple[bytes, ...]
    cwd: bytes
    env: Headers
    tty: tuple[bool, ...]
    peer_uid: int | None = None
    peer_gid: int | None = None
    peer_pid: int | None = None


@message
class Output(RequestMessage):
    """Server → agent: a chunk of the process's stdout (fd 1) or stderr (fd 2)."""

    TYPE: ClassVar[str] = "output"
    id: int
    fd: int
    data: bytes


@message
class Exit(RequestMessage):
    """Server → agent: the process ended; ``code`` is what the shim exits with."""

    TYPE: ClassVar[str] = "exit"
    id: int
    code: int
    signal: int | None = None
    reason: str = ""


@message
class Signal(RequestMessage):
    """Agent → server: deliver a signal to the remote process group."""

    TYPE: ClassVar[str] = "signal"
    id: int
    signum: int


@message
class Cancel(RequestMessage):
    """Agent → server: the local client went away; stop the request now."""

    TYPE: ClassVar[str] = "cancel"
    id: int
    reason: str


@message
class Credit(RequestMessage):
    """Either side: the receiver consumed ``amount`` more bytes of this stream."""

    TYPE: ClassVar[str] = "credit"
    id: int
    amount: int


@message
class RequestFailed(RequestMessage):
    """Server → agent: the request ended with an error before (or instead of) a result.

    ``status`` is the HTTP status to answer a local HTTP client with; ``code``
    is a stable machine-readable reason (see protocol/README.md) that the shim
    maps to its exit status.
    """

    TYPE: ClassVar[str] = "failed"
    id: int
    status: int
    code: str
    message: str
    retry_after: int | None = None


ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello,
    Challenge,
    Auth,
    Welcome,
    Reject,
    Ping,
    Pong,
    GoAway,
    Ack,
    HttpRequest,
    HttpHead,
    HttpResponse,
    Data,
    SseEvent,
    SseEvents,
    SseComment,
    SseRaw,
    End,
    CliRequest,
    Output,
    Exit,
    Signal,
    Cancel,
    Credit,
    RequestFailed,
)

HANDSHAKE_MESSAGES: frozenset[type[Message]] = frozenset({Hello, Challenge, Auth, Welcome, Reject})

BY_TYPE: dict[str, type[Message]] = {cls.TYPE: cls for cls in ALL_MESSAGES}


# --------------------------------------------------------------------------
# The run-time class builder behind @message, and the schema derived from the
# (string) annotations: no dataclasses, no typing at import.


def message_fields(cls: type[Message]) -> tuple[tuple[str, str, bool], ...]:
    """``(name, annotation, required)`` for each field of a message class, in order."""
    annotations: dict[str, str] = cls._ANNOTATIONS  # type: ignore[attr-defined]
    defaults: dict[str, object] = cls._DEFAULTS  # type: ignore[attr-defined]
    return tuple((n, annotations[n], n not in defaults) for n in cls._FIELDS)


def replace(msg: _M, **changes: Any) -> _M:
    """A copy of ``msg`` with some fields changed (``dataclasses.replace`` for messages)."""
    values = {name: getattr(msg, name) for name in msg._FIELDS}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(msg).__name__} has no field(s) {', '.join(sorted(unknown))}")
    values.update(changes)
    return type(msg)(**values)


_Check: TypeAlias = "Callable[[Any], Any]"


def _fail(what: str) -> ProtocolError:
    return ProtocolError(what)


def _check_int(v: Any) -> int:
    if type(v) is not int:
        raise _fail(f"expected an integer, got {type(v).__name__}")
    return v


def _check_str(v: Any) -> str:
    if type(v) is not str:
        raise _fail(f"expected a string, got {type(v).__name__}")
    return v


def _check_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise _fail(f"expected binary data, got {type(v).__name__}")
    return v


def _check_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _fail(f"expected a boolean, got {type(v).__name__}")
    return v


_SCALARS: dict[str, _Check] = {
    "int": _check_int,
    "str": _check_str,
    "bytes": _check_bytes,
    "bool": _check_bool,
}
_ALIASES = {
    "Headers": "tuple[tuple[bytes, bytes], ...]",
    "SseFields": "tuple[str | None, str | None, str | None, int | None]",
}


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _check_headers(v: Any) -> tuple[tuple[bytes, bytes], ...]:
    """The ``Headers`` check written out: every request and response carries headers,
    and the generic nested checks cost several calls per header."""
    if type(v) is not list:
        raise _fail(f"expected an array, got {type(v).__name__}")
    out = []
    for pair in v:
        if type(pair) is not list or len(pair) != 2:
            raise _fail("expected an array of 2 items")
        name, value = pair
        if type(name) is not bytes or type(value) is not bytes:
            bad = name if type(name) is not bytes else value
            raise _fail(f"expected binary data, got {type(bad).__name__}")
        out.append((name, value))
    return tuple(out)


def _checker_for(annotation: str) -> _Check:
    text = annotation.strip()
    if text == "Headers":
        return _check_headers
    text = _ALIASES.get(text, text)
    if text in _SCALARS:
        return _SCALARS[text]
    if text.endswith("| None"):
        inner = _checker_for(text[: -len("| None")])

        def check_optional(v: Any) -> Any:
            return None if v is None else inner(v)

        return check_optional
    if text.startswith("tuple[") and text.endswith("]"):
        args = _split_top_level(text[len("tuple[") : -1])
        if len(args) == 2 and args[1] == "...":
            item = _checker_for(args[0])

            def check_list(v: Any) -> tuple[Any, ...]:
                if type(v) is not list:
                    raise _fail(f"expected an array, got {type(v).__name__}")
                return tuple(item(x) for x in v)

            return check_list
        items = [_checker_for(a) for a in args]

        def check_fixed(v: Any) -> tuple[Any, ...]:
            if type(v) is not list or len(v) != len(items):
                raise _fail(f"expected an array of {len(items)} items")
            return tuple(c(x) for c, x in zip(items, v, strict=True))

        return check_fixed
    raise TypeError(f"no wire schema for annotation {annotation!r}")  # pragma: no cover


class _Field:
    __slots__ = ("check", "name", "required")

    def __init__(self, name: str, check: _Check, required: bool) -> None:
        self.name = name
        self.check = check
        self.required = required


def _schema(cls: type[Message]) -> tuple[_Field, ...]:
    return tuple(
        _Field(name, _checker_for(annotation), required)
        for name, annotation, required in message_fields(cls)
    )


_SCHEMAS: dict[type[Message], tuple[_Field, ...]] = {cls: _schema(cls) for cls in ALL_MESSAGES}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in schema) for cls, schema in _SCHEMAS.items()
}


def message_to_map(msg: Message) -> dict[str, Any]:
    """The msgpack-ready map for ``msg`` (tuples pack as arrays)."""
    out: dict[str, Any] = {"t": msg.TYPE}
    for name in _FIELD_NAMES[type(msg)]:
        out[name] = getattr(msg, name)
    return out


def message_from_map(obj: Any) -> Message:
    """Validate a decoded msgpack object and build its message, or raise ProtocolError."""
    if type(obj) is not dict:
        raise ProtocolError(f"a frame must hold a map, not {type(obj).__name__}")
    kind = obj.get("t")
    if type(kind) is not str:
        raise ProtocolError("frame has no message type (string key 't')")
    cls = BY_TYPE.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind[:40]!r}")
    schema = _SCHEMAS[cls]
    if len(obj) - 1 > len(schema):
        known = {"t", *_FIELD_NAMES[cls]}
        extra = sorted(str(k)[:40] for k in obj if k not in known)
        raise ProtocolError(f"{kind}: unknown field(s) {', '.join(extra)}")
    values: dict[str, Any] = {}
    seen = 1
    for field in schema:
        if field.name in obj:
            seen += 1
            try:
                values[field.name] = field.check(obj[field.name])
            except ProtocolError as exc:
                raise ProtocolError(f"{kind}.{field.name}: {exc}") from None
        elif field.required:
            raise ProtocolError(f"{kind}: missing field {field.name!r}")
    if seen != len(obj):
        known = {"t", *_FIELD_NAMES[cls]}
        extra = sorted(str(k)[:40] for k in obj if k not in known)
        raise ProtocolError(f"{kind}: unknown field(s) {', '.join(extra)}")
    if "id" in values and not 1 <= values["id"] <= MAX_REQUEST_ID:
        raise ProtocolError(f"{kind}.id: request id {values['id']} out of range")
    rule = _VALUE_RULES.get(cls)
    if rule is not None:
        problem = rule(values)
        if problem is not None:
            raise ProtocolError(f"{kind}.{problem}")
    return cls(**values)


# --------------------------------------------------------------------------
# Value rules the annotations cannot express (protocol/README.md), checked on
# decode so that no consumer meets a value it cannot act on: a shim that would
# index tty[2], an SSE serializer asked to put a line break in an event type.
# Each returns "field: problem" or None.


def _single_line(value: str | None) -> bool:
    return value is None or ("\n" not in value and "\r" not in value)


def _cli_request_rule(values: dict[str, Any]) -> str | None:
    if len(values["tty"]) != 3:
        return "tty: expected [stdin, stdout, stderr], 3 booleans"
    return None


def _output_rule(values: dict[str, Any]) -> str | None:
    if values["fd"] not in (1, 2):
        return f"fd: {values['fd']} is neither 1 (stdout) nor 2 (stderr)"
    return None


def _credit_rule(values: dict[str, Any]) -> str | None:
    if values["amount"] <= 0:
        return f"amount: credit must be positive, got {values['amount']}"
    return None


def _sse_fields_problem(event: str | None, sse_id: str | None, retry: int | None) -> str | None:
    if retry is not None and retry < 0:
        return f"retry: must not be negative, got {retry}"
    if not _single_line(event):
        return "event: contains a line break"
    if not _single_line(sse_id) or (sse_id is not None and "\x00" in sse_id):
        return "sse_id: contains a line break or NUL"
    return None


def _sse_event_rule(values: dict[str, Any]) -> str | None:
    return _sse_fields_problem(values.get("event"), values.get("sse_id"), values.get("retry"))


def _sse_events_rule(values: dict[str, Any]) -> str | None:
    events = values["events"]
    if not events:
        return "events: a batch holds at least one event"
    for i, (event, _data, sse_id, retry) in enumerate(events):
        problem = _sse_fields_problem(event, sse_id, retry)
        if problem is not None:
            return f"events[{i}].{problem}"
    return None


def _sse_raw_rule(values: dict[str, Any]) -> str | None:
    if values["events"] < 0:
        return f"events: must not be negative, got {values['events']}"
    if not values["data"].endswith(b"\n\n"):
        return "data: does not end with a blank line (a whole event block)"
    if b"\r" in values["data"]:
        return "data: contains a CR (only LF line ends travel raw)"
    return None


def _sse_comment_rule(values: dict[str, Any]) -> str | None:
    if not _single_line(values["text"]):
        return "text: contains a line break"
    return None


_VALUE_RULES: dict[type[Message], Callable[[dict[str, Any]], str | None]] = {
    CliRequest: _cli_request_rule,
    Output: _output_rule,
    Credit: _credit_rule,
    SseEvent: _sse_event_rule,
    SseEvents: _sse_events_rule,
    SseComment: _sse_comment_rule,
    SseRaw: _sse_raw_rule,
}

