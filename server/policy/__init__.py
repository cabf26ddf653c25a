"""The host-side policy: load the YAML file, decide every request.

The VM is assumed hostile, so everything here denies by default and treats
every byte the VM sends as an attack. The package is pure: no trio, no clock
(the rate limiter is given the time), no environment variables. Its only I/O
is reading the policy file in :func:`load_policy_file`, resolving a
requested working directory in :func:`decide_cli` (through an injectable
``realpath``) and resolving secret references in :func:`resolve_policy`
(through the :class:`SecretResolver` it is given), so the server, the
``carapace-debug policy`` commands and the tests all run the same engine.

``model`` holds the typed policy, ``secrets`` which names hold secrets,
``load`` the YAML loader, ``secret_refs`` the resolver of secret references,
``http`` and ``cli`` the two kinds of decision (``decision`` their common
verdict), ``ratelimit`` the limits applied to an allowed decision and ``lint``
the warnings of ``carapace-debug policy lint``.
Import from the package: the names below are its API.

File format
===========
The YAML format Carapace policy files are written in (``tools: NAME:
{type: cli|http, ...}``), plus a few keys of Carapace's own (marked *added*
below). It is read with PyYAML's safe loader and a check that refuses
duplicate mapping keys, which YAML would otherwise silently collapse to the
last one::

    settings:                       # optional, added
      min_secret_length: 8          # secrets shorter than this are refused
      sandbox: auto                 # auto | bwrap | none: how CLI tools are confined
    agents:                         # optional, added; absent = every agent, every tool
      NAME: {tools: [TOOL, ...], rate_limit: {max_requests: N, window_secs: S}}
    tools:
      NAME:                         # [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 long
        type: cli | http | mcp
        ...

CLI tool keys: ``binary`` (absolute path, required), ``argv_allow_patterns``,
``argv_deny_patterns``, ``argv_deny_flags`` and ``argv_allow_flags`` (added:
flags in every spelling, below), ``env_inject`` (name -> value),
``env_passthrough`` (added: names the VM may pass through), ``cwd_allowed``
(absolute dirs), ``timeout_secs``, ``audit``, ``rate_limit``, ``global_rate_limit`` (added),
``agents``,
``limits`` (added: ``{max_argv, max_argv_bytes, max_env}``), ``sandbox`` (added:
``{writable_paths, hide_paths, network: host|none, rlimits: {cpu_secs,
memory_mb, nproc, fsize_mb}}``; with ``settings.sandbox: auto|bwrap|none``,
see :mod:`.sandbox`).

HTTP tool keys: ``upstream`` (``http(s)://host[:port][/base]``, required),
``allow_paths`` (added), ``jsonrpc_allow_methods``, ``jsonrpc_deny_methods``,
``jsonrpc_param_filters`` (``METHOD: {field, allow_patterns,
deny_patterns}``; added: ``fields``, ``deny_fields``, ``allow_fields``,
``field_patterns``, ``normalize``, below), ``headers_inject`` (added: header ->
value), ``rate_limit``, ``global_rate_limit`` (added), ``timeout_secs``,
``audit``, ``agents``, ``limits`` (added: ``{max_jsonrpc_body_bytes,
max_jsonrpc_batch, max_headers, max_header_bytes}``).

MCP tool keys (``type: mcp``, added): ``command`` (a stdio MCP server's argv,
``command[0]`` an absolute path) with ``env_inject``, or ``url`` (a Streamable
HTTP MCP server's endpoint, ``http(s)://host[:port]/path``) with
``headers_inject`` — one of the two is required; ``tools_allow``,
``tools_deny``, ``tool_param_filters``, ``resources_allow``,
``prompts_allow``, ``timeout_secs``, ``rate_limit``, ``audit``, ``agents``
(meaning under "MCP tools" below).

``limits`` overrides, for one tool, the server-wide parse limits (positive
whole numbers; see :mod:`.limits` and DEPLOYMENT.md, "Parse limits"): a
request over one is refused with code ``bad_request`` before it is parsed.

``audit`` is ``{enabled, log_argv, log_body, redact_patterns}``;
``rate_limit`` and ``global_rate_limit`` are ``{max_requests, window_secs}``.
Any other key anywhere is an error naming the key and its path
(``tools.op.argv_allow``), and so is a wrong type
(``tools.signal-cli.rate_limit.window_secs must be a positive number``).

Grants
======
If the top-level ``agents`` section exists, an agent may use a tool only if
the agent is listed and the tool is in its ``tools`` list. A tool may also
carry its own ``agents: [NAME, ...]`` list; when both forms are present an
agent needs both. Without either, every agent may use every tool.

Rate limits
===========
A tool's ``rate_limit`` is kept per agent: each agent gets its own budget of
``max_requests`` per ``window_secs`` (the format's meaning, extended to many
agents: with one agent nothing changes; with several, one VM spending its
budget cannot lock the others out). The tool's ``global_rate_limit``
(added, the same ``{max_requests, window_secs}``) is one budget shared by
every agent together, a host-wide cap that protects the service and the
account behind the tool. An agent's ``agents.NAME.rate_limit`` counts its
requests to all tools. A request counts against all that apply or none, and
only allowed requests count (:func:`apply_rate_limits`, :mod:`.ratelimit`).

Secrets
=======
``headers_inject`` values are always secrets. An ``env_inject`` value is a
secret when its variable NAME looks secret-bearing: the name is split into
words at ``_``, ``-``, ``.`` and lower-to-upper camelCase boundaries, and it is
a secret if any word contains TOKEN, SECRET, PASSWORD, PASSWD, PASSPHRASE,
CREDENTIAL, SESSION, COOKIE or AUTHORIZATION, starts with AUTH (but not
AUTHOR) or ends with AUTH, ends with KEY or KEYS, or is PASS. Whole words, not
substrings, so ``GOG_KEYRING_BACKEND`` (a backend name such as ``file``) is
not a secret while ``GOG_KEYRING_PASSWORD`` and ``API_KEY`` are. A secret
shorter than ``settings.min_secret_length`` (default 8) is refused at load,
because a short value cannot be masked in output without mangling ordinary
text.
:meth:`Policy.secrets` lists every secret for the output scrubber. No error
message and no ``repr`` ever contains an injected value.

Secret references (added)
=========================
An ``env_inject`` or ``headers_inject`` value may be a reference instead of
the value: ``{file: /abs/path}`` (the content, one trailing newline dropped;
refused if the file is readable by others), ``{credential: NAME}``
(``$CREDENTIALS_DIRECTORY/NAME`` from systemd's ``LoadCredential=`` or
``LoadCredentialEncrypted=``, read the same way), ``{env: NAME}`` (the
server's own environment) or ``{command: [PROGRAM, ARG, ...], timeout_secs:
S}`` (run without a shell, stdin closed, in its own process group, killed
after the timeout; stdout stripped). The loader only parses them
(:class:`SecretRef`, :meth:`Policy.unresolved_refs`); :func:`resolve_policy`
reads and runs them through a :class:`SecretResolver` it is given, checks each
value as if it were written in the file, and returns the policy to serve.
A value given by reference is always a secret, whatever its name. A failure
is an :class:`UnresolvedSecret` naming the key path and the reference (a
command by ``argv[0]`` only), never a value.

argv semantics (CLI tools)
==========================
Each argument must be valid UTF-8 without control characters (Unicode
category Cc, TAB excepted). The arguments are joined with
:func:`shlex.join` (POSIX shell quoting: an argument made only of
``[A-Za-z0-9_@%+=:,./-]`` stays bare, anything else is single-quoted), and a
pattern is an :func:`fnmatch.fnmatchcase` glob over that one line. So a
pattern reads like the command typed in a shell: ``"item get *"`` allows
``item get foo --vault Private`` (``*`` may span several arguments), while a
single argument ``"item get x"`` is rendered ``'item get x'`` and cannot pose
as three words; a quote inside an argument is escaped, so it cannot forge
word boundaries either. A pattern ending in ``" *"`` also matches with
nothing after it (``"item delete *"`` denies a bare ``item delete``). A
pattern like ``"item list*"`` is a prefix match: it allows ``item list``,
``item list --vault x`` and also ``item listx`` (on purpose: the tool itself
rejects unknown subcommands). An empty argv is the empty line, so ``"*"``
matches a bare command (``cat`` alone) as well as every other, and so does
``""``; ``"item *"`` does not. Deny patterns are checked first and win; then
the flags (below); if no allow pattern matches, the request is denied. To
allow an argument with spaces, quote it the way ``shlex.join`` does:
``"item get 'My Login'"``.

A deny pattern sees one spelling of a flag: ``"* --reveal *"`` misses
``--reveal=true`` and ``"* --web*"`` misses ``-w``. ``argv_deny_flags:
[--reveal, -w, --web]`` denies a flag in every spelling the tools' parsers
(getopt_long, Go's pflag, kong, argparse) accept: ``--web``, ``--web=VALUE``,
``-web`` (Go's flag package); a short flag ``-w`` alone, in a cluster (``-cw``,
``-wc``) or with a value attached (``-wVALUE``, ``-oFILE``). ``--`` ends the
flags as getopt has it: after it ``--web`` is an operand. Where parsers
disagree the reading that finds a flag wins, so an argument that only looks
like one is denied too (``--title -w``: write ``--title=-w``). Abbreviations
(``--rev`` for ``--reveal``, which getopt_long and argparse accept but pflag
and kong, the parsers of gh, op and gog, refuse) are not expanded.
``argv_allow_flags: [--repo, -R, --json]`` is the closed form: every flag
before ``--`` must be listed (long flags exactly, so no abbreviation passes;
in a short cluster every character), so a flag a later version of the tool
adds is denied until it is listed. A flag in a policy is written ``-x`` or
``--name``, without a value. Examples: gh ``--jq``/``-q`` (a jq filter reads
the host environment, ``$ENV.GH_TOKEN``), ``--body-file``/``-F`` (posts a host
file), ``--web``/``-w`` (a browser on the host); op ``--out-file``/``-o``
(writes a host file); ``carapace-debug policy lint`` warns when a policy lets
these through (:data:`RISKY_ARGS`).

Environment semantics (CLI tools)
=================================
The process never inherits the VM's environment. It gets :data:`BASE_ENV`
(``PATH=/usr/local/bin:/usr/bin:/bin``, ``LANG=LC_ALL=C.UTF-8``), then the
variables named in ``env_passthrough`` taken from the VM's request (if
present), then ``env_inject`` (which wins). Everything else the VM sent
(LD_PRELOAD, PATH, GIT_SSH_COMMAND, BASH_ENV, ...) is dropped. Names that
steer loaders, shells, interpreters, proxies or TLS trust (LD_*, BASH_ENV,
ENV, PYTHON*, GIT_*, *_PROXY, ...; see :func:`passthrough_refusal`) are
refused in ``env_passthrough`` at load time.

Working directory (CLI tools)
=============================
With ``cwd_allowed`` the requested directory is resolved on the host
(symlinks followed, must exist) and must equal or lie under one of the
allowed directories (also resolved), compared by path components, so
``/home/ab`` is not under ``/home/a``; the process runs in the resolved path.
Without ``cwd_allowed`` the VM's directory means nothing on the host and the
process runs in ``/``.

HTTP requests
=============
The method must be an HTTP token; the request-target must start with ``/``
and be printable ASCII without spaces or a fragment; header names must be
tokens and no header may contain control characters (TAB excepted). The path
(the target before ``?``) must not contain ``..`` or ``.`` segments (also as
``..;x``), empty segments (``//``), backslashes, or percent-encoded ``.``,
``/``, ``\\``, ``%`` (so no double encoding such as ``%252e``) or control
characters. ``allow_paths`` entries are ``"METHOD PATH"``: METHOD exactly (or
``*`` for any), PATH an fnmatch glob (case-sensitive; ``*`` also crosses
``/``) over the raw path without the query string. Without ``allow_paths``
every path is open (``policy lint`` warns). On a tool with any JSON-RPC rule,
every request but a GET or HEAD without a body must carry a UTF-8 JSON-RPC
object or a non-empty array of them (no duplicate keys, no NaN), so a POST
with an empty body is denied; every call of a batch is checked and one denied
call denies the request. A GET or HEAD without a body (an SSE stream, a
health check) is not a JSON-RPC call and needs only the path rules. Deny
methods win over allow methods; with ``jsonrpc_allow_methods`` present, any
other method is denied. A param filter requires ``params`` to be an object
holding the field; the field is a string or a non-empty array of strings, and
EVERY element must match no deny pattern and some allow pattern (fnmatch
globs, case-sensitive).

A filter may check several fields, ``fields: [recipient, recipients]``
(``field: X`` is ``fields: [X]``; give one of the two): the call must hold at
least one of them and every one it holds is checked as above. ``deny_fields``
denies a call holding any of the named params (with any value).
``allow_fields`` closes the list: a call holding a param that is in none of
``fields``, ``allow_fields`` and ``field_patterns`` is denied, which is how a
filter keeps up with an upstream that reads several spellings of one param
(signal-cli reads ``attachment`` also as ``attachments``, ``groupId`` also as
``group-id``; lint warns about ``deny_fields`` without ``allow_fields``).
``field_patterns: {account: ["+15550100"]}`` constrains other params when
present: a string, or an array of strings, each matching one of the globs.
``normalize: phone`` reads each checked value as signal-cli reads a number:
a value made only of ASCII digits, ``+`` and the separators `` ()-./`` is
matched with everything but digits and ``+`` removed (``"+1 (900) 555-0000"``
is ``+19005550000``, so ``deny_patterns: ["+1900*"]`` holds); any other value
(letters, ``u:username``, a UUID, non-ASCII digits) is denied, since signal-cli
would not read it as a number.

Approvals
=========
(Added.) A call the policy allows may also have to wait for a person on the
host (``server/approvals.py``, ``carapace-debug approvals``): a CLI tool's
``approve_patterns: [GLOB, ...]`` (argv semantics as above) and an HTTP
tool's ``jsonrpc_approve_methods: [METHOD, ...]`` and ``approve_paths:
["METHOD /glob" or "/glob", ...]`` (as ``allow_paths``; a bare glob means
any method) mark the calls that ask. The decision stays allow and names the
matching rule in :attr:`Decision.approval`; a denied call never asks. Every
call of a JSON-RPC batch is judged, and one call that needs approval makes
the whole batch wait. Per tool, ``approval: {timeout_secs, remember_secs}``
(default 120 and 0): how long the call waits before it fails with
``not_approved``, and for how long a yes also approves the same call again
(0: every call asks).

MCP tools
=========
A ``type: mcp`` tool is a host MCP server spoken to over stdio (newline-
delimited JSON-RPC). The VM runs a shim named after the tool as its MCP
client's server command; each run starts one process of ``command`` on the
host, in ``/``, with :data:`BASE_ENV` and ``env_inject`` only (the VM adds no
arguments and no environment: a shim run with arguments is denied). Then
every message of the session is judged (:mod:`.mcp`, applied by
``server/mcp/``):

- ``initialize``, ``ping``, ``logging/setLevel``, notifications
  (``notifications/*``) and responses to the server's own requests pass;
- ``tools/call`` needs ``params.name`` to match no ``tools_deny`` glob and
  some ``tools_allow`` glob (deny wins; without ``tools_allow`` every call is
  denied), and, when ``tool_param_filters`` has an entry for the tool, its
  ``params.arguments`` to pass that filter (the keys and meaning of
  ``jsonrpc_param_filters``; an entry is keyed by the exact tool name);
- ``resources/read``, ``resources/subscribe`` and ``resources/unsubscribe``
  need ``params.uri`` to match a ``resources_allow`` glob; ``prompts/get``
  needs ``params.name`` to match a ``prompts_allow`` glob;
  ``completion/complete`` is judged as the prompt or resource its ``ref`` names;
- any other request method is denied. A request without an id whose method
  is not a notification (a lenient server might act on it) is judged the
  same way and dropped if denied;
- the answers to ``tools/list``, ``resources/list``,
  ``resources/templates/list`` (by ``uriTemplate``) and ``prompts/list`` keep
  only the items the rules allow; one whose shape is not MCP's is withheld
  (an error instead). ``notifications/resources/updated`` reaches the VM only
  for a resource it may read; ``list_changed`` notifications pass.

A denied request is answered by Carapace with a JSON-RPC error with the same
id (code -32001, "denied by the host policy (Carapace): REASON"); the host
server never sees it. In a batch each element is judged: the allowed ones go
on as a batch, the denials come back as a batch of their own.
``timeout_secs`` bounds each request (not the session): one not answered in
time gets an error (-32002) and its late answer is dropped. ``rate_limit``
counts the judged calls (``tools/call``, ``resources/read``, ``prompts/get``,
...), not the lists.

A ``url`` tool is exposed in the VM like an HTTP tool (``carapace-agent
--expose NAME=PORT``); its MCP client talks Streamable HTTP to that port.
Every request goes to ``url`` whatever its path; only ``Accept``,
``Content-Type``, ``Mcp-Session-Id``, ``MCP-Protocol-Version`` and
``Last-Event-ID`` of the VM's headers go with it, plus ``headers_inject``.
A POST's body (a message or a batch) is judged as above: what is denied is
answered by Carapace (``200`` with the JSON-RPC error, or ``202`` when
nothing else is left), a body that is not JSON-RPC gets ``400`` with a
JSON-RPC error; answers, JSON or event streams, are filtered message by
message. GET (the server's event stream) and DELETE (the end of the MCP
session) pass; any other method is refused. ``timeout_secs`` bounds the wait
for the server's answer to begin.

``tools_approve: [GLOB, ...]`` (globs over MCP tool names, as ``tools_allow``)
makes an allowed ``tools/call`` (allowed by ``tools_allow``, not denied by
``tools_deny``, its arguments past ``tool_param_filters``, within the rate
limits) also wait for a person on the host, as the approvals above; a denied
call never asks. ``approval: {timeout_secs, remember_secs}`` has the meaning
it has on CLI and HTTP tools; a remembered yes covers the same MCP tool name
with the same arguments. Over stdio a held call waits on its own while the
session's other messages go on both ways; over HTTP the request that carries
it waits. Approved, it reaches the host server (its ``timeout_secs`` starts
then); not approved, Carapace answers it with a JSON-RPC error with its id
(code -32001, ``denied by NAME: REASON`` or ``not approved: nobody answered
within N s ...``) and the host server never sees it. Ending the session, or
the client's ``notifications/cancelled`` for it, withdraws what still waits.
"""


