"""Kernel-path sockets: hang-up watching, and the guard over what the psock has not echoed yet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Protocol

# The guard (BacklogGuard): how long a socket found quiet waits for its second look, and the
# longest wait for one with unwritten echo; the shortest wait for a growing one; how long after
# a ring the guard looks (gathering rings); sockets of
# the round robin over all, per second; the tick when nothing happens; and how many sockets of
# the activity set a walk reads when the ring overflowed.
QUIET = 0.1
MIN_STEP = 0.002
RING_DELAY = 0.005
SWEEP_PER_SECOND = 50
IDLE_CHECK = 1.0
ACTIVE_WALK = 4096


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

    def marks(self) -> int: ...

    def clear_active(self, cookie: int) -> None: ...


class BacklogGuard:
    """The guard over kernel-path sockets, which are not watched for input.

    A socket with unwritten echo is read: on a healthy psock the read finds nothing (the
    recvmsg of a verdict socket only returns what the verdict passed up), while bytes that
    missed the redirect, or a socket that left the map, are echoed here. The kernel does not
    bound a psock's queue, so a socket whose unwritten echo exceeds the per-connection limit is
    handed to `exceeded`, and so are the largest ones while the sum exceeds the total limit.

    What it looks at, and when:
    - a socket the verdict rang the bell for (`ring`): RING_DELAY later. The verdict rings
      when a socket enters the BPF activity set, and again every 8 MiB it receives while in
      it, so a peer that never reads is seen within tens of MiB, however fast it sends
      (loopback: GB/s);
    - a socket with unwritten echo: again and again, sooner the faster it grows;
    - a socket found quiet: once more after QUIET, and if still quiet it leaves the activity
      set (its next packet rings the bell again);
    - a slow round robin over every socket (SWEEP_PER_SECOND), which finds one that left the
      map behind our back; and, if the ring overflowed, a walk of the activity set.
    Idle connections therefore cost nothing, however many there are.
    """

    def __init__(
        self,
        exceeded: Callable[[Watched, int, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exceeded = exceeded
        self._clock = clock
        self.conns: dict[int, Watched] = {}  # cookie -> every kernel-path connection
        self._backlogs: dict[Watched, int] = {}
        # conn -> (when to look again, pending then, when that was, looks found quiet)
        self._due: dict[Watched, tuple[float, int, float, int]] = {}
        self._rung: set[Watched] = set()
        self._rung_at: float | None = None
        self._sweep: Iterator[Watched] = iter(())
        self._swept_at = self._counted_at = clock()
        self._marks = 0  # the verdict's ring count at the last count
        self._records = 0  # cookies read from the ring since then

    def track(self, conn: Watched) -> None:
        """conn's socket has entered the sockhash."""
        self.conns[conn.cookie] = conn

    def forget(self, conn: Watched) -> None:
        """conn is closing."""
        if self.conns.get(conn.cookie) is conn:
            del self.conns[conn.cookie]
        self._backlogs.pop(conn, None)
        self._due.pop(conn, None)
        self._rung.discard(conn)

    def ring(self, cookies: list[int]) -> None:
        """The verdict rang the bell for these sockets (some may be another worker's)."""
        self._records += len(cookies)
        for cookie in cookies:
            conn = self.conns.get(cookie)
            if conn is not None:
                self._rung.add(conn)
        if self._rung and self._rung_at is None:
            self._rung_at = self._clock()

    def due(self) -> float:
        """When the next check is due (on the guard's clock)."""
        if self._rung_at is not None:
            # A moment's delay gathers many rings into one look, and skips connections that
            # close within it (connect, one request, close).
            return self._rung_at + RING_DELAY
        when = min(self._swept_at, self._counted_at) + IDLE_CHECK
        if self._due:
            when = min(when, min(v[0] for v in self._due.values()))
        return when

    def _swept(self, now: float) -> list[Watched]:
        """The next few connections of the round robin over all of them."""
        n = int(SWEEP_PER_SECOND * min(now - self._swept_at, 10.0))
        if n < 1:
            return []
        self._swept_at = now
        out = list(itertools.islice(self._sweep, n))
        if len(out) < n and self.conns:
            # One copy per full round: O(n) a tick, amortised.
            self._sweep = iter(list(self.conns.values()))
            out += itertools.islice(self._sweep, n - len(out))
        return [c for c in out if self.conns.get(c.cookie) is c]

    def _lost_rings(self, active: ActiveSet) -> list[Watched]:
        """When the ring overflowed (fewer records than rings), ours in the activity set."""
        marks = active.marks()
        lost = marks - self._marks > self._records
        self._marks, self._records = marks, 0
        if not lost:
            return []
        return [c for c in map(self.conns.get, active.active(ACTIVE_WALK)) if c is not None]

    def check(self, active: ActiveSet, limit: int, total_limit: int) -> None:
        """Look at what is due: read sockets with unwritten echo; hand over those past a limit."""
        now = self._clock()
        if not self.conns:
            self._backlogs.clear()
            self._due.clear()
            self._rung.clear()
            self._rung_at = None
            self._swept_at = self._counted_at = now
            return
        rung = set()
        if self._rung_at is not None and now >= self._rung_at + RING_DELAY:
            rung, self._rung, self._rung_at = self._rung, set(), None
        if now - self._counted_at >= IDLE_CHECK:  # once a second: did the ring overflow?
            self._counted_at = now
            rung.update(self._lost_rings(active))  # found there: followed as if rung
        look = {c for c, v in self._due.items() if v[0] <= now} | rung
        look.update(self._swept(now))
        for conn in look:
            pending = conn.backlog()
            if pending > limit:
                self._due.pop(conn, None)
                self.exceeded(conn, pending, "connection")
                continue
            self._schedule(conn, pending, now, active, limit, conn in rung)
            if pending:
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

    def _schedule(
        self, conn: Watched, pending: int, now: float, active: ActiveSet, limit: int, rung: bool
    ) -> None:
        """When to look at conn again: sooner as its backlog grows; never once it is quiet."""
        before = self._due.get(conn)
        if pending == 0:
            if before is None and not rung:
                return  # swept, and quiet: nothing to follow
            if before is not None and before[3] >= 1:
                # Quiet twice: out of the activity set; its next packet rings the bell.
                del self._due[conn]
                active.clear_active(conn.cookie)
            else:
                self._due[conn] = (now + QUIET, 0, now, 1)
            return
        wait = QUIET
        if before is not None and now > before[2] and pending > before[1]:
            # Half the time to the limit at this rate: past it by at most one step's growth.
            rate = (pending - before[1]) / (now - before[2])
            wait = (limit - pending) / rate / 2
        self._due[conn] = (now + min(max(wait, MIN_STEP), QUIET), pending, now, 0)


