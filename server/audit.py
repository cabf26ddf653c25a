"""The audit trail: a JSON line when a request is decided, another when it completes.

``--audit-log FILE`` gets one JSON object per line, appended. Every request
the VM makes produces, in this order:

1. a ``decision`` record, written and flushed to the OS *before* anything
   is sent upstream or executed (with ``--audit-fsync`` also fsynced first),
   so a crash of the server — or of the host, with ``--audit-fsync`` — never
   loses the record of something that ran;
2. for an allowed request, a ``completion`` record when it ends, however it
   ends (finished, failed upstream, timed out, cancelled by the VM, cut off by
   a revoked token or a shutdown).

(A deny past ``--audit-deny-limit`` is counted in a ``denials_suppressed``
record instead of getting its own: see "Floods of denials".)

Keys of every record: ``ts`` (ISO 8601 UTC, milliseconds, ``Z``), ``event``
(``decision`` | ``completion``), ``request_id``
(``AGENT-SESSION8-ID``: the agent's per-session request id made globally
unique by the agent name and the first 8 hex digits of the session id),
``agent``, ``tool``, ``kind`` (``http`` | ``cli``), ``decision`` (``allow`` |
``deny``), ``reason`` and ``rule`` (from the policy engine: what decided, by
which rule or missing rule).

Decision records add: ``code`` on a deny (``denied``, ``unknown_tool``,
``not_granted``, ``wrong_type``, ``bad_request``, ``rate_limited``; the VM is
told less, see :func:`carapace.server.policy.vm_denial`) and ``retry_after``
for ``rate_limited``; for HTTP ``method``, ``path`` (the request target
without its query string) and ``bytes_in`` (body length); for CLI
``argv`` (only with ``audit.log_argv``), ``cwd`` (the VM's), ``peer_uid``,
``peer_gid``, ``peer_pid`` (the shim's, from the agent's SO_PEERCRED) and, if
allowed, ``binary`` and ``run_cwd`` (the resolved host directory).

Completion records add ``duration_ms`` (from the decision), ``bytes_in``
and ``bytes_out`` (HTTP: request body and response body bytes; CLI: stdin
and stdout+stderr bytes; for an event stream, the bytes of the events'
data), and ``outcome``: ``completed`` (ran to its end: an HTTP answer
relayed, a process exited — whatever its status), ``failed`` (Carapace
answered with an error instead: upstream unreachable or timed out, binary
not startable), ``cancelled`` (cut off from the VM side: client gone, link
lost, token revoked, shutdown; ``cancelled`` then says why) or ``error``
(an internal error, see the server log). HTTP adds ``status`` (the
upstream's, or the one Carapace answered with: 502, 504), ``error`` (the
failure code) and ``events`` (SSE events relayed); CLI adds ``exit_code``
(as the shim exits: 128+N for signal N, 124 on timeout), ``signal``,
``timed_out``, ``host_pid`` and ``error`` when relevant.

What is kept out
================
- ``audit.enabled: false`` on a tool drops the records of its *allowed*
  requests. Denies are always recorded: they are what a reviewer looks for.
- Request content is recorded only when the tool asks: argv with
  ``log_argv`` (default true), the body and the query string with
  ``log_body`` (default false). ``path`` never includes the query string.
- ``redact_patterns`` are :func:`fnmatch.fnmatchcase` globs over *names*:
  in a JSON body, the value of every object key (at any depth) matching a
  pattern becomes ``"[REDACTED]"`` — whole, even an array, so
  ``recipient: ["+1…", "+44…"]`` leaves nothing behind; in a query string,
  the value of every parameter whose (decoded) name matches; in argv, the
  value of every flag the pattern names — ``--session TOKEN`` and
  ``--session=TOKEN`` both record as ``--session [REDACTED]`` /
  ``--session=[REDACTED]``. A pattern without a leading ``-`` also names
  the flag with dashes (``recipient`` covers ``--recipient X``). A body that
  is not JSON cannot be redacted by name, so with ``redact_patterns`` set it
  is not logged at all (``body_note`` says so); without, its text is logged.
- Every string in every record (keys too) is scrubbed of every injected
  secret the server has loaded (``env_inject`` secrets and
  ``headers_inject`` values, :meth:`Policy.secrets`) and every agent token,
  replaced by ``[REDACTED]``. Request headers and the environment are never
  recorded at all.
- VM-supplied strings are truncated (paths and single arguments to 2 KiB,
  argv to 256 arguments, logged bodies to 64 KiB) so one request cannot
  write megabytes; ``json`` escaping (ASCII only) keeps control characters
  and Unicode line separators from forging lines.

Why synchronous writes
======================
Each record is one ``os.write`` of a few hundred bytes on an ``O_APPEND``
descriptor, done on the trio thread: that is what makes "written before the
request runs" and the order of records trivially true, and a completion
record can still be written from a ``finally`` while its request is being
cancelled. Such a write costs microseconds (a page-cache copy; see
``tests/policy/test_audit.py``, which measures it), far below what would
delay another stream. The one slow operation, ``fsync`` (milliseconds on a
disk), runs only with ``--audit-fsync``, in a worker thread on a duplicate
of the descriptor, and the request waits for it; the loop does not.

Failure is closed: if the decision record cannot be written (disk full, file
removed, permissions), :class:`AuditError` is raised and the server refuses
the request (503 ``audit_unavailable``) instead of running it unrecorded.
A line left torn by a server killed mid-write is ended when the file is next
opened, so the next record starts a line of its own (readers such as
``carapace-debug audit`` then count the torn piece as one corrupt line)
instead of being glued to it.

Floods of denials
=================
A hostile VM can send denied requests as fast as the link carries them, and
with one record each it could push the evidence of what it did before out
through rotation within minutes. So an agent's deny records are limited
(``--audit-deny-limit``, default 100 per 10 s, a sliding window): past that,
its denials are still denied and counted in metrics, but not written one by
one; a ``denials_suppressed`` record says how many there were instead, once
per window while they go on, and when the server shuts down. Its keys:
``agent``, ``decision`` (``deny``, so that queries for denies find it),
``reason``, ``count``, ``first_ts`` / ``last_ts`` (of the suppressed denials),
``by`` (``[{tool, code, count}]``, the most frequent first, at most 20, the
rest in ``other``), ``limit``, and ``tool`` when they were all of one tool.
Allowed requests are never suppressed: every one that ran has its decision
record.

Rotation
========
Before a write that would take the file past ``max_bytes``, the file is
rotated: ``F.(n-1)`` → ``F.n`` … ``F.1`` → ``F.2``, ``F`` → ``F.1``, and a
new ``F`` is started (mode 0600), keeping ``backups`` old files (``0``: the
old file is deleted). ``max_bytes`` 0 turns rotation off (for an external
logrotate: SIGHUP reopens the file). A record is never split across files.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_plus

import trio

from carapace.protocol.messages import (
    CliRequest,
    Data,
    HttpHead,
    HttpRequest,
    HttpResponse,
    RequestFailed,
    SseEvent,
    SseEvents,
)

from .policy import AuditConfig, Decision, Policy
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from .exec import ExitInfo
    from .streams import ServerStream

log = logging.getLogger("carapace.server")

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_DENY_LIMIT",
    "DEFAULT_MAX_BYTES",
    "REDACTED",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditTrail",
    "DenyThrottle",
    "ResponseTap",
    "Scrubber",
    "redact_argv",
    "redact_json",
    "redact_query",
    "request_id",
    "utc_timestamp",
]

REDACTED: Final = "[REDACTED]"
DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024
DEFAULT_BACKUPS: Final = 5
DEFAULT_DENY_LIMIT: Final = (100, 10.0)
"""Deny records per agent in any window of so many seconds (see the module doc)."""
MAX_SUPPRESSED_KINDS: Final = 20
"""Distinct (tool, code) pairs one ``denials_suppressed`` record lists; the VM names tools."""
MAX_TEXT: Final = 2048
"""Longest VM-supplied string (a path, one argument, a cwd) kept in a record."""
MAX_ARGS: Final = 256
MAX_BODY: Final = 64 * 1024


class AuditError(Exception):
    """The audit trail cannot be written; the message says which file and why."""


def utc_timestamp(now: float | None = None) -> str:
    """``2025-01-31T12:34:56.789Z``: ISO 8601, UTC, milliseconds."""
    dt = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def request_id(agent: str, session_id: bytes, rid: int) -> str:
    """A request id unique across agents and sessions: ``AGENT-SESSION8-ID``."""
    return f"{agent}-{session_id.hex()[:8]}-{rid}"


def _truncate(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + "…[truncated]"


# ---------------------------------------------------------------------------
# Redaction by name (policy ``redact_patterns``)


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def redact_json(value: Any, patterns: Sequence[str]) -> Any:
    """``value`` with the value of every object key matching a pattern replaced, at any depth."""
    if not patterns:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if _name_matches(str(k), patterns) else redact_json(v, patterns)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_json(v, patterns) for v in value]
    return value


def _flag_matches(flag: str, patterns: Sequence[str]) -> bool:
    if not flag.startswith("-"):
        return False
    bare = flag.lstrip("-")
    for p in patterns:
        if fnmatch.fnmatchcase(flag, p):
            return True
        if not p.startswith("-") and bare and fnmatch.fnmatchcase(bare, p):
            return True
    return False


def redact_argv(args: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """argv with the value of every flag named by a pattern replaced.

    ``FLAG VALUE`` → ``FLAG [REDACTED]``; ``FLAG=VALUE`` → ``FLAG=[REDACTED]``.
    Scanning does not stop at ``--``: redacting too much is the safe error.
    """
    out = list(args)
    if not patterns:
        return out
    i = 0
    while i < len(out):
        arg = out[i]
        name, eq, _value = arg.partition("=")
        if eq and _flag_matches(name, patterns):
            out[i] = f"{name}={REDACTED}"
        elif _flag_matches(arg, patterns) and i + 1 < len(out):
            out[i + 1] = REDACTED
            i += 1
        i += 1
    return out


def redact_query(query: str, patterns: Sequence[str]) -> str:
    """A query string with the value of every parameter whose decoded name matches replaced."""
    if not patterns or not query:
        return query
    parts = []
    for item in query.split("&"):
        name = item.partition("=")[0]
        if _name_matches(unquote_plus(name), patterns):
            parts.append(f"{name}={REDACTED}")
        else:
            parts.append(item)
    return "&".join(parts)


# ---------------------------------------------------------------------------
# Secret scrubbing


class Scrubber:
    """Replaces every known secret in the strings of a record with ``[REDACTED]``.

    Secrets are only ever added (a secret removed from the policy by a reload
    is still a credential someone holds), longest first in one regex. A
    secret made of several words (``Bearer abc…``, ``Basic dXNl…``) also has
    each word of at least ``min_word`` characters scrubbed on its own, so the
    credential part is caught without its scheme.
    """

    min_word = 8

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._regex: re.Pattern[str] | None = None

    def add(self, values: Iterable[str | bytes]) -> None:
        new = set()
        for value in values:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            for part in (text, *(w for w in text.split() if len(w) >= self.min_word)):
                if part and part not in self._secrets:
                    new.add(part)
        if not new:
            return
        self._secrets |= new
        ordered = sorted(self._secrets, key=lambda s: (-len(s), s))
        self._regex = re.compile("|".join(re.escape(s) for s in ordered))

    def __len__(self) -> int:
        return len(self._secrets)

    def text(self, value: str) -> str:
        if self._regex is None:
            return value
        return self._regex.sub(REDACTED, value)

    def scrub(self, value: Any) -> Any:
        """A copy of ``value`` (JSON-like) with every string scrubbed, keys included."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value


