"""The audit trail: a JSON line when a request is decided, another when it completes.

``--audit-log FILE`` gets one JSON object per line, appended. Every request
the VM makes produces, in this order:

1. a ``decision`` record, written and flushed to the OS *before* anything
   is sent upstream or executed (with ``--audit-fsync`` also fsynced first),
   so a crash of the server — or of the host, with ``--audit-fsync`` — never
   loses the record of something that ran;
2. if a reload's policy denies the request while it is open, a ``revoked``
   record when it is ended for that (see below);
3. for an allowed request, a ``completion`` record when it ends, however it
   ends (finished, failed upstream, timed out, cancelled by the VM, cut off by
   a revoked token, a reload's policy or a shutdown).

(A deny past ``--audit-deny-limit`` is counted in a ``denials_suppressed``
record instead of getting its own: see "Floods of denials".)

Keys of every record: ``ts`` (ISO 8601 UTC, milliseconds, ``Z``), ``event``
(``decision`` | ``revoked`` | ``completion``), ``request_id``
(``AGENT-SESSION8-ID``: the agent's per-session request id made globally
unique by the agent name and the first 8 hex digits of the session id),
``agent``, ``tool``, ``kind`` (``http`` | ``cli``), ``decision`` (``allow`` |
``deny``), ``reason`` and ``rule`` (from the policy engine: what decided, by
which rule or missing rule).

Decision records add: ``code`` on a deny (``denied``, ``unknown_tool``,
``not_granted``, ``wrong_type``, ``bad_request``, ``rate_limited``, and the
fair shares' ``too_many_requests`` and ``server_busy``, whose ``rule`` is the
server flag; the VM is told less, see :func:`carapace.server.policy.vm_denial`)
and ``retry_after`` for those last three; for HTTP ``method``, ``path`` (the request target
without its query string) and ``bytes_in`` (body length); for CLI
``argv`` (only with ``audit.log_argv``), ``cwd`` (the VM's),
``vm_claimed_peer_uid``, ``vm_claimed_peer_gid``, ``vm_claimed_peer_pid`` (the
shim's credentials as the VM's agent says it read them with SO_PEERCRED: the
host cannot verify them, a hostile VM sends what it likes) and, if allowed,
``binary`` and ``run_cwd`` (the resolved host directory).

A ``revoked`` record (``server/revocation.py``) has the request's common keys
with ``decision`` ``deny`` and the new policy's ``reason``, ``rule`` and
``code``: the rule that now denies it. It is written whatever the tool's
``audit.enabled`` says, as every deny is, and never throttled (there is at
most one per open request and reload). The ``completion`` record that follows
says ``outcome`` ``cancelled``, with ``cancelled`` beginning "the host's
policy changed:".

A decision record of an allowed call that must wait for a person adds
``approval_required: true`` and ``approval_rule``; an ``approval`` record
follows it (``server/approval_gate.py``) with ``approval_id``, ``outcome``
(``approved``, ``denied``, ``timeout``, ``withdrawn``, ``remembered``,
``shutdown``), ``by`` (the operator's own word for who they are:
``by_source`` is ``operator-asserted``), ``reason``, ``waited_ms`` and
``rule``; a call that then does not run has a completion record with
``outcome: failed`` and ``error: not_approved`` (``cancelled`` if its client
went away). A refused one (``--max-pending-approvals``) gets a ``limit``
record.

An MCP session (``kind`` ``mcp``) has a decision and a completion record as a
CLI request does (an HTTP request to an MCP server's ``url``: as an HTTP
request does) (the completion adds ``mcp_refused``, why Carapace ended the
session, when it did) and between them one ``mcp_call`` record per MCP call
it judged: ``tools/call``, ``resources/read``, ``prompts/get`` and the like,
and every request it denied. Such a record has the session's ``request_id``,
``agent``, ``tool`` and ``kind``, the call's own ``decision``, ``reason``,
``rule`` (and ``code`` if denied), ``mcp_method``, ``mcp_tool`` (the MCP tool
name, resource URI or prompt name), ``outcome`` (``answered``, ``error``,
``denied``, ``timed_out``, ``cancelled``, ``unanswered``), ``duration_ms``
and ``result_bytes`` (the size of the host server's answer). Denied calls go
through the deny throttle; allowed ones are left out with ``audit.enabled:
false``.

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
  A JSON body nested deeper than 64 levels is not logged either (``body_note``):
  redacting and writing it would recurse past Python's limit.
- Every string in every record (keys too) is scrubbed of every injected
  secret the server has loaded (``env_inject`` secrets and
  ``headers_inject`` values, :meth:`Policy.secrets`) and every agent token,
  replaced by ``[REDACTED]``. Request headers and the environment are never
  recorded at all.
- Every record is held to size caps (see "Size caps"), argv to 256
  arguments, a logged body to its first 64 KiB; ``json`` escaping (ASCII
  only) keeps control characters and Unicode line separators from forging
  lines.

Size caps
=========
Sizes are bytes as written (JSON, ASCII only: an emoji takes 12). Every
string in a record (object keys too) longer than 2 KiB is cut (``tool``
at 256 bytes, ``method`` at 64), except in ``body`` and ``body_text``, which
the operator asked for; then, if the record
is still over ``--audit-max-record-bytes`` (default 16 KiB), its largest
fields are cut as a whole, largest first, each just enough, until it fits.
A cut value becomes the string ``HEAD…[truncated: N bytes, sha256 HEX]``:
its start, then the size and SHA-256 of the whole value — of a string's
UTF-8, or of a list's or object's compact JSON in UTF-8
(``json.dumps(v, ensure_ascii=False, separators=(",", ":"))``), whose start
HEAD then is. So ``argv`` cut as a whole is a string beginning ``["``.
Secrets are redacted before anything is cut. A record with anything cut has
``truncated``: the sorted top-level keys that were. The
``carapace_audit_records_truncated_total`` metric counts such records, and
the server logs it (at most once a minute, with the count since).
See :mod:`.caps`.

Why synchronous writes
======================
Each record is one ``os.write`` of a few hundred bytes on an ``O_APPEND``
descriptor, done on the trio thread: that is what makes "written before the
request runs" and the order of records trivially true, and a completion
record can still be written from a ``finally`` while its request is being
cancelled. Such a write costs microseconds (a page-cache copy; see
``tests/server/audit/test_audit.py``, which measures it), far below what would
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
(``--audit-deny-limit``, default 100 per 10 s, a sliding window), and so are
their bytes as written (``--audit-deny-bytes``, default 64 KiB in the same
window: 100 ordinary records fit, 4 made as large as the cap allows): past either,
its denials are still denied and counted in metrics, but not written one by
one; a ``denials_suppressed`` record says how many there were instead, once
per window while they go on, and when the server shuts down. Its keys:
``agent``, ``decision`` (``deny``, so that queries for denies find it),
``reason``, ``count``, ``first_ts`` / ``last_ts`` (of the suppressed denials),
``by`` (``[{tool, code, count}]``, the most frequent first, at most 20, the
rest in ``other``), ``limit``, and ``tool`` when they were all of one tool;
when the byte budget was what they exceeded, also ``bytes_limit`` and
``suppressed_bytes`` (what their records would have taken). The summaries
themselves use up the agent's byte budget (they are written whatever it is
left), so those of a long flood cannot become a flood of their own. A
suppressed deny is logged at debug level only. The server logs a
line when an agent starts being counted; the metrics
``carapace_audit_denials_suppressed_total`` and
``carapace_audit_denied_bytes_suppressed_total`` count them. DEPLOYMENT.md
("Audit retention under a flood") works out how long the defaults keep the
trail.
Allowed requests are never suppressed: every one that ran has its decision
record.

Rotation
========
Before a write that would take the file past ``max_bytes``, the file is
rotated: ``F.(n-1)`` → ``F.n`` … ``F.1`` → ``F.2``, ``F`` → ``F.1``, and a
new ``F`` is started (mode 0600), keeping ``backups`` old files (``0``: the
old file is deleted). ``max_bytes`` 0 turns rotation off (for an external
logrotate: SIGHUP reopens the file). A record is never split across files.

Where each part lives: :mod:`.records` (the keys and fields of each record),
:mod:`.redaction` (what is kept out), :mod:`.caps` (size caps), :mod:`.rotating_log` (the file, its
writes and rotation), :mod:`.throttle` (floods of denials) and :mod:`.trail`
(what the server calls: one :class:`AuditEntry` per request).
"""

from __future__ import annotations

from .caps import DEFAULT_MAX_RECORD_BYTES, MAX_FIELD_BYTES, RecordCap
from .records import MAX_ARGS, MAX_BODY, MAX_TEXT, request_id, utc_timestamp
from .redaction import REDACTED, AuditRedactor, redact_argv, redact_json, redact_query
from .rotating_log import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, AuditError, AuditLog
from .throttle import DEFAULT_DENY_BYTES, DEFAULT_DENY_LIMIT, MAX_SUPPRESSED_KINDS, DenyThrottle
from .trail import AuditEntry, AuditTrail

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_DENY_BYTES",
    "DEFAULT_DENY_LIMIT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "MAX_ARGS",
    "MAX_BODY",
    "MAX_FIELD_BYTES",
    "MAX_SUPPRESSED_KINDS",
    "MAX_TEXT",
    "REDACTED",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditRedactor",
    "AuditTrail",
    "DenyThrottle",
    "RecordCap",
    "redact_argv",
    "redact_json",
    "redact_query",
    "request_id",
    "utc_timestamp",
]
