"""HTTP decisions: request syntax, path rules, JSON-RPC judgement, the headers sent upstream."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final, NoReturn

from carapace.runtime.http import HOP_BY_HOP, TOKEN, TOKEN_BYTES

from .decision import Decision, _deny, _lookup, _rule
from .limits import DEFAULT_LIMITS, ParseLimits, batch_limit_denial, http_limit_denial
from .model import HttpTool, Policy
from .params import check_params
from .quoting import _kind, _show

_HEADER_VALUE_BAD: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

_NOT_FORWARDED: Final = HOP_BY_HOP | {b"host", b"content-length"}
"""Request headers the VM's request loses: framing and routing belong to the HTTP client."""
NOT_INJECTABLE: Final = frozenset(h.decode() for h in _NOT_FORWARDED)
"""Headers an operator may not inject, for the same reason."""


_PLAIN_TARGET: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*\Z")
"""Printable ASCII without space, ``#``, backslash or quotes: what most targets are."""


def _target_problem(target: str) -> str | None:
    """Why a request-target is refused, or None if it is acceptable."""
    if _PLAIN_TARGET.match(target):
        # The common case in one regex call: what is left to check lies in the path.
        path = target.split("?", 1)[0]
        if "%" not in path and "//" not in path and "/." not in path:
            return None
    return _target_problem_in_detail(target)


def _target_problem_in_detail(target: str) -> str | None:
    """:func:`_target_problem` for any target, naming the problem."""
    if not target.startswith("/"):
        return "the request target must start with '/'"
    for ch in target:
        code = ord(ch)
        if code < 0x20 or code == 0x7F:
            return "the request target contains a control character"
        if code == 0x20:
            return "the request target contains a space"
        if code > 0x7E:
            return "the request target contains a non-ASCII character"
    if "#" in target:
        return "the request target contains a fragment ('#')"
    path = target.split("?", 1)[0]
    if "\\" in path:
        return "the path contains a backslash"
    i = path.find("%")
    while i != -1:
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            return "the path contains a malformed %-escape"
        byte = int(pair, 16)
        if byte in (0x2E, 0x2F, 0x5C, 0x25):
            return f"the path contains an encoded '{chr(byte)}' (%{pair}), refused as traversal"
        if byte < 0x20 or byte == 0x7F:
            return "the path contains an encoded control character"
        i = path.find("%", i + 3)
    if "//" in path:
        return "the path contains an empty segment ('//')"
    for segment in path.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            return "the path contains a '.' or '..' segment"
    return None