from .cli import argv_matches, decide_cli
from .decision import UNAVAILABLE_CODES, CliDecision, Decision, vm_denial
from .http import decide_http, prepare_http_headers
from .limits import (
    DECIDE_WORKERS,
    DEFAULT_LIMITS,
    INLINE_DECIDE_BYTES,
    LIMIT_NAMES,
    ParseLimits,
    needs_worker,
)
from .lint import RISKY_ARGS, LintWarning, RiskyArgs, lint_policy
from .load import load_policy, load_policy_file
from .mcp import (
    McpVerdict,
    decide_mcp_http,
    decide_mcp_request,
    decide_mcp_session,
    filter_list,
    notification_passes,
)
from .model import (
    BASE_ENV,
    DEFAULT_APPROVAL_TIMEOUT_SECS,
    DEFAULT_CWD,
    DEFAULT_MIN_SECRET_LENGTH,
    DEFAULT_SECRET_COMMAND_TIMEOUT,
    DEFAULT_TIMEOUT_SECS,
    AgentGrant,
    ApprovalConfig,
    AuditConfig,
    CliTool,
    HttpTool,
    McpTool,
    ParamFilter,
    PathRule,
    Policy,
    PolicyError,
    RateLimit,
    SecretRef,
    Settings,
    Tool,
)
from .ratelimit import RateLimiter, apply_rate_limits, prune_rate_limits
from .sandbox import DEFAULT_SANDBOX_SETTING, SANDBOX_SETTINGS, Rlimits, ToolSandbox
from .secret_refs import (
    CommandResult,
    SecretRefError,
    SecretResolver,
    UnresolvedSecret,
    resolve_policy,
    run_command,
)
from .secrets import env_name_is_secret, passthrough_refusal

