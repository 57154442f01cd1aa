"""The bypass_paths socket storage read and written from user space: its record (struct
bypass_sock of bpf/bypass.h: a socket's role and path), a socket's path (socket_path), the
mark on echod's listeners (mark_listener), and PathReaders, which answers which path a
connection took across every bypass object the service has seen, keeping an old one until no
connection of it is left.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import structlog

from echod.kernel import libbpf
from echod.kernel.info import map_info

log = structlog.get_logger("echod.bypass")

# bpf/bypass.h: BYPASS_PATH_*, BYPASS_ROLE_*.
PATHS = {0: "undecided", 1: "tcp", 2: "ingress", 3: "short_circuit"}
PATH_INGRESS = 2
ROLES = {1: "server", 2: "client", 3: "listener"}
ROLE_LISTENER = 3
# struct bypass_sock, the storage's value: each field's name and struct code, in order.
SOCK_LAYOUT = (("role", "I"), ("path", "I"), ("sent", "Q"), ("echoed", "Q"))
SOCK_STRUCT = struct.Struct("=" + "".join(code for _, code in SOCK_LAYOUT))


def socket_path(paths_fd: int, sock: socket.socket) -> tuple[str, str] | None:
    """A socket's (role, path) from its bypass_paths storage; None when it has none."""
    try:
        raw = libbpf.map_lookup(paths_fd, struct.pack("=i", sock.fileno()), SOCK_STRUCT.size)
    except KeyError:
        return None
    role, path, _, _ = SOCK_STRUCT.unpack(raw)
    return ROLES.get(role, str(role)), PATHS.get(path, str(path))


def mark_listener(paths_fd: int, sock: socket.socket) -> None:
    """Mark one of echod's listeners: every connection it accepts inherits the mark.

    sock_ops takes a server end only if it carries the mark, so a connection another server
    accepts on the same port (another address, or a more specific bind) is never touched.
    """
    value = SOCK_STRUCT.pack(ROLE_LISTENER, 0, 0, 0)
    libbpf.map_update(paths_fd, struct.pack("=i", sock.fileno()), value)


class PathReaders:
    """Reads sockets' bypass paths from their storage (bypass_paths, keyed by socket fd).

    One reader per bypass object this service has seen: after the bypass is turned off, or off
    and on again, connections of the earlier object live on (their client and server ends stay
    in its sockhash, and a redirect may still hold their bytes), and their path is in that
    object's storage. So an object that is no longer the attached one is let go only once its
    sockhash is empty: looked at every RETIRE_CHECK seconds (the sockhash's fd is held for
    that; holding the storage alone would not tell). Letting go of it earlier frees its maps,
    and with them the echo a redirect had queued in a live socket: bytes lost. The rest go at
    stop. The newest storage fd marks the service's listeners (mark_listener).
    """

    RETIRE_CHECK = 5.0

    def __init__(self, on_empty: Callable[[], None] | None = None) -> None:
        # paths map id -> (paths fd, sockhash fd or -1), both owned; oldest first.
        self._fds: dict[int, tuple[int, int]] = {}
        self._on_empty = on_empty  # called when retiring lets go of the last object
        self._timers: dict[int, asyncio.TimerHandle] = {}  # map id -> its next look

    def add(self, fd: int, sockets_fd: int = -1) -> None:
        """Take ownership of a bypass_paths fd and its object's sockhash fd (closed at once if
        that object is known already). Without a sockhash fd the object is kept until close().
        """
        try:
            map_id = map_info(fd)["id"]
        except OSError:
            _close(fd, sockets_fd)
            raise
        if map_id in self._fds:
            _close(fd, sockets_fd)
            timer = self._timers.pop(map_id, None)
            if timer is not None:  # attached again before it was let go
                timer.cancel()
        else:
            self._fds[map_id] = (fd, sockets_fd)

    def retire(self, loop: asyncio.AbstractEventLoop, keep_newest: bool) -> None:
        """Let go of every object but the newest (or all) once its sockhash is empty."""
        ids = list(self._fds)
        for map_id in ids[:-1] if keep_newest else ids:
            if map_id not in self._timers and self._fds[map_id][1] >= 0:
                self._timers[map_id] = loop.call_later(self.RETIRE_CHECK, self._look, loop, map_id)

    def _look(self, loop: asyncio.AbstractEventLoop, map_id: int) -> None:
        self._timers.pop(map_id, None)
        fds = self._fds.get(map_id)
        if fds is None:
            return
        try:
            in_use = bool(libbpf.map_keys(fds[1], _MAX_KEY, limit=1))
        except OSError as exc:
            log.warning("bypass.retire_check_failed", error=str(exc))
            in_use = True
        if in_use:  # a connection of that object is still open
            self._timers[map_id] = loop.call_later(self.RETIRE_CHECK, self._look, loop, map_id)
        else:
            del self._fds[map_id]
            _close(*fds)
            if not self._fds and self._on_empty is not None:
                self._on_empty()

    def __len__(self) -> int:
        return len(self._fds)

    def mark(self, sock: socket.socket) -> None:
        """Mark a listener of the service in the newest bypass object (see mark_listener).

        Only the newest one's programs are attached: an older object's mark would only be
        copied into connections for nothing.
        """
        if not self._fds:
            return
        newest = next(reversed(self._fds.values()))[0]
        try:
            mark_listener(newest, sock)
        except OSError as exc:  # not marked: its connections stay on TCP
            log.warning("bypass.mark_failed", error=str(exc))

    def path(self, sock: socket.socket) -> str | None:
        """The socket's path ("ingress", "short_circuit", ...), None when it has none.

        Read from the object whose sock_ops took the connection: its server-end entry. Other
        objects may hold a listener's mark copied into the socket, which says nothing.
        """
        key = struct.pack("=i", sock.fileno())
        for fd, _ in reversed(self._fds.values()):
            try:
                raw = libbpf.map_lookup(fd, key, SOCK_STRUCT.size)
            except (KeyError, OSError):
                continue
            role, path, _, _ = SOCK_STRUCT.unpack(raw)
            if role != ROLE_LISTENER:
                return PATHS.get(path)
        return None

    def user_only(self, sock: socket.socket) -> bool:
        """Whether the connection's bytes arrive by redirect to its receive queue.

        Such bytes never pass the sk_skb verdict, and a kernel-path socket is not watched for
        them: the connection must be echoed in user space, whatever the mode.
        """
        return bool(self._fds) and self.path(sock) == PATHS[PATH_INGRESS]

    def close(self) -> None:
        """Close every fd; idempotent."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        fds, self._fds = list(self._fds.values()), {}
        for pair in fds:
            _close(*pair)


_MAX_KEY = 64  # bpf_map_get_next_key writes the map's key size: the sockhash's is smaller


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)
