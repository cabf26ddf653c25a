"""The MCP message filter of one stdio session: sans-IO, line by line, both ways.

Bytes in, bytes out; no trio, no clock of its own (``clock`` is injected).
The VM's MCP client writes newline-delimited JSON-RPC into
:meth:`McpFilter.from_client`; what may reach the host server comes back,
with the replies Carapace makes itself (denials) for the client. The host
server's stdout goes through :meth:`McpFilter.from_server`: answers to the
lists are filtered, answers to calls are timed and sized for the audit trail
(:attr:`McpFilter.records`). Every output holds whole lines only, so a reply
of Carapace's own can go between two of them.

Bounded: a line longer than ``max_message_bytes`` ends the session (it is
never buffered whole), and so do more than ``max_pending`` requests waiting
for an answer. A client message that is not JSON-RPC ends the session too
(:class:`McpProtocolError`: the client and the filter no longer agree on
what was asked, and an answer could otherwise slip past unfiltered).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..policy import DEFAULT_TIMEOUT_SECS, Decision, McpTool
from ..policy.mcp import (
    CALL_METHODS,
    LIST_RESULTS,
    decide_mcp_request,
    filter_list,
    notification_passes,
    parse_message,
)

DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
"""Largest MCP message either way (``--mcp-max-message-bytes``): MCP results carry
file contents and images as base64, a few MiB at most in practice; a line over it is
never buffered whole, so a session costs at most this much memory per direction."""

MAX_PENDING: Final = 1024
"""Client requests waiting for the host server's answer (``--mcp-max-pending``): far above
what a client keeps in flight (it waits for its LLM between calls), small enough to bound
the ids kept."""

DENIED: Final = -32001
"""JSON-RPC error code of a request the host policy denied (server-defined range)."""
TIMED_OUT: Final = -32002
"""JSON-RPC error code of a request the host server did not answer in ``timeout_secs``."""
UNCHECKABLE: Final = -32603
"""JSON-RPC internal error: the host server's answer was not the shape MCP gives it."""


class McpProtocolError(Exception):
    """The session must end: the message says why, for the client's stderr.

    ``reason`` is a fixed label for the metrics: ``too_large``, ``too_many_pending``
    or ``not_jsonrpc``.
    """

    def __init__(self, message: str, reason: str = "not_jsonrpc") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class CallRecord:
    """One MCP call, for the audit trail, the metrics and the sniff feed."""

    method: str
    subject: str | None
    decision: Decision
    outcome: str
    """``answered``, ``error`` (the host server answered with an error), ``denied``,
    ``not_approved`` (held for a person, who did not say yes), ``timed_out``,
    ``cancelled`` (by the client) or ``unanswered`` (the session ended)."""
    duration: float = 0.0
    result_bytes: int = 0
    approval: str = ""
    """How its approval ended, for a call held for one (``approved``, ``denied``, ...)."""


@dataclass
class Gated:
    """An allowed ``tools/call`` that waits for a person before the host server sees it."""

    msg_id: Any
    key: str
    name: str
    arguments: Any
    decision: Decision
    message: dict[str, Any]
    started: float


@dataclass
class _Pending:
    method: str
    subject: str | None
    decision: Decision
    started: float
    deadline: float
    approval: str = ""


