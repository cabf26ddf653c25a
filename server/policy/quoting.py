"""How policy messages quote what they name: safely escaped, shortened, typed in words."""

from __future__ import annotations

import json
from typing import Any


def _show(text: str, limit: int = 60) -> str:
    """A string for a message: JSON-escaped (no control characters), truncated."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text)


def _kind(value: Any) -> str:
    """The type of a YAML or JSON value in words, for a message (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
