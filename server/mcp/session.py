"""One MCP stdio session on the host: the filter plugged into a CLI run, and its records.

A VM's MCP client runs a shim (``carapace-agent shims install github-mcp``);
the shim's ``cli_request`` names a ``type: mcp`` tool, and the pipeline runs
the tool's ``command`` like any CLI tool (same spawning, same confinement,
same masking of stderr) with :class:`McpHook` on its stdin and stdout. Each
MCP call the filter judges becomes an ``mcp_call`` audit record, a count in
the metrics and an entry of the sniff feed (:data:`McpObserver`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..approval_gate import ApprovalGate, vm_message
from ..approvals import Verdict
from ..audit import AuditEntry, AuditTrail
from ..cli_runner import HookRefusal, OutputFilter
from ..masking import Scrubber
from ..metrics import ServerMetrics
from ..policy import INLINE_DECIDE_BYTES, Decision, McpTool
from .filter import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_PENDING,
    CallRecord,
    Gated,
    McpFilter,
    McpProtocolError,
)

log = logging.getLogger("carapace.server")

McpObserver = Callable[[dict[str, Any]], None]
"""Called with each MCP call's summary (the sniff feed); must not raise or block."""


class _WholeChunkScrub:
    """Masks stdout chunk by chunk: the hook hands out whole lines, and a line of JSON has
    no raw line break for a secret to straddle, so nothing needs holding back (a held
    tail would let a reply of Carapace's land inside a message)."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber

    def feed(self, data: bytes) -> bytes:
        return self.scrubber.scrub(data)

    def flush(self) -> bytes:
        return b""


def output_filters(scrubber: Scrubber) -> Callable[[int], OutputFilter]:
    """stdout masked whole-chunk (see :class:`_WholeChunkScrub`), stderr as a stream."""
    return lambda fd: _WholeChunkScrub(scrubber) if fd == 1 else scrubber.stream()


Offload = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a costly step away from the event loop (a worker thread) and waits for it."""


