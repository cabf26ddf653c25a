"""Listening unix sockets: a strict mode from the first instant, stale files replaced safely.

Both daemons listen on unix sockets — the agent for its tool shims, the
server for agents that reach it through a bind mount or Firecracker's vsock
device — and both need the same care: the file is never looser than its
mode, a socket left by a crashed process is replaced, and nothing else (a
live listener, a regular file) ever is. ``SO_PEERCRED`` then names the
process at the other end of each connection.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

import trio

SOCKET_MODE = 0o660
"""Owner and group may connect: the group is how an operator grants access (a
setgid directory or the daemon's group); others may not."""

DIR_MODE = 0o700
"""A socket's directory the agent creates: only its own user may reach it."""

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def clear_stale_socket(path: str, who: str = "process") -> None:
    """Remove ``path`` if it is a socket nobody listens on; OSError if anything else is there.

    A regular file (or a directory, a link) is never removed: it may be
    someone's data. A socket with a live listener is another daemon's: the error
    names it as ``who`` (the agent says "agent": only another agent would be there).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it "
                                    "(remove it yourself, or pick another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left by a process that did not shut down cleanly
    except OSError:
        pass  # let bind report what is wrong
    else:
        raise OSError(errno.EADDRINUSE, f"another {who} is already serving {path} "
                                        "(stop it, or pick another path)")
    finally:
        probe.close()


def bind_unix_socket(path: str, mode: int = SOCKET_MODE, *,
                     dir_mode: int | None = DIR_MODE, who: str = "process") -> socket.socket:
    """A listening, non-blocking unix socket at ``path`` with ``mode``, never looser.

    A missing parent directory is created with ``dir_mode``, or with
    ``dir_mode=None`` is an error that says to create it. An existing file is
    handled by :func:`clear_stale_socket`.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        if dir_mode is None:
            raise OSError(errno.ENOENT, f"the directory {parent} does not exist; create it "
                                        "(with the owner and group that may connect)")
        os.makedirs(parent, exist_ok=True)
        os.chmod(parent, dir_mode)
    clear_stale_socket(path, who)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket file is created by bind() with 0777 & ~umask: set the umask so
        # it is never looser than ``mode``, not even for the instant before chmod.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_if_ours(path: str, inode: int) -> None:
    """Unlink the socket file we bound (``inode``), never one a newer process put there."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def peer_credentials(sock: socket.socket | trio.socket.SocketType
                     ) -> tuple[int | None, int | None, int | None]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket, from the kernel."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None, None, None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid
