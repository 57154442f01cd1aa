"""Kernel-path sockets: hang-up watching, and the guard over what the psock has not echoed yet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
from collections.abc import Callable, Iterator
from typing import Protocol

# Per guard tick (100 ms): marked sockets read from the activity set, and sockets of the
# round robin over every kernel-path socket (100 a second).
ACTIVE_PER_TICK = 4096
SWEEP_PER_TICK = 10


class Watched(Protocol):
    """What the watcher and the guard need of a kernel-path connection."""

    fd: int
    cookie: int

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

    def close(self) -> None:
        """Release the epoll fd; idempotent."""
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
        self.conns.clear()


class ActiveSet(Protocol):
    """The BPF activity set (sockmap.SocketMaps): sockets that received data lately."""

    def active(self, limit: int) -> list[int]: ...

    def clear_active(self, cookie: int) -> None: ...


class BacklogGuard:
    """The 100 ms guard over kernel-path sockets, which are not watched for input.

    Each tick looks at the sockets the verdict marked active since the last look (the BPF
    activity set), the sockets that still had unwritten echo at the last look, and a few more
    in a slow round robin over all of them (SWEEP_PER_TICK), which finds a socket that left
    the map behind our back. Idle connections therefore cost almost nothing, however many.

    A socket with unwritten echo is read: on a healthy psock the read finds nothing (the
    recvmsg of a verdict socket only returns what the verdict passed up), while bytes that
    missed the redirect, or a socket that left the map, are echoed here. The kernel does not
    bound a psock's queue, so a socket whose unwritten echo exceeds the per-connection limit is
    handed to `exceeded`, and so are the largest ones while the sum exceeds the total limit.
    """

    def __init__(self, exceeded: Callable[[Watched, int, str], None]) -> None:
        self.exceeded = exceeded
        self.conns: dict[int, Watched] = {}  # cookie -> every kernel-path connection
        self._backlogs: dict[Watched, int] = {}
        self._sweep: Iterator[Watched] = iter(())

    def track(self, conn: Watched) -> None:
        """conn's socket has entered the sockhash."""
        self.conns[conn.cookie] = conn

    def forget(self, conn: Watched) -> None:
        """conn is closing."""
        if self.conns.get(conn.cookie) is conn:
            del self.conns[conn.cookie]
        self._backlogs.pop(conn, None)

    def _swept(self) -> list[Watched]:
        """The next few connections of the round robin over all of them."""
        out = list(itertools.islice(self._sweep, SWEEP_PER_TICK))
        if len(out) < SWEEP_PER_TICK and self.conns:
            # One copy per full round: O(SWEEP_PER_TICK) a tick, amortised.
            self._sweep = iter(list(self.conns.values()))
            out += itertools.islice(self._sweep, SWEEP_PER_TICK - len(out))
        return [c for c in out if self.conns.get(c.cookie) is c]

    def check(self, active: ActiveSet, limit: int, total_limit: int) -> None:
        """One tick: read sockets with unwritten echo; hand over those past a limit."""
        if not self.conns:
            self._backlogs.clear()
            return
        look: dict[Watched, None] = dict.fromkeys(self._backlogs)
        for cookie in active.active(ACTIVE_PER_TICK):
            conn = self.conns.get(cookie)
            if conn is not None:  # else another worker's socket: its owner clears it
                # Cleared before the read: a packet from now on marks the socket again.
                active.clear_active(cookie)
                look[conn] = None
        look.update(dict.fromkeys(self._swept()))
        for conn in look:
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