__all__ = [
    "BASE_ENV",
    "DECIDE_WORKERS",
    "DEFAULT_APPROVAL_TIMEOUT_SECS",
    "DEFAULT_CWD",
    "DEFAULT_LIMITS",
    "DEFAULT_MIN_SECRET_LENGTH",
    "DEFAULT_SANDBOX_SETTING",
    "DEFAULT_SECRET_COMMAND_TIMEOUT",
    "DEFAULT_TIMEOUT_SECS",
    "INLINE_DECIDE_BYTES",
    "LIMIT_NAMES",
    "RISKY_ARGS",
    "SANDBOX_SETTINGS",
    "UNAVAILABLE_CODES",
    "AgentGrant",
    "ApprovalConfig",
    "AuditConfig",
    "CliDecision",
    "CliTool",
    "CommandResult",
    "Decision",
    "HttpTool",
    "LintWarning",
    "McpTool",
    "McpVerdict",
    "ParamFilter",
    "ParseLimits",
    "PathRule",
    "Policy",
    "PolicyError",
    "RateLimit",
    "RateLimiter",
    "RiskyArgs",
    "Rlimits",
    "SecretRef",
    "SecretRefError",
    "SecretResolver",
    "Settings",
    "Tool",
    "ToolSandbox",
    "UnresolvedSecret",
    "apply_rate_limits",
    "argv_matches",
    "decide_cli",
    "decide_http",
    "decide_mcp_http",
    "decide_mcp_request",
    "decide_mcp_session",
    "env_name_is_secret",
    "filter_list",
    "lint_policy",
    "load_policy",
    "load_policy_file",
    "needs_worker",
    "notification_passes",
    "passthrough_refusal",
    "prepare_http_headers",
    "prune_rate_limits",
    "resolve_policy",
    "run_command",
    "vm_denial",
]