class McpHook:
    """:class:`~carapace.server.cli_runner.StdioHook` over an :class:`McpFilter`.

    A step over ``INLINE_DECIDE_BYTES`` (parsing a 4 MiB message takes tens of
    milliseconds) runs through ``offload``, as large policy decisions do; one
    step at a time, so the filter is never used by two threads at once.
    """

    def __init__(self, session: McpSession, filt: McpFilter,
                 offload: Offload | None = None) -> None:
        self.session = session
        self.filter = filt
        self.offload = offload
        self._lock = trio.Lock()
        self._gated = trio.Event()
        """Set when a step held calls for approval (:meth:`run_gates` starts their waits)."""
        self._gates = trio.CancelScope()
        self._waits: dict[str, trio.CancelScope] = {}
        """The wait of each held call, by id key (a client's cancel ends it)."""

    async def _step(self, fn: Callable[[], Any], size: int = 0) -> Any:
        async with self._lock:
            try:
                if self.offload is not None and size > INLINE_DECIDE_BYTES:
                    return await self.offload(fn)
                return fn()
            except McpProtocolError as exc:
                self.session.refused(exc)
                raise HookRefusal(str(exc)) from None
            finally:
                self.session.flush()
                if self.filter.gated or self.filter.withdrawn:
                    self._gated.set()

    async def run_gates(self, deliver: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        """For the whole session: each call held for approval waits in a task of its own
        (the session's other messages go on meanwhile); its line for the host server or
        Carapace's reply goes out through ``deliver``. Cancelled (the client closed its
        stdin, the session ended): every wait is withdrawn."""
        with self._gates:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._gated.wait()
                    self._gated = trio.Event()
                    for gated in self.filter.take_gated():
                        self._waits[gated.key] = scope = trio.CancelScope()
                        nursery.start_soon(self._gate, gated, scope, deliver)
                    withdrawn, self.filter.withdrawn = self.filter.withdrawn, []
                    for key in withdrawn:  # notifications/cancelled from the client
                        if key in self._waits:
                            self._waits[key].cancel()

    async def _gate(self, gated: Gated, scope: trio.CancelScope,
                    deliver: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        verdict: Verdict | None = None
        try:
            with scope:
                verdict = await self.session.ask(gated)
        finally:
            del self._waits[gated.key]
        async with self._lock:
            if verdict is None:  # the client cancelled it: no answer is due
                self.filter.refuse(gated, "", "withdrawn", "cancelled")
                self.session.flush()
                return
            out = self.session.settle(gated, verdict)
        await deliver(*out)

    async def to_process(self, data: bytes) -> tuple[bytes, bytes]:
        return await self._step(lambda: self.filter.from_client(data), len(data))  # type: ignore[no-any-return]

    async def stdin_closed(self) -> tuple[bytes, bytes]:
        self._gates.cancel()  # the client is gone: nobody waits for what it asked
        return await self._step(self.filter.client_closed, self.filter.held[0])  # type: ignore[no-any-return]

    async def from_process(self, data: bytes) -> bytes:
        return await self._step(lambda: self.filter.from_server(data), len(data))  # type: ignore[no-any-return]

    async def stdout_closed(self) -> bytes:
        return await self._step(self.filter.server_closed, self.filter.held[1])  # type: ignore[no-any-return]

    def next_deadline(self) -> float | None:
        return self.filter.next_deadline()

    async def expire(self) -> bytes:
        return await self._step(self.filter.expire)  # type: ignore[no-any-return]


class McpSession:
    """The records of one session: audit, metrics, sniff, for every call its filter judges."""

    def __init__(self, tool: McpTool, agent: str, request_id: int, entry: AuditEntry, *,
                 audit: AuditTrail, metrics: ServerMetrics,
                 observers: Sequence[McpObserver] = (),
                 limit: Callable[[Decision], Decision] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_pending: int = MAX_PENDING,
                 offload: Offload | None = None,
                 gate: ApprovalGate | None = None) -> None:
        self.tool = tool
        self.gate = gate
        """Where a call the policy holds for approval waits (none: it is refused)."""
        self.agent = agent
        self.request_id = request_id
        self.entry = entry
        self.audit = audit
        self.metrics = metrics
        self.observers = observers
        self.refusal: str | None = None
        # The filter may run in a worker thread, where trio.current_time cannot be
        # read: its clock is the monotonic clock moved onto trio's (for the deadlines).
        offset = trio.current_time() - time.monotonic()
        self.filter = McpFilter(tool, lambda: time.monotonic() + offset,
                                max_message_bytes=max_message_bytes,
                                max_pending=max_pending, limit=limit)
        self.hook = McpHook(self, self.filter, offload)

    async def ask(self, gated: Gated) -> Verdict:
        """How the approval of one held call ended (cancelled: withdrawn and re-raised)."""
        if self.gate is None:
            return Verdict("refused", reason="this server has no approvals")
        return await self.gate.ask_mcp(self.agent, self.tool, gated.name, gated.arguments,
                                       gated.decision, self.entry)

    def settle(self, gated: Gated, verdict: Verdict) -> tuple[bytes, bytes]:
        """(the call's line for the host server, or Carapace's reply for the client)."""
        try:
            if verdict.approved:
                return self.filter.release(gated, verdict.outcome), b""
            return b"", self.filter.refuse(gated, vm_message(verdict), verdict.outcome)
        finally:
            self.flush()

    def refused(self, exc: McpProtocolError) -> None:
        self.refusal = str(exc)
        self.metrics.count_mcp_refused(self.tool.name, exc.reason)

    def finish(self) -> None:
        """The session is over: record the calls left unanswered."""
        self.filter.session_ended()
        self.flush()
        if self.filter.dropped_from_server:
            log.warning("request %s: dropped %d line(s) of the host MCP server %s that were "
                        "not JSON-RPC", self.entry.request_id, self.filter.dropped_from_server,
                        self.tool.name)

    def flush(self) -> None:
        records, self.filter.records = self.filter.records, []
        for record in records:
            self._record(record)

    def _record(self, call: CallRecord) -> None:
        fields: dict[str, Any] = {
            "mcp_method": call.method, "mcp_tool": call.subject, "outcome": call.outcome,
            "duration_ms": round(call.duration * 1000, 3), "result_bytes": call.result_bytes,
        }
        if call.approval:
            fields["approval"] = call.approval
        self.audit.mcp_call(self.entry, call.decision, fields)
        self.metrics.count_mcp_call(self.tool.name, call.method, call.outcome,
                                    call.result_bytes)
        if not call.decision.allow:
            log.log(self.entry.log_level, "denied MCP %s %s on tool %s for agent %s (%s): %s",
                    call.method, call.subject, self.tool.name, self.agent,
                    self.entry.request_id, call.decision.reason)
        if not self.observers:
            return
        took = f", {fields['duration_ms']:.0f} ms, {call.result_bytes} B" if call.decision.allow \
            else ""
        summary = (f"{call.method} {call.subject or ''} → {call.decision.decision} "
                   f"({call.outcome}{took})")
        record = {"type": "mcp_call", "ts": time.time(), "direction": "in",
                  "agent": self.agent, "tool": self.tool.name, "id": self.request_id,
                  "decision": call.decision.decision, "rule": call.decision.rule,
                  **fields, "summary": summary}
        for observer in list(self.observers):
            try:
                observer(record)
            except Exception:  # an observer must never break the session it watches
                log.exception("an MCP call observer failed")
