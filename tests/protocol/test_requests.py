"""Per-request states: the frames of one request, in the orders protocol/README.md allows."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carapace.protocol import messages as m
from carapace.protocol.errors import ProtocolError
from carapace.protocol.requests import (
    AGENT,
    ENDS_REQUEST,
    OPENINGS,
    SENT_BY,
    SERVER,
    SHIM_SENDS,
    TRANSITIONS,
    RequestState,
    State,
)

HTTP = m.HttpRequest(id=1, tool="t", method="GET", target="/", headers=(), body=b"")
CLI = m.CliRequest(id=1, tool="t", argv=(), cwd=b"/", env=(), tty=(False, False, False))

# One letter per server frame, so the allowed orders can be written as regular expressions.
SERVER_FRAMES: dict[str, m.RequestMessage] = {
    "H": m.HttpHead(id=1, status=200, headers=(), sse=False),
    "S": m.HttpHead(id=1, status=200, headers=(), sse=True),
    "R": m.HttpResponse(id=1, status=200, headers=(), body=b"{}"),
    "d": m.Data(id=1, data=b"x"),
    "e": m.SseEvent(id=1, data="x"),
    "b": m.SseEvents(id=1, events=(("a", "b", None, None), (None, "c", None, None))),
    "c": m.SseComment(id=1, text="c"),
    "E": m.End(id=1),
    "o": m.Output(id=1, fd=1, data=b"x"),
    "X": m.Exit(id=1, code=0),
    "F": m.RequestFailed(id=1, status=502, code="upstream_unavailable", message="no"),
}
# Every prefix of an allowed answer (README: "Request states").
HTTP_ANSWER = re.compile(r"|R|F|Hd*[EF]?|S[ebc]*[EF]?")
CLI_ANSWER = re.compile(r"|F|o*[XF]?")


def longest_accepted(opening: m.RequestMessage, letters: str) -> str:
    state = RequestState.opened_by(opening)
    for i, letter in enumerate(letters):
        before = (state.agent, state.server)
        try:
            state.process(SERVER, SERVER_FRAMES[letter])
        except ProtocolError:
            assert (state.agent, state.server) == before, "a refused frame changed the state"
            return letters[:i]
    return letters


@given(st.text(alphabet="HSRdebcEoXF", max_size=12))
def test_an_http_answer_is_accepted_exactly_as_far_as_the_spec_allows(letters: str) -> None:
    accepted = longest_accepted(HTTP, letters)
    assert HTTP_ANSWER.fullmatch(accepted)
    if accepted != letters:
        assert not HTTP_ANSWER.fullmatch(letters[: len(accepted) + 1])


@given(st.text(alphabet="HSRdebcEoXF", max_size=12))
def test_a_cli_answer_is_accepted_exactly_as_far_as_the_spec_allows(letters: str) -> None:
    accepted = longest_accepted(CLI, letters)
    assert CLI_ANSWER.fullmatch(accepted)
    if accepted != letters:
        assert not CLI_ANSWER.fullmatch(letters[: len(accepted) + 1])


@pytest.mark.parametrize(("opening", "letters", "final"), [
    (HTTP, "R", State.DONE),
    (HTTP, "HddE", State.DONE),
    (HTTP, "HdF", State.FAILED),
    (HTTP, "SebcE", State.DONE),
    (HTTP, "SeF", State.FAILED),
    (HTTP, "F", State.FAILED),
    (CLI, "ooX", State.DONE),
    (CLI, "oF", State.FAILED),
])
def test_every_answer_ends_the_request(opening: m.RequestMessage, letters: str,
                                       final: State) -> None:
    state = RequestState.opened_by(opening)
    for letter in letters:
        assert not state.finished
        state.process(SERVER, SERVER_FRAMES[letter])
    assert state.server is final and state.finished
    for frame in SERVER_FRAMES.values():  # after the final frame the id is dead
        with pytest.raises(ProtocolError, match="may not come after the request"):
            state.process(SERVER, frame)


def test_the_server_cannot_answer_what_was_not_asked() -> None:
    with pytest.raises(ProtocolError, match="http_head may not come before the request"):
        RequestState().process(SERVER, SERVER_FRAMES["H"])


def test_the_refusal_says_where() -> None:
    state = RequestState.opened_by(HTTP)
    state.process(SERVER, SERVER_FRAMES["S"])
    with pytest.raises(ProtocolError) as info:
        state.process(SERVER, m.Data(id=1, data=b"x"))
    assert str(info.value) == "data may not come in an event stream (request 1)"


def test_the_agents_stdin_ends_once_and_signals_still_go() -> None:
    state = RequestState.opened_by(CLI)
    assert state.agent is State.SEND_STDIN and state.server is State.SEND_OUTPUT
    state.process(AGENT, m.Data(id=1, data=b"in"))
    state.process(AGENT, m.Signal(id=1, signum=2))
    state.process(AGENT, m.End(id=1))
    state.process(AGENT, m.Signal(id=1, signum=15))
    for late in (m.Data(id=1, data=b"late"), m.End(id=1)):
        with pytest.raises(ProtocolError, match="may not come after the end of stdin"):
            state.process(AGENT, late)
    assert state.agent is State.STDIN_DONE


def test_an_http_request_is_one_frame_and_may_be_cancelled_once() -> None:
    state = RequestState.opened_by(HTTP)
    assert state.agent is State.SENT and state.server is State.SEND_RESPONSE
    with pytest.raises(ProtocolError):
        state.process(AGENT, m.Data(id=1, data=b"more body"))
    state.process(AGENT, m.Cancel(id=1, reason="gone"))
    assert state.agent is State.CANCELLED
    with pytest.raises(ProtocolError):
        state.process(AGENT, m.Cancel(id=1, reason="again"))
    # The server may still be answering (its handler has not stopped yet): its machine
    # does not see the cancel, and the agent drops what comes for the dead id.
    state.process(SERVER, SERVER_FRAMES["R"])


def test_a_request_is_opened_once() -> None:
    state = RequestState.opened_by(CLI)
    with pytest.raises(ProtocolError):
        state.process(AGENT, CLI)


def test_who_sends_what_matches_the_message_catalogue() -> None:
    """Every request message is sent by someone; only data, end and credit by both."""
    request_types = {cls for cls in vars(m).values()
                     if isinstance(cls, type) and issubclass(cls, m.RequestMessage)
                     and cls is not m.RequestMessage}
    assert SENT_BY[AGENT] | SENT_BY[SERVER] == request_types
    assert SENT_BY[AGENT] & SENT_BY[SERVER] == {m.Data, m.End, m.Credit}
    assert OPENINGS == {m.HttpRequest, m.CliRequest}
    assert ENDS_REQUEST == {m.End, m.HttpResponse, m.Exit, m.RequestFailed}
    assert SHIM_SENDS < SENT_BY[AGENT]


def test_the_table_names_every_state_it_reaches() -> None:
    for table in TRANSITIONS.values():
        for moves in table.values():
            for new in moves.values():
                assert new in table
