"""Kernel-path sockets: hang-up watching, and the guard over what the psock has not echoed yet."""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable
from typing import Protocol

GUARD_SLICE = 2000  # sockets checked per guard tick, round robin


class Watched(Protocol):
    """What the watcher and the guard need of a kernel-path connection."""

    fd: int

    def read_available(self) -> None: ...

    def backlog(self) -> int: ...


class HangupWatcher:
    """An epoll set of kernel-path sockets registered for EPOLLRDHUP only (HUP/ERR implied).

    The loop watches the set's own fd, so the daemon wakes for a hang-up or an error, never
    for the per-skb wake-ups of the psock.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.conns: dict[int, Watched] = {}
        loop.add_reader(self.epoll.fileno(), self._on_ready)

    def add(self, conn: Watched) -> None:
        """Watch conn for hang-up."""
        if conn.fd not in self.conns:
            self.epoll.register(conn.fd, select.EPOLLRDHUP)
            self.conns[conn.fd] = conn

    def has(self, conn: Watched) -> bool:
        """Whether conn is watched here."""
        return self.conns.get(conn.fd) is conn

    def discard(self, conn: Watched) -> None:
        """Stop watching conn (before its fd is closed)."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            with contextlib.suppress(OSError):
                self.epoll.unregister(conn.fd)

    def _on_ready(self) -> None:
        for fd, _ in self.epoll.poll(0, 256):
            conn = self.conns.get(fd)
            if conn is not None:
                conn.read_available()

    def watched(self) -> list[Watched]:
        """A snapshot of the watched connections."""
        return list(self.conns.values())

    def close(self) -> None:
        """Release the epoll fd; idempotent."""
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
        self.conns.clear()


class BacklogGuard:
    """The 100 ms guard over kernel-path sockets, which are not watched for input.

    A socket with unwritten echo is read: on a healthy psock the read finds nothing (the
    recvmsg of a verdict socket only returns what the verdict passed up), while bytes that
    missed the redirect, or a socket that left the map, are echoed here. The kernel does not
    bound a psock's queue, so a socket whose unwritten echo exceeds the per-connection limit is
    handed to `exceeded`, and so are the largest ones while the sum exceeds the total limit.
    Each check looks at most GUARD_SLICE sockets, round robin, to bound the loop's work.
    """

    def __init__(
        self, hangups: HangupWatcher, exceeded: Callable[[Watched, int, str], None]
    ) -> None:
        self.hangups = hangups
        self.exceeded = exceeded
        self._backlogs: dict[Watched, int] = {}
        self._next = 0

    def forget(self, conn: Watched) -> None:
        """conn is closing."""
        self._backlogs.pop(conn, None)

    def check(self, limit: int, total_limit: int) -> None:
        """One tick: read sockets with unwritten echo; hand over those past a limit."""
        watched = self.hangups.watched()
        if not watched:
            self._backlogs.clear()
            return
        start = self._next % len(watched)
        batch = (watched[start:] + watched[:start])[:GUARD_SLICE]
        self._next = start + len(batch)
        for conn in batch:
            pending = conn.backlog()
            if pending > limit:
                self.exceeded(conn, pending, "connection")
            elif pending:
                self._backlogs[conn] = pending
                conn.read_available()
            else:
                self._backlogs.pop(conn, None)
        total = sum(self._backlogs.values())
        for conn, pending in sorted(self._backlogs.items(), key=lambda kv: -kv[1]):
            if total <= total_limit:
                break
            total -= pending
            self.exceeded(conn, pending, "total")
