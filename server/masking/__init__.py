"""Secret masking: injected secrets never reach the VM, not even encoded.

Sans-IO, like ``protocol/``: bytes (or text) in, scrubbed bytes out; no trio,
no sockets, no clocks. The server builds one :class:`Scrubber` per policy
(:func:`policy_scrubber`) and runs every byte it sends to the agent through
it: CLI stdout and stderr (:meth:`Scrubber.output_filters`, the hook of
``server/cli_runner.py``), HTTP response header values and bodies, SSE streams,
error texts.

What is masked
==============
Every secret the policy injects (:meth:`Policy.secrets`: ``headers_inject``
values and secret-named ``env_inject`` values) and every secret of the server
itself (:func:`server_scrubber`: every agent's token, the debug listener's
token, the body of each TLS private key block) — and every tool's output is
scrubbed of every secret, so a tool cannot show another tool's credential,
nor any agent's token, either (HTTP answers get the server's own secrets in
their scrubber when the policy injects any: an upstream is never sent them).
From each secret the scrubber also derives the credential part of an HTTP
authorization value (``Bearer TOKEN`` → ``TOKEN``; for ``Basic`` also
the decoded ``user:password`` and the password), and a secret that spans
several lines (a PEM key) is masked line by line. Derived parts shorter than
the policy's ``min_secret_length`` are not masked on their own.

Each secret is masked as it is and in these encodings, each replaced by
``[REDACTED]``:

- JSON string escaping: ``json.dumps`` with and without ``ensure_ascii``,
  ``\\uXXXX`` in lower and upper case hex, and with ``/`` written ``\\/``;
- URL encoding: ``quote`` (with and without ``/`` safe), ``quote_plus`` and
  JavaScript's ``encodeURIComponent``, with upper and lower case hex;
- base64, standard and URL-safe alphabets, with and without padding, and as
  the secret appears *inside* a larger base64 stream (``env | base64``) at
  each of the three byte alignments: there only the characters that depend on
  the secret alone are matched, so at most the first and last character of
  its span (a few bits of its first and last byte, mixed with its
  neighbours) stay visible;
- base64 wrapped into lines (``base64`` wraps at 76 columns, PEM and
  ``openssl`` at 64): a line break (LF or CRLF) may fall anywhere inside a
  base64 form, provided the 60 bytes before it are base64 characters — that
  is, it ends a base64 line at least 60 columns long.

Anything else is not masked (hex, gzip, other escapings): a tool that is
allowed to run arbitrary commands with a secret in its environment can
always transform it (``rev``, ``xxd``, ``gzip``); masking stops accidents —
``env``, a ``--debug`` flag, an upstream that echoes ``Authorization`` — not
a tool built to leak. Values a
tool is *meant* to return (a password from ``op item get``) are not injected
secrets and pass untouched.

Matching is one compiled regex alternation of every form (longest first),
scanned left to right; matches never overlap and each becomes
``[REDACTED]``. So that clean output costs little, the regex (compiled on
first use) runs only on a chunk that may hold a match, which C-level
searches decide without a Python loop over the bytes: first a ``memchr`` for
a few *anchor* bytes, rare in ordinary output, one of which every form
contains (ordinary text has none and is done); then, line breaks removed,
for *needles* (substrings that every form contains) — by sampling 4-byte
windows at a stride shorter than any needle against the set of the needles'
4-grams, and by ``bytes.find`` when a sample hits or when one find per
needle is cheaper. ``benchmarks/masking.py`` measures what that costs.

Streams
=======
:class:`StreamScrubber` scrubs a byte stream cut into arbitrary chunks and
gives exactly what scrubbing the whole stream at once would give. It holds
back only the longest tail of what it has seen that could still become a
match — a proper prefix of some form (with any line breaks the wrap rule
allows) — so never more than :attr:`Scrubber.max_hold` bytes (the longest
form, less one), and it releases those bytes as soon as the next bytes
disprove the match, or at the end of the stream. There are no timers: a
tool that prints half a secret and then waits shows the half later, with
the rest, as ``[REDACTED]``. A match that is complete is replaced at once
unless a longer form could still follow.

SSE: a secret split across two events
=====================================
An event stream is scrubbed twice. Its bytes, as they come from the
upstream, go through a :class:`StreamScrubber` (that covers every field,
comments included, and secrets split across reads), and the parsed events
go through :class:`EventScrubber`, for a secret that the upstream split
across the ``data`` of two consecutive events. Its rule, which never holds
more than one event:

- an event whose ``data`` ends with a proper prefix of a form at least
  :data:`SSE_SPLIT_MIN` (4) characters long is held back until the next
  event (or the end of the stream); if the next event's ``data`` begins with
  the rest of that form, the prefix in the first event and the rest in the
  second are each replaced by ``[REDACTED]``; then both go;
- an event whose ``data`` ends with a shorter prefix (1 to 3 characters) is
  not held — that would delay any event that happens to end in a character a
  form starts with — but if the next event's ``data`` begins with the rest
  of the form, that rest is replaced by ``[REDACTED]``: at most the first
  three characters of an encoding reach the VM.

Holding costs latency only when an event really ends with four characters
that begin an encoded secret, which ordinary events (JSON ending in ``}``,
text) practically never do. A secret cut across more than two events, or
across multi-line ``data`` as wrapped base64, is not masked.
"""

from __future__ import annotations

from .forms import (
    MIN_FORM_LENGTH,
    REDACTED,
    REDACTED_TEXT,
    SSE_SPLIT_MIN,
    WRAP_MIN_LINE,
    encoded_forms,
    expand_secrets,
)
from .scrubber import (
    EventScrubber,
    Scrubber,
    StreamScrubber,
    policy_scrubber,
    private_key_blocks,
    server_scrubber,
)

__all__ = [
    "MIN_FORM_LENGTH",
    "REDACTED",
    "REDACTED_TEXT",
    "SSE_SPLIT_MIN",
    "WRAP_MIN_LINE",
    "EventScrubber",
    "Scrubber",
    "StreamScrubber",
    "encoded_forms",
    "expand_secrets",
    "policy_scrubber",
    "private_key_blocks",
    "server_scrubber",
]
