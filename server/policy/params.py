"""JSON-RPC param filters: which params a call may carry and what its checked fields may hold."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Final

from .model import ParamFilter
from .quoting import _show

_PHONE_CHARS: Final = re.compile(r"[0-9+ ()./-]*\Z")
"""What a written phone number holds: ASCII digits, '+' and the separators people type."""
_NOT_PHONE_DIGIT: Final = re.compile(r"[^0-9+]")

Denial = tuple[str, str]
"""(reason, rule) of a call the filter refuses."""


def normalize_phone(value: str) -> str | None:
    """The number signal-cli sends to (all but ASCII digits and '+' stripped), or None.

    None for anything else that signal-cli would not read as a phone number
    (a UUID, ``u:username``, letters, full-width digits): a filter that checks
    numbers must not wave those through on the digits they happen to contain.
    """
    if not _PHONE_CHARS.match(value):
        return None
    return _NOT_PHONE_DIGIT.sub("", value)


def _strings(value: Any) -> list[str] | None:
    """A string or a non-empty array of strings as a list, else None."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _check_values(
    filt: ParamFilter, name: str, value: Any, label: str, fpath: str
) -> Denial | None:
    """One checked field: every element must match no deny pattern and some allow pattern."""
    values = _strings(value)
    if values is None:
        if isinstance(value, list) and not value:
            return (f"{label}: params.{name} is an empty array",
                    f"default deny: {fpath} needs at least one value to check")
        return (f"{label}: params.{name} must be a string or an array of strings",
                f"default deny: {fpath} checks strings only")
    for j, raw in enumerate(values):
        where = f"params.{name}" + (f"[{j}]" if isinstance(value, list) else "")
        item: str | None = raw
        if filt.normalize == "phone":
            item = normalize_phone(raw)
            if item is None:
                return (f"{label}: {where} is not a phone number",
                        f"default deny: {fpath}.normalize is phone")
        assert item is not None
        for k, pattern in enumerate(filt.deny_patterns):
            if fnmatch.fnmatchcase(item, pattern):
                return (f"{label}: {where} matches a deny pattern",
                        f"{fpath}.deny_patterns[{k}] {_show(pattern)}")
        if not any(fnmatch.fnmatchcase(item, p) for p in filt.allow_patterns):
            return (f"{label}: {where} matches no allow pattern",
                    f"default deny: no {fpath}.allow_patterns entry matches {where}")
    return None


def _check_pinned(
    filt: ParamFilter, params: Mapping[str, Any], label: str, fpath: str
) -> Denial | None:
    """``field_patterns``: a named param, when present, holds only strings matching its globs."""
    for name, globs in filt.field_patterns.items():
        if name not in params:
            continue
        values = _strings(params[name])
        shown = f"params.{name}"
        if values is None:
            return (f"{label}: {shown} must be a string or an array of strings",
                    f"default deny: {fpath}.field_patterns.{name} checks strings only")
        for item in values:
            if not any(fnmatch.fnmatchcase(item, g) for g in globs):
                return (f"{label}: {shown} matches no pattern of field_patterns",
                        f"default deny: no {fpath}.field_patterns.{name} entry matches")
    return None


def check_params(filt: ParamFilter, params: Any, label: str, fpath: str) -> Denial | None:
    """Why a call's params fail a filter, or None if they pass (meaning in the package docs)."""
    wanted = " or ".join(f"params.{f}" for f in filt.fields)
    if not isinstance(params, dict):
        return (f"{label}: params must be an object holding {_show(filt.fields[0])}",
                f"default deny: {fpath} requires {wanted}")
    for k, name in enumerate(filt.deny_fields):
        if name in params:
            return (f"{label}: params.{name} is denied",
                    f"{fpath}.deny_fields[{k}] {_show(name)}")
    if filt.allow_fields is not None:
        known = {*filt.fields, *filt.allow_fields, *filt.field_patterns}
        for name in params:
            if name not in known:
                return (f"{label}: params.{_show(name)} is not an allowed field",
                        f"default deny: {_show(name)} is in none of {fpath}.fields, "
                        "allow_fields, field_patterns")
    pinned = _check_pinned(filt, params, label, fpath)
    if pinned is not None:
        return pinned
    present = [f for f in filt.fields if f in params]
    if not present:
        return (f"{label}: {wanted} is missing",
                f"default deny: {fpath} requires {wanted}")
    for name in present:
        denial = _check_values(filt, name, params[name], label, fpath)
        if denial is not None:
            return denial
    return None