class KernelConn(Watched, Protocol):
    """What KernelPath needs of a connection besides what the guard does."""

    sock: socket.socket

    def enter_kernel(self, cookie: int) -> None: ...

    def watch(self) -> None: ...


class SocketMap(ActiveSet, Protocol):
    """The sockhash too (sockmap.SocketMaps)."""

    def remove(self, sock: socket.socket, cookie: int | None = None) -> None: ...


class KernelPath:
    """One service's side of the kernel path in user space.

    It knows which connections are on the path (their socket in the sockhash), watches their
    sockets for hang-ups, and runs the backlog guard, which the verdict's doorbell wakes. The
    BPF object and its maps belong to the service's lifecycle (loaded for kernel mode, or
    borrowed from the supervisor), and are passed in while there.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        exceeded: Callable[[Watched, int, str], None],
    ) -> None:
        self.hangups = HangupWatcher(loop)
        self.guard = BacklogGuard(exceeded)
        self.sockets = 0  # connections whose socket is in the sockhash
        self._poked = asyncio.Event()  # the verdict rang: the guard should look

    def entered(self, conn: KernelConn, cookie: int) -> None:
        """conn's socket has just entered the sockhash: it is on the kernel path now."""
        conn.enter_kernel(cookie)
        self.sockets += 1
        self.guard.track(conn)
        conn.watch()

    def left(self, conn: KernelConn, maps: SocketMap | None) -> None:
        """conn is closing: its socket leaves the sockhash (when the maps are still there)."""
        self.sockets -= 1
        if maps is not None:
            with contextlib.suppress(KeyError, OSError):
                maps.remove(conn.sock, conn.cookie)

    def forget(self, conn: Watched) -> None:
        """conn closed."""
        self.guard.forget(conn)

    def ring(self, cookies: list[int]) -> None:
        """The verdict rang the bell for these sockets: the guard looks at them shortly."""
        self.guard.ring(cookies)
        self._poked.set()

    async def run(
        self,
        maps: Callable[[], ActiveSet | None],
        limits: Callable[[], tuple[int, int]],
        failed: Callable[[OSError], None],
    ) -> None:
        """The guard until cancelled: when it is due, and when the doorbell rings."""
        while True:
            current = maps()
            if current is None:  # user mode: nothing to guard until a poke or a switch
                wait = IDLE_CHECK
            else:  # never 0: the loop must always yield
                wait = max(self.guard.due() - time.monotonic(), MIN_STEP)
            if not self._poked.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._poked.wait()
            self._poked.clear()
            current = maps()
            if current is None:
                continue
            try:
                self.guard.check(current, *limits())
            except OSError as exc:  # a map call failed: the guard must go on regardless
                failed(exc)

    def close(self) -> None:
        """Stop watching (the service is done)."""
        self.hangups.close()
