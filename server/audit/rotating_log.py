"""The audit log file: append-only JSON lines, rotated by size (see the package doc)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Final

import trio

from .caps import encode_record

log = logging.getLogger("carapace.server")

DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024
DEFAULT_BACKUPS: Final = 5


class AuditError(Exception):
    """The audit trail cannot be written; the message says which file and why."""


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
        self.write_line(encode_record(record))

    def write_line(self, data: bytes) -> None:
        """Append one encoded record (:func:`.caps.encode_record`). Raises AuditError."""
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
