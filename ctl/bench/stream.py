"""Byte-checked streams: pipelined ping-pong, random message sizes and the stream pattern.

Every connection carries one pseudo-random byte stream. Messages are consecutive pieces of it,
each of a size drawn from the -s range. What comes back is compared, byte for byte, with the
stream at its offset, so a lost, repeated, reordered or foreign byte is a mismatch that names
its offset. Two bounds keep the pipe from growing: at most `pipeline` messages and at most
`window` bytes in flight per connection. Ping-pong with `--pipeline N` and the stream pattern
differ only in those bounds.

The stream is a random pattern of PERIOD bytes, repeated, and each connection starts at a
random point in it. PERIOD is prime, so a repeated or lost segment goes unseen only if its
length is a multiple of PERIOD (about 1 MiB), which no segment or window size is.
"""

from __future__ import annotations

import collections
import random
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

PERIOD = 1_048_573  # prime, a little under 1 MiB
READ_SIZE = 256 * 1024
MAX_PIECE = 256 * 1024  # one send() at most; bigger messages go in several
BURST = 64  # sends per writable event, so that reading is never starved
POLL_S = 0.05
DRAIN_LIMIT_S = 120.0  # the drain also ends after this long, whatever the stall timeout
INTERRUPTED_DRAIN_S = 0.5  # after Ctrl-C, wait this long at most for the bytes in flight
NOTES_KEPT = 10  # mismatch offsets and stall details kept per worker


class ShortRead(Exception):
    """The peer closed the connection while bytes were still owed."""


class ExtraBytes(Exception):
    """The peer sent back more bytes than were sent to it."""


class Stalled(Exception):
    """Bytes were outstanding and none came back for the stall timeout."""


class Host(Protocol):
    """What the flow engine needs from its worker (worker.Worker)."""

    cfg: Any
    index: int
    socks: list[socket.socket]
    counters: Any
    measuring: bool
    stopped_ns: int
    notes: dict[str, list[dict[str, Any]]]
    live_bytes: Callable[[], tuple[int, int]] | None

    def next_check(self, now: int) -> int: ...
    def duties(self, now: int, lat: list[int], raw: list[int] | None) -> bool: ...
    def fold(self, lat: list[int], raw: list[int] | None) -> None: ...
    def count_failure(self, exc: BaseException) -> None: ...
    def count_mismatch(self) -> None: ...
    def interrupted(self) -> bool: ...


class Conn:
    """One connection's stream: offsets sent and received, and the messages in flight."""

    def __init__(self, sock: socket.socket, name: str, start: int, draw: Callable[[], int]) -> None:
        self.sock = sock
        self.name = name
        self.start = start  # where in the pattern this connection's stream begins
        self.draw = draw
        self.sent = 0
        self.received = 0
        self.msg_left = 0  # bytes of the message being sent that are not sent yet
        self.started = 0  # messages begun
        self.ends: collections.deque[tuple[int, int]] = collections.deque()  # (end offset, t0)
        self.last_progress = time.monotonic_ns()
        self.mark_sent = 0
        self.mark_received = 0
        self.events = 0

    def owed(self) -> int:
        """Bytes sent and not yet back."""
        return self.sent - self.received


class Flow:
    """Drive one worker's connections through epoll until the run ends, then drain them."""

    def __init__(self, host: Host) -> None:
        cfg = host.cfg
        self.host = host
        self.stream = cfg.pattern == "stream"
        self.pipeline = cfg.in_flight_messages()
        self.window = cfg.in_flight_bytes()
        self.rounds = cfg.rounds_limit()
        self.stall_ns = int(cfg.stall_timeout * 1e9)
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().getrandbits(64)
        rng = random.Random(seed * 1_000_003 + host.index)
        pattern = rng.randbytes(PERIOD)
        self.double = memoryview(pattern + pattern[: MAX_PIECE + READ_SIZE])
        self.conns: dict[int, Conn] = {}
        for i, sock in enumerate(host.socks):
            draw = cfg.sizes.drawer(random.Random(rng.getrandbits(64)))
            name = f"{host.index}.{i}"
            self.conns[sock.fileno()] = Conn(sock, name, rng.randrange(PERIOD), draw)
        self.ep = select.epoll()
        self.rbuf = bytearray(READ_SIZE)
        self.lat: list[int] = []
        self.verified = 0
        self.active = 0  # connections still sending or owed bytes
        self.draining = False
        host.live_bytes = self.live_bytes

    # -- the run

    def run(self) -> None:
        """Run until the duration, the rounds or a stop; then wait for every byte in flight."""
        host = self.host
        now = time.monotonic_ns
        for fd, c in self.conns.items():
            c.events = select.EPOLLIN | select.EPOLLOUT
            self.ep.register(fd, c.events)
        self.active = len(self.conns)
        check_at = 0
        running = True
        try:
            while running and self.active:
                t = now()
                if t >= check_at:
                    check_at = host.next_check(t)
                    was = host.measuring
                    running = host.duties(t, self.lat, None)
                    if host.measuring and not was:
                        self.verified = 0
                        for c in self.conns.values():
                            c.mark_sent, c.mark_received = c.sent, c.received
                    self.find_stalls(t)
                    if not running:
                        break
                timeout = min(POLL_S, max(0, check_at - t) / 1e9)
                for fd, ev in self.ep.poll(timeout):
                    conn = self.conns.get(fd)
                    if conn is not None:
                        self.serve(fd, conn, ev)
            host.stopped_ns = now()
            self.count_bytes()
            self.drain()
        finally:
            self.ep.close()
        host.fold(self.lat, None)
        host.counters.bytes_verified += self.verified

    def serve(self, fd: int, c: Conn, ev: int) -> None:
        """Handle one epoll event: read and check, send more, and update the wanted events."""
        try:
            if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self.read(c, self.lat)
                if fd not in self.conns:
                    return  # closed on a mismatch
            if ev & select.EPOLLOUT:
                self.fill(c)
            want = select.EPOLLIN | (select.EPOLLOUT if self.may_send(c) else 0)
            if not c.owed() and not self.may_send(c):
                want = 0  # finished its rounds: nothing more to send or receive
            if want != c.events:
                self.set_events(fd, c, want)
        except (OSError, ShortRead, ExtraBytes) as exc:
            self.host.count_failure(exc)
            self.close(fd)

    def set_events(self, fd: int, c: Conn, want: int) -> None:
        """Change what epoll watches on fd; no events at all means the connection is done."""
        if want and c.events:
            self.ep.modify(fd, want)
        elif want:
            self.ep.register(fd, want)
            self.active += 1
        else:
            self.ep.unregister(fd)
            self.active -= 1
        c.events = want

    # -- sending

    def may_send(self, c: Conn) -> bool:
        """Whether the bounds let this connection send more now."""
        if self.window and c.owed() >= self.window:
            return False
        return c.msg_left > 0 or (len(c.ends) < self.pipeline and c.started < self.rounds)

    def fill(self, c: Conn) -> None:
        """Send pieces of the stream until a bound, a full socket buffer or the burst limit."""
        send = c.sock.send
        now = time.monotonic_ns
        for _ in range(BURST):
            if c.msg_left == 0:
                if len(c.ends) >= self.pipeline or c.started >= self.rounds:
                    return
                size = c.draw()
                c.msg_left = size
                c.started += 1
                c.ends.append((c.sent + size, now()))
            want = min(c.msg_left, MAX_PIECE)
            if self.window:
                want = min(want, self.window - c.owed())
                if want <= 0:
                    return
            pos = (c.start + c.sent) % PERIOD
            try:
                n = send(self.double[pos : pos + want])
            except BlockingIOError:
                return
            c.sent += n
            c.msg_left -= n
            if n < want:
                return

    # -- receiving

    def read(self, c: Conn, lat: list[int]) -> None:
        """Read what is there (a few chunks at most, for fairness) and check it at its offset."""
        rbuf = self.rbuf
        for _ in range(4):
            try:
                n = c.sock.recv_into(rbuf)
            except BlockingIOError:
                return
            if n == 0:
                if c.owed():
                    raise ShortRead()
                raise ConnectionResetError("the peer closed the connection")
            if c.received + n > c.sent:
                raise ExtraBytes()
            pos = (c.start + c.received) % PERIOD
            if rbuf[:n] != self.double[pos : pos + n]:
                self.mismatch(c, n)
                return
            c.received += n
            self.verified += n
            t = c.last_progress = time.monotonic_ns()
            ends = c.ends
            while ends and ends[0][0] <= c.received:
                lat.append(t - ends.popleft()[1])

    def mismatch(self, c: Conn, n: int) -> None:
        """Note the first wrong byte's stream offset; the stream is lost, so close it."""
        pos = (c.start + c.received) % PERIOD
        got, expected = self.rbuf[:n], bytes(self.double[pos : pos + n])
        first = next(i for i in range(n) if got[i] != expected[i])
        self.note("mismatches", {"connection": c.name, "offset": c.received + first})
        self.host.count_mismatch()
        self.close(c.sock.fileno())

    # -- stalls, closing and the end

    def find_stalls(self, now: int) -> None:
        """Count and close every connection owed bytes that made no progress for the limit."""
        for fd, c in list(self.conns.items()):
            if c.owed() and now - c.last_progress > self.stall_ns:
                self.note(
                    "stalls",
                    {
                        "connection": c.name,
                        "sent": c.sent,
                        "received": c.received,
                        "idle_s": round((now - c.last_progress) / 1e9, 3),
                    },
                )
                self.host.count_failure(Stalled())
                self.close(fd)

    def note(self, kind: str, entry: dict[str, Any]) -> None:
        """Keep the first few details of a kind for the report."""
        kept = self.host.notes.setdefault(kind, [])
        if len(kept) < NOTES_KEPT:
            kept.append(entry)

    def close(self, fd: int) -> None:
        """Close a failed connection, keeping the bytes it moved while measured."""
        c = self.conns.pop(fd)
        self.count_conn_bytes(c)
        if c.events:
            self.set_events(fd, c, 0)
        c.sock.close()
        self.host.socks.remove(c.sock)

    def count_conn_bytes(self, c: Conn) -> None:
        """Add what this connection moved since the last mark to the measured byte counts."""
        if self.host.measuring and not self.draining:
            self.host.counters.bytes_sent += c.sent - c.mark_sent
            self.host.counters.bytes_received += c.received - c.mark_received
        c.mark_sent, c.mark_received = c.sent, c.received

    def live_bytes(self) -> tuple[int, int]:
        """Return the bytes sent and received while measured, counting open connections too."""
        c = self.host.counters
        sent = sum(x.sent - x.mark_sent for x in self.conns.values())
        received = sum(x.received - x.mark_received for x in self.conns.values())
        return c.bytes_sent + sent, c.bytes_received + received

    def count_bytes(self) -> None:
        """Close the measured window: later bytes are checked but not counted as moved."""
        for c in self.conns.values():
            self.count_conn_bytes(c)

    def drain(self) -> None:
        """Stop sending and wait for every byte in flight; a silent connection counts as stalled.

        Bytes read here were sent in the measured window, so mismatches and failures count;
        message latencies do not (the run has ended).
        """
        self.draining = True
        interrupted = self.host.interrupted()
        limit = INTERRUPTED_DRAIN_S if interrupted else DRAIN_LIMIT_S
        deadline = time.monotonic_ns() + int(limit * 1e9)
        for fd, c in list(self.conns.items()):
            want = select.EPOLLIN if c.owed() else 0
            if want != c.events:
                self.set_events(fd, c, want)
        ignored: list[int] = []
        while self.active:
            t = time.monotonic_ns()
            if t >= deadline:
                break
            self.find_stalls(t)
            for fd, _ in self.ep.poll(POLL_S):
                if fd not in self.conns:
                    continue
                c = self.conns[fd]
                try:
                    self.read(c, ignored)
                except (OSError, ShortRead, ExtraBytes) as exc:
                    self.host.count_failure(exc)
                    self.close(fd)
                    continue
                if fd in self.conns and not c.owed():
                    self.set_events(fd, c, 0)
            ignored.clear()
        for fd, c in list(self.conns.items()):
            if c.owed() and not interrupted:  # an interrupted run only stopped waiting
                self.host.count_failure(Stalled())
                self.close(fd)
