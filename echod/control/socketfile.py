"""The control socket's file: created with its mode and group before anyone can reach it.

The socket is bound under a private name, given its mode and group, and only then renamed to
its path, so there is no moment when it is reachable with the umask's permissions. A file left
at the path by a dead daemon is removed only when nothing answers on it; at close, only the
file this daemon bound is removed.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat

import structlog

from echod.config.validators import control_temp_path

log = structlog.get_logger("echod.sockfile")


def resolve_group(group: str | None) -> int | None:
    """Return the gid of a group given by name or number; None stays None."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at `path` (OSError: can't tell)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            # A full backlog (EAGAIN on a Unix socket) still means a live listener.
            return True
        except OSError as exc:
            # EACCES (a socket we may not connect to), EPROTOTYPE (a datagram socket), ...: we
            # cannot tell whether it is in use, so it is not ours to remove.
            raise OSError(
                exc.errno,
                f"{path} exists and cannot be probed ({exc.strerror or exc}); "
                "not removing it: remove it by hand if no daemon uses it",
                path,
            ) from exc
    return True


class SocketFile:
    """The Unix socket at `path`: bound with `mode` and group `gid`, unlinked only if ours."""

    def __init__(self, path: str, mode: int, gid: int | None) -> None:
        self.path = path
        self.mode = mode
        self.gid = gid
        self.inode: int | None = None

    def bind(self, backlog: int) -> socket.socket:
        """Bind and listen under a private name, set mode and group, then rename it in."""
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = control_temp_path(os.path.join(parent, os.path.basename(self.path)), os.getpid())
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            # Permissions are set on a private name, then renamed in: no window where the
            # socket is reachable with the umask's permissions.
            os.chmod(tmp, self.mode)
            if self.gid is not None:
                os.chown(tmp, -1, self.gid)
            sock.listen(backlog)
            os.rename(tmp, self.path)
            self.inode = os.stat(self.path).st_ino
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sock

    def _remove_stale(self) -> None:
        """Remove a socket file nothing answers on; refuse anything else at the path."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket", self.path)
        if answers(self.path):
            raise OSError(errno.EADDRINUSE, f"another daemon answers on {self.path}", self.path)
        log.info("control.stale_socket_removed", path=self.path)
        os.unlink(self.path)

    def unlink(self) -> None:
        """Remove the file we bound, and only that one: a newer daemon may own the path now."""
        if self.inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.inode = None
