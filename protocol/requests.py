"""Per-request state: which frames of one request may follow which.

Everything that decides whether a request frame may come now lives here, as
data: :data:`TRANSITIONS` maps role → state → event → new state, and
:func:`transition` is the one place an illegal move raises ``ProtocolError``.
The rules are those of protocol/README.md ("Request states").

Two roles, each with its own state. The *agent* asks (``http_request`` or
``cli_request``, then stdin, signals, ``cancel``); the *server* answers. The
server's machine also sees the agent's opening frame, which says what kind of
answer is due, the way h11's server machine sees the client's ``Request``. An
event is a message type; an ``http_head`` that starts an event stream is the
event ``(HttpHead, SSE)``, since what may follow it differs.

``credit`` is no event here: it is flow control (``flow.py``), which either
side sends in any state until the id is dead. Nor is the agent's ``cancel``
seen by the server's machine: the server may go on sending until its handler
has stopped, and the agent drops frames for an id it has let go.
"""

from __future__ import annotations

from enum import Enum

from .errors import ProtocolError
from .messages import (
    Cancel,
    CliRequest,
    Credit,
    Data,
    End,
    Exit,
    HttpHead,
    HttpRequest,
    HttpResponse,
    Message,
    Output,
    RequestFailed,
    RequestMessage,
    Signal,
    SseComment,
    SseEvent,
    SseEvents,
    SseRaw,
)


class Role(Enum):
    AGENT = "agent"
    SERVER = "server"


class State(Enum):
    """Where one role is in one request; the value says where a frame was refused."""

    IDLE = "before the request"
    # The agent's states.
    SENT = "after an http_request"  # the whole request is in its one frame
    SEND_STDIN = "while stdin is open"
    STDIN_DONE = "after the end of stdin"
    CANCELLED = "after cancel"
    # The server's states.
    SEND_RESPONSE = "before the response head"
    SEND_BODY = "in a plain body"
    SEND_EVENTS = "in an event stream"
    SEND_OUTPUT = "in a command's output"
    DONE = "after the request ended"
    FAILED = "after the request failed"


class Tag(Enum):
    """What else, beside its type, makes a message a different event."""

    SSE = "sse"


Event = type[Message] | tuple[type[Message], Role | Tag]

AGENT, SERVER = Role.AGENT, Role.SERVER
SSE_HEAD: Event = (HttpHead, Tag.SSE)

TRANSITIONS: dict[Role, dict[State, dict[Event, State]]] = {
    AGENT: {
        State.IDLE: {HttpRequest: State.SENT, CliRequest: State.SEND_STDIN},
        State.SENT: {Cancel: State.CANCELLED},
        State.SEND_STDIN: {
            Data: State.SEND_STDIN,
            Signal: State.SEND_STDIN,
            End: State.STDIN_DONE,
            Cancel: State.CANCELLED,
        },
        State.STDIN_DONE: {Signal: State.STDIN_DONE, Cancel: State.CANCELLED},
        State.CANCELLED: {},
    },
    SERVER: {
        State.IDLE: {
            (HttpRequest, AGENT): State.SEND_RESPONSE,
            (CliRequest, AGENT): State.SEND_OUTPUT,
        },
        State.SEND_RESPONSE: {
            HttpHead: State.SEND_BODY,
            SSE_HEAD: State.SEND_EVENTS,
            HttpResponse: State.DONE,  # a whole answer in one frame
            RequestFailed: State.FAILED,
        },
        State.SEND_BODY: {Data: State.SEND_BODY, End: State.DONE, RequestFailed: State.FAILED},
        State.SEND_EVENTS: {
            SseEvent: State.SEND_EVENTS,
            SseEvents: State.SEND_EVENTS,
            SseComment: State.SEND_EVENTS,
            SseRaw: State.SEND_EVENTS,
            End: State.DONE,
            RequestFailed: State.FAILED,
        },
        State.SEND_OUTPUT: {Output: State.SEND_OUTPUT, Exit: State.DONE,
                            RequestFailed: State.FAILED},
        State.DONE: {},
        State.FAILED: {},
    },
}

FINAL: frozenset[State] = frozenset({State.DONE, State.FAILED})
"""The server's states after which the request id is dead."""


def _message_type(event: Event) -> type[Message]:
    return event[0] if isinstance(event, tuple) else event


OPENINGS: frozenset[type[Message]] = frozenset(
    _message_type(event) for event in TRANSITIONS[AGENT][State.IDLE])
"""Frames that start a request (with a new id)."""

SENT_BY: dict[Role, frozenset[type[Message]]] = {
    role: frozenset(
        _message_type(event)
        for moves in table.values()
        for event in moves
        if not (isinstance(event, tuple) and isinstance(event[1], Role))
    ) | {Credit}
    for role, table in TRANSITIONS.items()
}
"""The request frames each role may send at all (``credit`` in every state)."""

ENDS_REQUEST: frozenset[type[Message]] = frozenset(
    _message_type(event)
    for moves in TRANSITIONS[SERVER].values()
    for event, new in moves.items()
    if new in FINAL
)
"""The server's frames after which the request id is dead."""

SHIM_SENDS: frozenset[type[Message]] = frozenset({CliRequest, Data, End, Signal})
"""What a shim may send on its socket: the agent's role without ``cancel`` (a shim
hangs up instead) and without ``credit`` (the socket has its own backpressure)."""


def event_of(msg: Message) -> Event:
    """The event ``msg`` is in :data:`TRANSITIONS`."""
    if type(msg) is HttpHead and msg.sse:
        return SSE_HEAD
    return type(msg)


def transition(role: Role, state: State, msg: RequestMessage,
               event: Event | None = None) -> State:
    """The state ``role`` is in after sending ``msg`` in ``state``; the one place that refuses.

    Raises ProtocolError for a frame that may not come now.
    """
    try:
        return TRANSITIONS[role][state][event_of(msg) if event is None else event]
    except KeyError:
        # The state says whose rule it is; the sender is named by the caller's log
        # (on the shim socket the agent's rules are the shim's).
        raise ProtocolError(f"{msg.TYPE} may not come {state.value} (request {msg.id})") from None


class RequestState:
    """Both roles' states for one request."""

    __slots__ = ("agent", "server")

    def __init__(self) -> None:
        self.agent = State.IDLE
        self.server = State.IDLE

    @classmethod
    def opened_by(cls, msg: RequestMessage) -> RequestState:
        """A request that ``msg`` (an ``http_request`` or a ``cli_request``) has started."""
        state = cls()
        state.process(AGENT, msg)
        return state

    def process(self, role: Role, msg: RequestMessage) -> State:
        """Advance ``role`` by the frame it sent; ProtocolError (nothing changed) if illegal."""
        if role is AGENT:
            new = transition(AGENT, self.agent, msg)
            if self.agent is State.IDLE:  # the opening also tells the server what to answer
                self.server = transition(SERVER, self.server, msg, (type(msg), AGENT))
            self.agent = new
        else:
            new = self.server = transition(SERVER, self.server, msg)
        return new

    @property
    def finished(self) -> bool:
        """The server has sent its final frame: the id is dead."""
        return self.server in FINAL

    def __repr__(self) -> str:
        return f"RequestState(agent={self.agent.name}, server={self.server.name})"