# ---------------------------------------------------------------------------
# The file


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class AuditLog:
    """An append-only JSON-lines file with size-based rotation (see the module doc)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        fsync: bool = False,
    ) -> None:
        if max_bytes < 0:
            raise AuditError("--audit-max-bytes must be 0 (no rotation) or a positive size")
        if backups < 0:
            raise AuditError("--audit-backups must be 0 or more")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.records = 0
        self.rotations = 0
        self._fd: int | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise AuditError(
                f"cannot open the audit log {self.path}: {exc.strerror or exc}; check that "
                "its directory exists and is writable by the server"
            ) from None
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if self._size and not self._ends_a_line():
            log.warning("the audit log %s ends in a torn record (the server stopped while "
                        "writing it?); starting the next record on a new line", self.path)
            try:
                _write_all(fd, b"\n")
                self._size += 1
            except OSError:
                pass  # the next write says what is wrong

    def _ends_a_line(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._size - 1)
                return f.read(1) in (b"\n", b"")
        except OSError:
            return True  # unreadable to us: nothing to repair that we can see

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        self._close()

    def reopen(self) -> None:
        """Close and reopen the file by name (after an external rotation)."""
        self._close()
        self._open()

    def _rotate(self) -> None:
        self._close()
        try:
            if self.backups == 0:
                os.unlink(self.path)
            else:
                for n in range(self.backups - 1, 0, -1):
                    src = f"{self.path}.{n}"
                    if os.path.exists(src):
                        os.replace(src, f"{self.path}.{n + 1}")
                os.replace(self.path, f"{self.path}.1")
            self.rotations += 1
        except OSError as exc:
            # Keep auditing into the current file rather than stop.
            log.error("cannot rotate the audit log %s: %s; still appending to it", self.path,
                      exc.strerror or exc)
        self._open()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line, flushed to the OS. Raises AuditError."""
        # ASCII only: U+2028/U+2029/U+0085 would be line breaks to some readers.
        line = json.dumps(record, separators=(",", ":"), default=str)
        data = (line + "\n").encode("ascii")
        try:
            if self._fd is None:
                self._open()
            if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            assert self._fd is not None
            _write_all(self._fd, data)
        except OSError as exc:
            raise AuditError(
                f"cannot write the audit log {self.path}: {exc.strerror or exc}"
            ) from None
        self._size += len(data)
        self.records += 1

    async def sync(self) -> None:
        """With ``fsync``, wait (in a worker thread) until written records are on disk."""
        if not self.fsync or self._fd is None:
            return
        try:
            fd = os.dup(self._fd)  # a rotation may close the original meanwhile
        except OSError as exc:
            raise AuditError(f"cannot sync the audit log {self.path}: {exc.strerror}") from None
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        except OSError as exc:
            raise AuditError(
                f"cannot sync the audit log {self.path}: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# What the server calls


def _text_bytes(text: str | None) -> int:
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ResponseTap:
    """Watches what one HTTP request sends to the VM, for its completion record.

    It wraps the stream's ``send_control`` (heads and failures), ``send``
    (body chunks) and ``send_batch`` (the events of one upstream read, or a
    head with the body that came with it), so the HTTP relay needs no audit
    hooks of its own.
    ``bytes_out`` counts response body bytes; for an event stream, the bytes
    of the events' data fields.
    """

    def __init__(self, stream: ServerStream) -> None:
        self.status: int | None = None
        self.failed: str | None = None
        self.bytes_out = 0
        self.events = 0
        """SSE events sent so far: right also when the reader leaves mid-stream."""
        inner_control = stream.send_control
        inner_send = stream.send
        inner_batch = stream.send_batch

        def send_control(msg: Any) -> None:
            if isinstance(msg, HttpHead):
                self.status = msg.status
            elif isinstance(msg, RequestFailed):
                self.status = msg.status
                self.failed = msg.code
            inner_control(msg)

        async def send(msg: Any) -> None:
            self._count_events((msg,))
            await inner_send(msg)

        async def send_batch(msgs: Sequence[Any]) -> None:
            self._count_events(msgs)
            await inner_batch(msgs)

        stream.send_control = send_control  # type: ignore[method-assign]
        stream.send = send  # type: ignore[method-assign]
        stream.send_batch = send_batch  # type: ignore[method-assign]

    def _count_events(self, msgs: Sequence[Any]) -> None:
        size = events = 0
        for msg in msgs:
            kind = type(msg)
            if kind is SseEvent:
                events += 1
                size += _text_bytes(msg.data)
            elif kind is SseEvents:
                events += len(msg.events)
                size += sum(_text_bytes(data) for _, data, _, _ in msg.events)
            elif kind is Data:
                size += len(msg.data)
            elif kind is HttpHead:
                self.status = msg.status
            elif kind is HttpResponse:
                self.status = msg.status
                size += len(msg.body)
        self.bytes_out += size
        self.events += events


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

    @property
    def request_id(self) -> str:
        return str(self.base["request_id"])

    async def decided(self) -> None:
        """Write (and flush, and with --audit-fsync sync) the decision record.

        Raises :class:`AuditError` if it cannot be written: then the request
        must not run.
        """
        if not self.write or self.trail.log is None:
            return
        if self.base["decision"] != "allow" and not self.trail.admit_deny(
                self.base, str(self.decision_fields.get("code"))):
            return  # counted for a denials_suppressed record: a deny runs nothing
        self.trail.emit({"ts": utc_timestamp(), "event": "decision", **self.base,
                         **self.decision_fields})
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

    def completed_http(self, tap: ResponseTap, bytes_in: int, events: int,
                       aborted: str | None = None, cancel_reason: str | None = None) -> None:
        """``aborted``: None if the relay ran to its end, ``cancelled`` or ``error`` if not."""
        if aborted is not None:
            outcome = aborted
        else:
            outcome = "failed" if tap.failed else "completed"
        self.completed(outcome=outcome, status=tap.status, error=tap.failed,
                       cancelled=cancel_reason if aborted == "cancelled" else None,
                       bytes_in=bytes_in, bytes_out=tap.bytes_out, events=events)

    def completed_cli(self, info: ExitInfo) -> None:
        if info.cancelled is not None:
            outcome = "cancelled"
        elif info.error is not None or info.code is None:
            outcome = "failed"
        else:
            outcome = "completed"
        self.completed(outcome=outcome, exit_code=info.code, signal=info.signal,
                       timed_out=info.timed_out or None, cancelled=info.cancelled,
                       error=info.error, host_pid=info.pid, bytes_in=info.bytes_in,
                       bytes_out=info.bytes_out)


@dataclass
class _Suppressed:
    since: float
    first_ts: str
    last_ts: str
    by: dict[tuple[str, str], int] = field(default_factory=dict)
    other: int = 0


class DenyThrottle:
    """At most ``max_records`` deny records per agent in any ``window_secs``; the rest
    are counted, and :meth:`due` turns the count into a summary record.

    Pure, like :mod:`.ratelimit` (whose limiter it uses): the caller passes the time.
    ``max_records`` 0 turns the throttle off.
    """

    def __init__(self, max_records: int, window_secs: float) -> None:
        if max_records < 0 or window_secs <= 0:
            raise ValueError("a deny limit is N records per S seconds, N >= 0 and S > 0")
        self.max_records = max_records
        self.window_secs = window_secs
        self.suppressed_total = 0
        self._limiter = RateLimiter()
        self._pending: dict[str, _Suppressed] = {}

    @property
    def limit(self) -> str:
        return f"{self.max_records} per {self.window_secs:g} s"

    def admit(self, agent: str, tool: str, code: str, now: float, ts: str) -> bool:
        """Whether this deny gets a record of its own; if not, it is counted.

        ``tool`` as its record names it: already cut to 256 characters."""
        if not self.max_records or self._limiter.check(
                agent, self.max_records, self.window_secs, now) is None:
            return True
        pending = self._pending.get(agent)
        if pending is None:
            pending = self._pending[agent] = _Suppressed(since=now, first_ts=ts, last_ts=ts)
        pending.last_ts = ts
        key = (tool, code)
        if key in pending.by or len(pending.by) < MAX_SUPPRESSED_KINDS:
            pending.by[key] = pending.by.get(key, 0) + 1
        else:
            pending.other += 1
        self.suppressed_total += 1
        return False

    def due(self, now: float, agent: str | None = None,
            everything: bool = False) -> list[dict[str, Any]]:
        """Summary records owed: of agents suppressed for a whole window (or of
        ``agent``, or ``everything``), each taken once."""
        out = []
        for name, pending in list(self._pending.items()):
            if everything or name == agent or now - pending.since >= self.window_secs:
                del self._pending[name]
                out.append(self._summary(name, pending))
        return out

    def _summary(self, agent: str, pending: _Suppressed) -> dict[str, Any]:
        by = sorted(pending.by.items(), key=lambda item: -item[1])
        count = sum(pending.by.values()) + pending.other
        record: dict[str, Any] = {
            "event": "denials_suppressed", "agent": agent, "decision": "deny",
            "reason": f"{count} denial(s) not recorded one by one: over the limit "
                      f"of {self.limit} (--audit-deny-limit)",
            "count": count, "first_ts": pending.first_ts, "last_ts": pending.last_ts,
            "by": [{"tool": tool, "code": code, "count": n} for (tool, code), n in by],
            "limit": self.limit,
        }
        if pending.other:
            record["other"] = pending.other
        elif len(by) == 1:
            record["tool"] = record["by"][0]["tool"]  # so that audit --tool finds it
        return record


class AuditTrail:
    """The server's audit trail: builds records under the policy, scrubs and writes them.

    ``log`` None (no ``--audit-log``) makes every call a no-op.
    """

    def __init__(self, log: AuditLog | None,
                 deny_limit: tuple[int, float] = DEFAULT_DENY_LIMIT) -> None:
        self.log = log
        self.scrubber = Scrubber()
        self.deny_throttle = DenyThrottle(*deny_limit)

    def admit_deny(self, base: Mapping[str, Any], code: str) -> bool:
        """Whether a deny gets its own record (see "Floods of denials"); a summary of
        the agent's earlier suppressed denials is written first, to keep the order."""
        agent = str(base["agent"])
        now, ts = time.monotonic(), utc_timestamp()
        if not self.deny_throttle.admit(agent, str(base["tool"]), code, now, ts):
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
        for record in records:
            self.emit({"ts": utc_timestamp(), **record})

    def add_secrets(self, values: Iterable[str | bytes]) -> None:
        self.scrubber.add(values)

    def emit(self, record: dict[str, Any]) -> None:
        if self.log is None:
            return
        self.log.write(self.scrubber.scrub(record))

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

    @staticmethod
    def _base(agent: str, session_id: bytes, rid: int, tool: str, kind: str,
              decision: Decision) -> dict[str, Any]:
        return {
            "request_id": request_id(agent, session_id, rid),
            "agent": agent,
            "tool": _truncate(tool, 256),
            "kind": kind,
            "decision": decision.decision,
        }

    @staticmethod
    def _verdict(decision: Decision) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": decision.reason, "rule": decision.rule}
        if not decision.allow:
            out["code"] = decision.code or "denied"
        if decision.retry_after is not None:
            out["retry_after"] = decision.retry_after
        return out

    def http(self, agent: str, session_id: bytes, req: HttpRequest, policy: Policy,
             decision: Decision) -> AuditEntry:
        cfg = self._config(policy, req.tool)
        target = req.target if isinstance(req.target, str) else repr(req.target)
        path, has_query, query = target.partition("?")
        fields = {
            **self._verdict(decision),
            "method": _truncate(str(req.method), 64),
            "path": _truncate(path),
            "bytes_in": len(req.body),
        }
        if cfg.log_body:
            if has_query:
                fields["query"] = _truncate(redact_query(query, cfg.redact_patterns))
            fields.update(_body_fields(req.body, cfg.redact_patterns))
        base = self._base(agent, session_id, req.id, req.tool, "http", decision)
        return AuditEntry(self, base, fields, write=cfg.enabled or not decision.allow)

    def cli(self, agent: str, session_id: bytes, req: CliRequest, policy: Policy,
            decision: Decision) -> AuditEntry:
        cfg = self._config(policy, req.tool)
        fields: dict[str, Any] = self._verdict(decision)
        if cfg.log_argv:
            args = [_truncate(a.decode("utf-8", "backslashreplace")) for a in req.argv[:MAX_ARGS]]
            fields["argv"] = redact_argv(args, cfg.redact_patterns)
            if len(req.argv) > MAX_ARGS:
                fields["argv_truncated"] = len(req.argv)
        fields["cwd"] = _truncate(req.cwd.decode("utf-8", "backslashreplace"))
        fields["peer_uid"] = req.peer_uid
        fields["peer_gid"] = req.peer_gid
        fields["peer_pid"] = req.peer_pid
        binary = getattr(decision, "binary", "")
        if decision.allow and binary:
            fields["binary"] = binary
            fields["run_cwd"] = os.fsdecode(getattr(decision, "cwd", b"/"))
        base = self._base(agent, session_id, req.id, req.tool, "cli", decision)
        return AuditEntry(self, base, fields, write=cfg.enabled or not decision.allow)


def _body_fields(body: bytes, patterns: Sequence[str]) -> dict[str, Any]:
    if not body:
        return {}
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        if patterns:
            return {"body_note": "not JSON: not logged, redact_patterns cannot be applied"}
        return {"body_text": _truncate(body[:MAX_BODY].decode("utf-8", "replace"), MAX_BODY)}
    if len(body) > MAX_BODY:
        return {"body_note": f"JSON body of {len(body)} bytes: over {MAX_BODY}, not logged"}
    return {"body": redact_json(doc, patterns)}

