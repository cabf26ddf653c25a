"""The server's audit trail: one request's records (:class:`AuditEntry`) and the
trail that redacts and writes them (:class:`AuditTrail`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from carapace.protocol.messages import CliRequest, HttpRequest

from ..policy import AuditConfig, Decision, Policy
from .caps import DEFAULT_MAX_RECORD_BYTES, RecordCap
from .records import (
    MAX_TOOL,
    base_fields,
    cli_completion_fields,
    cli_decision_fields,
    http_completion_fields,
    http_decision_fields,
    truncate,
    utc_timestamp,
    verdict_fields,
)
from .redaction import AuditRedactor
from .rotating_log import AuditError, AuditLog
from .throttle import DEFAULT_DENY_BYTES, DEFAULT_DENY_LIMIT, DenyThrottle

if TYPE_CHECKING:
    from ..cli_runner import ExitInfo
    from ..streams import ResponseSent

log = logging.getLogger("carapace.server")

CUT_LOG_EVERY_SECS = 60.0
"""At most one log line per minute about records cut to size: a VM can make every
record large, and the log must not become the flood the cap stops in the audit file."""


class AuditEntry:
    """One request's records: :meth:`decided` before it runs, :meth:`completed` after."""

    def __init__(
        self,
        trail: AuditTrail,
        base: dict[str, Any],
        decision_fields: dict[str, Any],
        write: bool,
    ) -> None:
        self.trail = trail
        self.base = base
        self.decision_fields = decision_fields
        self.write = write
        self.started = time.monotonic()
        self.done = False
        self.suppressed = False
        """A deny past the agent's deny limit or byte budget: counted, not recorded."""

    @property
    def request_id(self) -> str:
        return str(self.base["request_id"])

    @property
    def log_level(self) -> int:
        """Where the server logs this request's deny: at debug level once its record is
        suppressed, so that a flood of denials does not flood the journal either (whose
        own rate limit would then drop the lines that matter)."""
        return logging.DEBUG if self.suppressed else logging.INFO

    async def decided(self) -> None:
        """Write (and flush, and with --audit-fsync sync) the decision record.

        Raises :class:`AuditError` if it cannot be written: then the request
        must not run.
        """
        if not self.write or self.trail.log is None:
            return
        record = {"ts": utc_timestamp(), "event": "decision", **self.base,
                  **self.decision_fields}
        data, cut = self.trail.encode(record)
        if self.base["decision"] != "allow" and not self.trail.admit_deny(
                self.base, str(self.decision_fields.get("code")), len(data)):
            self.suppressed = True
            return  # counted for a denials_suppressed record: a deny runs nothing
        self.trail.write(record, data, cut)
        await self.trail.log.sync()

    def completed(self, **fields: Any) -> None:
        """Write the completion record (once). Never raises: the request has already run."""
        if self.done:
            return
        self.done = True
        if not self.write or self.trail.log is None or self.base["decision"] != "allow":
            return  # a deny never ran: its decision record is the whole story
        duration_ms = round((time.monotonic() - self.started) * 1000, 3)
        record = {"ts": utc_timestamp(), "event": "completion", **self.base,
                  "duration_ms": duration_ms}
        record.update({k: v for k, v in fields.items() if v is not None})
        try:
            self.trail.emit(record)
        except AuditError as exc:
            log.error("audit: lost the completion record of request %s: %s",
                      self.request_id, exc)

    def revoked(self, decision: Decision) -> None:
        """Write the ``revoked`` record: a reloaded policy denies this request, which is
        ended now (its completion record follows). Written even with ``audit.enabled:
        false``, as every deny is. Never raises: the request is ended either way."""
        if self.trail.log is None:
            return
        record = {"ts": utc_timestamp(), "event": "revoked", **self.base,
                  "decision": decision.decision, **verdict_fields(decision)}
        try:
            self.trail.emit(record)
        except AuditError as exc:
            log.error("audit: lost the revoked record of request %s: %s", self.request_id, exc)

    def completed_http(self, sent: ResponseSent, bytes_in: int, aborted: str | None = None,
                       cancel_reason: str | None = None) -> None:
        """``sent``: what the request's stream recorded sending (``ServerStream.sent``).

        ``aborted``: None if the relay ran to its end, ``cancelled`` or ``error`` if not.
        """
        self.completed(**http_completion_fields(sent, bytes_in, aborted, cancel_reason))

    def completed_cli(self, info: ExitInfo) -> None:
        self.completed(**cli_completion_fields(info))


