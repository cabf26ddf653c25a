"""What the operator's terminal is shown of what a VM chose.

Tool names, methods, targets, reasons and summaries in the server's answers
and in the audit log can hold any character a hostile VM sent, and rich
passes escape sequences (and bidi overrides) through to the terminal. The
human views run every string of a record through :func:`printable_doc` (the
escaping the server's text log uses) before rendering it;
``--json`` output needs nothing, since JSON escapes control characters itself.
"""

from __future__ import annotations

from typing import Any

from carapace.protocol.summary import printable


def printable_doc(value: Any) -> Any:
    """``value`` (a decoded JSON document) with every string in it made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): printable_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_doc(v) for v in value]
    return value
