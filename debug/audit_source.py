"""Where ``carapace-debug audit`` reads the audit log when it is not given ``--file``.

The places, in order:

1. ``CARAPACE_AUDIT_LOG``, the variable of the server's own ``--audit-log``: the deploy
   kit's ``/etc/carapace/server.env`` sets it, so a shell that loaded that file reads
   exactly what the server writes;
2. ``/var/log/carapace/audit.jsonl``, where the deploy kit's server writes by default;
3. the running server's own answer: its debug listener reports its ``--audit-log`` in
   ``/debug/health``.

The first file that can be read wins. When none can, the error names all three and
what each said, so the operator sees which one to fix.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .client import DebugClient, Unreachable

AUDIT_ENV = "CARAPACE_AUDIT_LOG"
DEPLOYED_AUDIT_LOG = "/var/log/carapace/audit.jsonl"
"""The path deploy/server.env.example gives the server (keep the two the same)."""

_UNREADABLE_HINT = ("run it with sudo: the server writes the log readable by its own user "
                    "only (carapace, in the deploy kit)")


@dataclass(frozen=True)
class AuditLog:
    path: str
    found_by: str
    """How the path was found, for the reader: ``--file``, the variable, the default path
    or the server."""


class AuditLogNotFound(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as the audit log, or None when it can."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except PermissionError:
        return f"permission denied on its directory; {_UNREADABLE_HINT}"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(st.st_mode):
        return "it is a directory, not the log file"
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return f"permission denied; {_UNREADABLE_HINT}"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _server_answer(client: DebugClient) -> tuple[str | None, str]:
    """The server's --audit-log, or None and why there is none."""
    try:
        doc = client.get_json("/debug/health")
    except Unreachable as exc:
        return None, exc.message
    path = doc.get("audit_log")
    if not isinstance(path, str) or not path:
        return None, "the server runs without --audit-log, so it writes no audit log"
    return path, ""


def find_audit_log(env_path: str | None, client: DebugClient) -> AuditLog:
    """The first readable audit log of the three places; AuditLogNotFound names them all."""
    tried: list[str] = []
    if env_path:
        problem = unreadable(env_path)
        if problem is None:
            return AuditLog(env_path, AUDIT_ENV)
        tried.append(f"{AUDIT_ENV}={env_path}: {problem}")
    else:
        tried.append(f"{AUDIT_ENV}: not set")
    problem = unreadable(DEPLOYED_AUDIT_LOG)
    if problem is None:
        return AuditLog(DEPLOYED_AUDIT_LOG, "the deploy kit's path")
    tried.append(f"{DEPLOYED_AUDIT_LOG} (the deploy kit's path): {problem}")
    server_path, why = _server_answer(client)
    if server_path is not None:
        problem = unreadable(server_path)
        if problem is None:
            return AuditLog(server_path, f"the server at {client.address}")
        why = f"it writes {server_path}: {problem}"
    tried.append(f"the debug listener at {client.address}: {why}")
    raise AuditLogNotFound(
        "no audit log found. Tried, in order:\n"
        + "".join(f"  {n}. {line}\n" for n, line in enumerate(tried, 1))
        + "Give --file F (the server's --audit-log), set CARAPACE_AUDIT_LOG, or point "
        "--debug at the server's --debug-listen address."
    )