class AuditTrail:
    """The server's audit trail: builds records under the policy, redacts and writes them.

    ``log`` None (no ``--audit-log``) makes every call a no-op.
    """

    def __init__(self, log: AuditLog | None,
                 deny_limit: tuple[int, float] = DEFAULT_DENY_LIMIT,
                 deny_bytes: int = DEFAULT_DENY_BYTES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.log = log
        self.redactor = AuditRedactor()
        self.deny_throttle = DenyThrottle(*deny_limit, max_bytes=deny_bytes)
        self.cap = RecordCap(max_record_bytes)
        self.truncated_records = 0
        """Records written with something cut to the size caps."""
        self._cut_logged_at: float | None = None
        self._cut_since_logged = 0

    def admit_deny(self, base: Mapping[str, Any], code: str, size: int = 0) -> bool:
        """Whether a deny gets its own record (see "Floods of denials"); a summary of
        the agent's earlier suppressed denials is written first, to keep the order."""
        agent = str(base["agent"])
        now, ts = time.monotonic(), utc_timestamp()
        tool = truncate(str(base["tool"]), MAX_TOOL)  # as the record names it; bounded
        if not self.deny_throttle.admit(agent, tool, code, now, ts, size):
            return False
        self.write_summaries(self.deny_throttle.due(now, agent=agent))
        return True

    def flush_suppressed(self, everything: bool = False) -> None:
        """Write the summaries that are due (all of them at shutdown). Never raises."""
        try:
            self.write_summaries(self.deny_throttle.due(time.monotonic(),
                                                        everything=everything))
        except AuditError as exc:
            log.error("audit: lost a denials_suppressed record: %s", exc)

    def write_summaries(self, records: Iterable[dict[str, Any]]) -> None:
        if self.log is None:
            return
        for summary in records:
            record = {"ts": utc_timestamp(), **summary}
            data, cut = self.encode(record)
            self.deny_throttle.charge(str(record["agent"]), time.monotonic(), len(data))
            self.write(record, data, cut)

    def add_secrets(self, values: Iterable[str | bytes]) -> None:
        self.redactor.add(values)

    def encode(self, record: dict[str, Any]) -> tuple[bytes, list[str]]:
        """The record's line (secrets redacted, then cut to the size caps) and the keys
        that were cut."""
        redactor = self.redactor
        if redactor.verbatim_in_json:
            # The usual record holds no secret and needs no cut: encode it once and look
            # for secrets in the line (one regex pass) instead of walking it to copy it.
            # A secret in any string would be in the line as itself; a cut or a match
            # takes the full path, so no cut ever splits a secret or digests one.
            data, cut = self.cap.encode(record)
            if not cut and not redactor.found_in(data.decode("ascii")):
                return data, cut
        return self.cap.encode(redactor.redact(record))

    def write(self, record: Mapping[str, Any], data: bytes, cut: list[str]) -> None:
        """Append an encoded record (raises AuditError); count and report what was cut."""
        assert self.log is not None
        self.log.write_line(data)
        if cut:
            self.truncated_records += 1
            self._log_cut(record, cut)

    def _log_cut(self, record: Mapping[str, Any], cut: list[str]) -> None:
        self._cut_since_logged += 1
        now = time.monotonic()
        if self._cut_logged_at is not None and now - self._cut_logged_at < CUT_LOG_EVERY_SECS:
            return
        log.warning("audit: cut %s of a %s record of agent %s to the size caps (fields "
                    "over %d bytes, records over %d: --audit-max-record-bytes); %d record(s) "
                    "cut since the last such message; the record's 'truncated' key lists them",
                    ", ".join(cut), record.get("event"), record.get("agent"),
                    self.cap.max_field_bytes, self.cap.max_record_bytes,
                    self._cut_since_logged)
        self._cut_logged_at = now
        self._cut_since_logged = 0

    def emit(self, record: dict[str, Any]) -> None:
        if self.log is None:
            return
        self.write(record, *self.encode(record))

    def reopen(self) -> None:
        if self.log is None:
            return
        try:
            self.log.reopen()
        except AuditError as exc:
            log.error("audit: %s (will retry on the next record)", exc)

    @staticmethod
    def _config(policy: Policy, tool: str) -> AuditConfig:
        found = policy.tools.get(tool)
        return found.audit if found is not None else AuditConfig()

    def http(self, agent: str, session_id: bytes, req: HttpRequest, policy: Policy,
             decision: Decision, kind: str = "http") -> AuditEntry:
        """An HTTP request's records (``kind`` ``mcp`` for one to an MCP server's url)."""
        cfg = self._config(policy, req.tool)
        # Without a log nothing is written: the decision's fields would be built for nothing.
        fields = http_decision_fields(req, cfg, decision) if self.log is not None else {}
        base = base_fields(agent, session_id, req.id, req.tool, kind, decision)
        return AuditEntry(self, base, fields, write=cfg.enabled or not decision.allow)

    def cli(self, agent: str, session_id: bytes, req: CliRequest, policy: Policy,
            decision: Decision, kind: str = "cli") -> AuditEntry:
        """A CLI request's records (``kind`` ``mcp`` for an MCP session, which starts as one)."""
        cfg = self._config(policy, req.tool)
        fields = cli_decision_fields(req, cfg, decision)
        base = base_fields(agent, session_id, req.id, req.tool, kind, decision)
        return AuditEntry(self, base, fields, write=cfg.enabled or not decision.allow)

    def mcp_call(self, session: AuditEntry, decision: Decision,
                 fields: Mapping[str, Any]) -> None:
        """One MCP call of a session: its own ``mcp_call`` record. Never raises.

        Denies are always recorded (through the deny throttle); allowed calls
        only when the tool's audit is enabled, as for every request.
        """
        if self.log is None or (decision.allow and not session.write):
            return
        record = {"ts": utc_timestamp(), "event": "mcp_call", **session.base,
                  "decision": decision.decision, **verdict_fields(decision), **fields}
        try:
            data, cut = self.encode(record)
            if not decision.allow and not self.admit_deny(record, decision.code, len(data)):
                return
            self.write(record, data, cut)
        except AuditError as exc:
            log.error("audit: lost an mcp_call record of request %s: %s",
                      session.request_id, exc)