def _syntax_problem(
    method: str, target: str, headers: Sequence[tuple[bytes, bytes]]
) -> str | None:
    if not isinstance(method, str) or not TOKEN.match(method):
        return "the method is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"
    if not isinstance(target, str):
        return "the request target is not a string"
    problem = _target_problem(target)
    if problem:
        return problem
    if not isinstance(headers, list | tuple):
        return "the headers are malformed"
    for i, item in enumerate(headers):
        if not isinstance(item, list | tuple) or len(item) != 2:
            return f"header {i} is malformed"
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            return f"header {i} is malformed"
        if not TOKEN_BYTES.match(name):
            return f"header {i} has an invalid name (control characters or separators)"
        if _HEADER_VALUE_BAD.search(value):
            shown = _show(name.decode("ascii"))
            return f"header {shown} contains a control character (CR, LF, NUL, ...)"
    return None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> tuple[Any, str | None]:
    """Strict JSON: UTF-8, no BOM, no duplicate keys, no NaN/Infinity."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, "the body is not UTF-8 text"
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        ), None
    except _DuplicateKey:
        return None, "the JSON body repeats a key (ambiguous: parsers disagree on which wins)"
    except (ValueError, RecursionError):
        return None, "the body is not valid JSON"


def _check_call(tool: HttpTool, call: Any, label: str) -> Decision:
    """One JSON-RPC call against the method lists and param filters."""
    name = tool.name
    if not isinstance(call, dict):
        return _deny(f"{label} is not a JSON object",
                     f"default deny: tools.{name} has JSON-RPC rules; calls must be objects")
    method = call.get("method")
    if not isinstance(method, str):
        return _deny(f"{label} has no string \"method\"",
                     f"default deny: tools.{name} has JSON-RPC rules; calls need a method")
    shown = _show(method)
    for k, denied in enumerate(tool.jsonrpc_deny_methods or ()):
        if method == denied:
            return _deny(f"{label}: method {shown} is denied",
                         _rule(name, "jsonrpc_deny_methods", k, denied))
    if tool.jsonrpc_allow_methods is None:
        rule = f"tools.{name}: no jsonrpc_allow_methods, {shown} is not in the deny list"
    else:
        for k, allowed in enumerate(tool.jsonrpc_allow_methods):
            if method == allowed:
                rule = _rule(name, "jsonrpc_allow_methods", k, allowed)
                break
        else:
            return _deny(f"{label}: method {shown} is not allowed",
                         f"default deny: {shown} is not in tools.{name}.jsonrpc_allow_methods")
    gate = next((_rule(name, "jsonrpc_approve_methods", k, m)
                 for k, m in enumerate(tool.jsonrpc_approve_methods) if m == method), "")
    filt = (tool.jsonrpc_param_filters or {}).get(method)
    if filt is None:
        return Decision(True, f"{label}: method {shown} is allowed", rule, approval=gate)
    fpath = f"tools.{name}.jsonrpc_param_filters.{method}"
    denial = check_params(filt, call.get("params"), label, fpath)
    if denial is not None:
        return _deny(*denial)
    return Decision(True, f"{label}: method {shown} is allowed and its params pass {fpath}", rule,
                    approval=gate)


def decide_http(
    policy: Policy,
    agent: str,
    tool: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> Decision:
    """Decide one HTTP request from the VM. Never raises; denies by default.

    ``target`` is the raw request-target (path and query) as the VM sent it;
    ``body`` is the whole request body (JSON-RPC checks need all of it).
    ``limits`` are the server-wide parse limits; the tool's own ``limits``
    override them, and a request over one is refused before it is parsed.
    An allowed request that an ``approve_paths`` entry or an approve method
    names carries that rule in ``approval`` (it waits for a person).
    """
    decision = _decide_http(policy, agent, tool, method, target, headers, body, limits=limits)
    if not decision.allow or decision.approval:
        return decision
    found = policy.tools[tool]
    assert isinstance(found, HttpTool)
    path = target.split("?", 1)[0]
    for i, entry in enumerate(found.approve_paths):
        if entry.method in ("*", method) and fnmatch.fnmatchcase(path, entry.path):
            return replace(decision, approval=_rule(tool, "approve_paths", i, entry.text))
    return decision


def _decide_http(
    policy: Policy,
    agent: str,
    tool: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> Decision:
    """:func:`decide_http` without the approve paths."""
    found = _lookup(policy, agent, tool, HttpTool)
    if isinstance(found, Decision):
        return found
    assert isinstance(found, HttpTool)
    own = limits.for_tool(found)
    over = http_limit_denial(found, own, method, target, headers, body)
    if over is not None:
        return over
    problem = _syntax_problem(method, target, headers)
    if problem:
        return _deny(problem, "default deny: malformed or unsafe request", "bad_request")
    if not isinstance(body, bytes):
        return _deny("the body is not bytes", "default deny: malformed request", "bad_request")
    path = target.split("?", 1)[0]
    path_rule = ""
    if found.allow_paths is not None:
        for i, entry in enumerate(found.allow_paths):
            if entry.method in ("*", method) and fnmatch.fnmatchcase(path, entry.path):
                path_rule = _rule(tool, "allow_paths", i, entry.text)
                break
        else:
            return _deny(f"{method} {_show(path)} is not an allowed path",
                         f"default deny: no tools.{tool}.allow_paths entry matches")
    if not found.jsonrpc_rules:
        return Decision(True, "the request passes the path rules",
                        path_rule or f"tools.{tool}: no allow_paths (every path is open)")
    if method in ("GET", "HEAD") and not body:
        return Decision(True, f"{method} without a body is not a JSON-RPC call",
                        path_rule or f"tools.{tool}: no allow_paths (every path is open)")
    doc, error = _parse_json(body)
    if error:
        return _deny(error, f"default deny: tools.{tool} has JSON-RPC rules; "
                     "the body must be a JSON-RPC request")
    if isinstance(doc, list):
        if not doc:
            return _deny("the JSON-RPC batch is empty",
                         f"default deny: tools.{tool} has JSON-RPC rules; "
                         "batches must not be empty")
        too_many = batch_limit_denial(found, own, len(doc))
        if too_many is not None:
            return too_many
        verdicts = [_check_call(found, call, f"batch call {i}") for i, call in enumerate(doc)]
        for verdict in verdicts:
            if not verdict.allow:
                return verdict
        return Decision(True, f"all {len(doc)} calls of the batch are allowed",
                        "; ".join(dict.fromkeys(v.rule for v in verdicts)),
                        approval="; ".join(dict.fromkeys(v.approval for v in verdicts
                                                         if v.approval)))
    if not isinstance(doc, dict):
        return _deny(f"the JSON body is {_kind(doc)}, not a JSON-RPC object",
                     f"default deny: tools.{tool} has JSON-RPC rules; "
                     "the body must be a JSON-RPC request")
    return _check_call(found, doc, "the call")


def prepare_http_headers(
    tool: HttpTool, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the VM's, minus hop-by-hop ones, plus injected ones.

    Removes Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding,
    Upgrade, Host and Content-Length (the HTTP client frames the request
    itself), every header named in Connection, and every header whose name
    matches a ``headers_inject`` entry (case-insensitive), then appends the
    injected headers, so the VM can neither see nor override a credential.
    Call it only on headers that :func:`decide_http` accepted.
    """
    drop = set(_NOT_FORWARDED)
    drop.update(name.lower().encode("ascii") for name in tool.headers_inject)
    for name, value in headers:
        if name.lower() == b"connection":
            drop.update(tok.strip().lower() for tok in value.split(b",") if tok.strip())
    out = [
        (name, value)
        for name, value in headers
        if name.lower() not in drop and not name.lower().startswith(b"proxy-")
    ]
    out.extend(
        (name.encode("ascii"), value.encode("ascii"))
        for name, value in tool.headers_inject.items()
    )
    return out