def _id_key(msg_id: Any) -> str | None:
    """A request id as a dict key; None if it is not one MCP allows (string or integer)."""
    if isinstance(msg_id, str) or (isinstance(msg_id, int) and not isinstance(msg_id, bool)):
        return json.dumps(msg_id)
    return None


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def error_reply(msg_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


class _Lines:
    """Splits a byte stream into lines, holding at most ``limit`` bytes of one."""

    def __init__(self, limit: int, who: str) -> None:
        self.limit = limit
        self.who = who
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        start = len(self.buf)  # only the new bytes can hold the next newline
        self.buf += data
        lines: list[bytes] = []
        begin = 0
        while (end := self.buf.find(b"\n", start)) >= 0:
            if end - begin > self.limit:
                self._over()
            lines.append(bytes(self.buf[begin:end]))
            begin = start = end + 1
        del self.buf[:begin]
        if len(self.buf) > self.limit:
            self._over()
        return lines

    def _over(self) -> None:
        raise McpProtocolError(
            f"{self.who} sent an MCP message over {self.limit} bytes (the server's "
            "--mcp-max-message-bytes); the session is closed", "too_large")

    def rest(self) -> bytes:
        rest, self.buf = bytes(self.buf), bytearray()
        return rest


class McpFilter:
    """Both directions of one session under one MCP tool's rules."""

    def __init__(self, tool: McpTool, clock: Callable[[], float], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_pending: int = MAX_PENDING,
                 limit: Callable[[Decision], Decision] | None = None) -> None:
        self.tool = tool
        self.clock = clock
        self.timeout = float(tool.timeout_secs or DEFAULT_TIMEOUT_SECS)
        self.max_pending = max_pending
        self.limit = limit
        """Applied to each allowed call (the rate limits); may turn it into a deny."""
        self.max_message_bytes = max_message_bytes
        self._client = _Lines(max_message_bytes, "the MCP client")
        self._server = _Lines(max_message_bytes, "the host MCP server")
        self.pending: dict[str, _Pending] = {}
        self.abandoned: dict[str, None] = {}
        """Ids Carapace answered itself (timed out, cancelled): their late answers are dropped."""
        self.records: list[CallRecord] = []
        self.gated: list[Gated] = []
        """Calls judged but held for approval, not yet handed to the waiting side."""
        self.waiting: dict[str, Gated] = {}
        """Every call held for approval, by id key, until :meth:`release` or :meth:`refuse`."""
        self.withdrawn: list[str] = []
        """Id keys of held calls the client cancelled (their approvals are withdrawn)."""
        self.dropped_from_server = 0
        """Lines of the host server that were not JSON-RPC (dropped, not relayed)."""

    @property
    def held(self) -> tuple[int, int]:
        """Bytes of a partial line held from the client and from the server."""
        return len(self._client.buf), len(self._server.buf)

    # -- the VM's client -> the host server ----------------------------------------------

    def from_client(self, data: bytes) -> tuple[bytes, bytes]:
        """(bytes for the host server's stdin, replies for the client's stdout)."""
        to_server, replies = bytearray(), bytearray()
        for line in self._client.feed(data):
            self._client_line(line, to_server, replies)
        return bytes(to_server), bytes(replies)

    def client_closed(self) -> tuple[bytes, bytes]:
        """End of the client's stream: a last line without its newline is still a message."""
        to_server, replies = bytearray(), bytearray()
        rest = self._client.rest()
        if rest.strip():
            self._client_line(rest, to_server, replies)
        return bytes(to_server), bytes(replies)

    def _client_line(self, line: bytes, to_server: bytearray, replies: bytearray) -> None:
        if not line.strip():
            return
        doc, problem = parse_message(line)
        if problem is not None:
            raise McpProtocolError(f"the MCP client sent a message that is not JSON: {problem}; "
                                   "the session is closed")
        if isinstance(doc, list):
            if not doc:
                raise McpProtocolError("the MCP client sent an empty batch, which is not "
                                       "JSON-RPC; the session is closed")
            kept: list[Any] = []
            denials: list[Any] = []
            for i, item in enumerate(doc):
                out = self._client_message(item, f"element {i} of a batch")
                if out is True:
                    kept.append(item)
                elif out is not None:
                    denials.append(out)
            if kept:
                to_server += _line(kept)
            if denials:
                replies += _line(denials)
            return
        out = self._client_message(doc, "a message")
        if out is True:
            to_server += line.rstrip(b"\r") + b"\n"
        elif out is not None:
            replies += _line(out)

    def _client_message(self, msg: Any, what: str) -> dict[str, Any] | bool | None:
        """True: forward it; a dict: Carapace's reply instead; None: drop it silently."""
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            raise McpProtocolError(f"the MCP client sent {what} that is not a JSON-RPC 2.0 "
                                   "object; the session is closed")
        method = msg.get("method")
        if "method" in msg and not isinstance(method, str):
            raise McpProtocolError(f"the MCP client sent {what} whose method is not a string; "
                                   "the session is closed")
        if method is None:  # an answer to a request of the host server's (sampling, roots)
            if "id" not in msg or ("result" in msg) == ("error" in msg):
                raise McpProtocolError(f"the MCP client sent {what} that is neither a request, "
                                       "a notification nor a response; the session is closed")
            return True
        if "id" not in msg:
            return self._client_notification(method, msg.get("params"))
        key = _id_key(msg["id"])
        if key is None:
            raise McpProtocolError(f"the MCP client sent {what} whose id is not a string or "
                                   "an integer; the session is closed")
        if key in self.pending or key in self.abandoned or key in self.waiting:
            raise McpProtocolError(f"the MCP client reused request id {key[:40]} while it is "
                                   "still in use; the session is closed")
        verdict = decide_mcp_request(self.tool, method, msg.get("params"))
        decision = verdict.decision
        if decision.allow and method in CALL_METHODS and self.limit is not None:
            decision = self.limit(decision)
        if not decision.allow:
            self.records.append(CallRecord(method, verdict.subject, decision, "denied"))
            return error_reply(msg["id"], DENIED, _vm_text(decision))
        if len(self.pending) + len(self.waiting) >= self.max_pending:
            raise McpProtocolError(f"the MCP client has more than {self.max_pending} requests "
                                   "waiting for an answer (the server's --mcp-max-pending); "
                                   "the session is closed",
                                   "too_many_pending")
        now = self.clock()
        if decision.needs_approval and method == "tools/call":
            gated = Gated(msg["id"], key, verdict.subject or "",
                          msg["params"].get("arguments"), decision, msg, now)
            self.waiting[key] = gated
            self.gated.append(gated)
            return None
        self.pending[key] = _Pending(method, verdict.subject, decision, now, now + self.timeout)
        return True

    # -- calls held for approval -------------------------------------------------------------

    def take_gated(self) -> list[Gated]:
        """The calls newly held for approval (each is then released or refused once)."""
        gated, self.gated = self.gated, []
        return gated

    def release(self, gated: Gated, outcome: str = "approved") -> bytes:
        """An approved call: its line for the host server; its timeout starts now."""
        if self.waiting.pop(gated.key, None) is None:
            return b""
        now = self.clock()
        self.pending[gated.key] = _Pending("tools/call", gated.name, gated.decision, now,
                                           now + self.timeout, outcome)
        return _line(gated.message)

    def refuse(self, gated: Gated, message: str, outcome: str,
               call_outcome: str = "not_approved") -> bytes:
        """A call not approved: Carapace's error reply for the client (the server never
        sees it); ``outcome`` is the approval's (``denied``, ``timeout``, ...)."""
        if self.waiting.pop(gated.key, None) is None:
            return b""
        self.records.append(CallRecord("tools/call", gated.name, gated.decision,
                                       call_outcome, self.clock() - gated.started,
                                       approval=outcome))
        return _line(error_reply(gated.msg_id, DENIED, message))

    def _client_notification(self, method: str, params: Any) -> bool | None:
        if method == "notifications/cancelled" and isinstance(params, dict):
            key = _id_key(params.get("requestId"))
            if key is not None and key in self.pending:
                self._abandon(key, "cancelled")
            if key is not None and key in self.waiting:  # the server never saw it
                self.withdrawn.append(key)
                return None
            return True
        if method.startswith("notifications/"):
            return True
        # A call without an id would still be acted on by a lenient server: judge it.
        verdict = decide_mcp_request(self.tool, method, params)
        if verdict.decision.allow:
            return True
        self.records.append(CallRecord(method, verdict.subject, verdict.decision, "denied"))
        return None

    def _abandon(self, key: str, outcome: str) -> _Pending:
        call = self.pending.pop(key)
        self.abandoned[key] = None
        if len(self.abandoned) > self.max_pending:
            del self.abandoned[next(iter(self.abandoned))]
        if call.method in CALL_METHODS:
            self.records.append(CallRecord(call.method, call.subject, call.decision, outcome,
                                           self.clock() - call.started,
                                           approval=call.approval))
        return call

    # -- timeouts ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self.pending.values()), default=None)

    def expire(self) -> bytes:
        """Replies for the requests past their deadline (their late answers are dropped)."""
        now = self.clock()
        out = bytearray()
        for key in [k for k, p in self.pending.items() if p.deadline <= now]:
            call = self._abandon(key, "timed_out")
            out += _line(error_reply(
                json.loads(key), TIMED_OUT,
                f"{call.method} was not answered within {self.timeout:g} s on the host "
                "(the tool's timeout_secs in the host policy)"))
        return bytes(out)

    def session_ended(self) -> None:
        """Record the calls left without an answer (or still waiting for approval)."""
        for gated in list(self.waiting.values()):
            self.refuse(gated, "", "withdrawn")
        self.gated.clear()
        self.withdrawn.clear()
        for key in list(self.pending):
            self._abandon(key, "unanswered")

    # -- the host server -> the VM's client ------------------------------------------------

    def from_server(self, data: bytes) -> bytes:
        out = bytearray()
        for line in self._server.feed(data):
            self._server_line(line, out)
        return bytes(out)

    def server_closed(self) -> bytes:
        out = bytearray()
        rest = self._server.rest()
        if rest.strip():
            self._server_line(rest, out)
        return bytes(out)

    def _server_line(self, line: bytes, out: bytearray) -> None:
        if not line.strip():
            return
        doc, problem = parse_message(line)
        if problem is not None:
            self.dropped_from_server += 1
            return
        if isinstance(doc, list):
            kept = [m for m in (self._server_message(item, len(line)) for item in doc)
                    if m is not None]
            if kept:
                out += _line(kept)
            return
        msg = self._server_message(doc, len(line))
        if msg is doc:
            out += line.rstrip(b"\r") + b"\n"
        elif msg is not None:
            out += _line(msg)

    def _server_message(self, msg: Any, size: int) -> Any:
        """What of one message may reach the client: it, a changed copy, or None."""
        if not isinstance(msg, dict):
            self.dropped_from_server += 1
            return None
        method = msg.get("method")
        if isinstance(method, str):
            if "id" in msg:  # the host server asks the client something (sampling, roots)
                return msg
            return msg if notification_passes(self.tool, method, msg.get("params")) else None
        key = _id_key(msg.get("id"))
        if key is None:
            return msg
        if key in self.abandoned:
            del self.abandoned[key]
            return None
        call = self.pending.pop(key, None)
        if call is None:
            return msg
        if call.method in LIST_RESULTS and "result" in msg:
            checked = filter_list(self.tool, call.method, msg["result"])
            if checked is None:
                return error_reply(msg["id"], UNCHECKABLE,
                                   f"the host MCP server's {call.method} answer could not be "
                                   "checked against the host policy, so it was withheld")
            return {**msg, "result": checked[0]}
        if call.method in CALL_METHODS:
            failed = "error" in msg or (isinstance(msg.get("result"), dict)
                                        and msg["result"].get("isError") is True)
            self.records.append(CallRecord(call.method, call.subject, call.decision,
                                           "error" if failed else "answered",
                                           self.clock() - call.started, size, call.approval))
        return msg


def _vm_text(decision: Decision) -> str:
    """What the client is told about a deny (the reason never quotes argument values)."""
    if decision.code == "rate_limited":
        return f"rate limited by the host policy (Carapace): {decision.reason}"
    return f"denied by the host policy (Carapace): {decision.reason}"
