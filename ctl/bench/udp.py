"""The `bench --udp` worker loop: its flows' sends, receives and losses, paced or not.

Each flow is its own UDP socket, connected to the target, non-blocking, and watched by one
poll(2) set (not epoll: a socket in an epoll set wakes the set's callback for every datagram
queued to it). A pass of the loop sends what each flow may send (ping-pong: one datagram in
flight; flood: up to the window; -q: what the schedule says is due, up to the window), in
batches of up to 64 datagrams per call, then reads the flows that have echoes waiting, 64 per
call. Every
echo is checked and classified in udpflow.py; every few milliseconds the datagrams in flight
for longer than --udp-timeout are counted lost.

At the end (--duration reached, every flow's --rounds sent, or a signal) the loop stops
sending and waits for the datagrams in flight: each comes back, or counts as lost at its
timeout (after a signal, it waits at most 0.5 s).
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any, Protocol

from echoctl.bench.histogram import Histogram
from echoctl.bench.schedule import RateSchedule
from echoctl.bench.udpflow import Flow, Tally
from echoctl.bench.udpio import stages
from echoctl.bench.udpwire import HSIZE, VARIANTS, Payloads

SOCKET_BUFFER = 2 << 20  # SO_SNDBUF and SO_RCVBUF asked for (the kernel caps at *mem_max)
SCAN_MAX_NS = 50_000_000  # losses are looked for at least this often, and 10 times a timeout
BATCHES_PER_EVENT = 4  # receive calls per readable flow before the loop moves on
INTERRUPTED_DRAIN_NS = 500_000_000
SPIN_NS = 150_000  # a paced send due sooner than this is waited for without sleeping
FD_SETSIZE = 1024  # select(2) takes no higher fd
NOTES_KEPT = 10
LATENCIES_PER_S = 25_000  # a paced worker records about this many latencies a second at most
FLOOD_EVERY = 16


def latency_every(pattern: str, rate: float) -> int:
    """Return k: the latency of one datagram in k (by sequence number) is recorded.

    Recording one costs more than sending and checking it; one in k, chosen by sequence
    number, has the distribution of them all. Ping-pong records every datagram; a paced worker
    every one up to 25,000/s, then one in k; a flood one in 16.
    """
    if rate:
        return max(1, round(rate / LATENCIES_PER_S))
    return FLOOD_EVERY if pattern == "flood" else 1


class UdpHost(Protocol):
    """What the UDP loop needs from its worker (worker.Worker)."""

    cfg: Any
    index: int
    rate: float
    start_ns: int
    socks: list[socket.socket]
    counters: Any
    hist: Histogram
    raw_hist: Histogram
    measuring: bool
    stopped_ns: int
    warmup_errors: int
    notes: dict[str, list[dict[str, Any]]]

    def next_check(self, now: int) -> int: ...
    def duties(self, now: int, lat: list[int], raw: list[int] | None) -> bool: ...
    def count_failure(self, exc: BaseException) -> None: ...
    def interrupted(self) -> bool: ...


def udp_socket(family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    """Return a non-blocking UDP socket connected to the target: one flow."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.connect(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Engine:
    """One worker's flows and the loop that drives them."""

    def __init__(self, w: UdpHost) -> None:
        cfg = w.cfg
        self.w = w
        seed = None if cfg.seed is None else cfg.seed * 4096 + w.index
        self.pay = pay = Payloads(cfg.size, seed)
        self.tally = Tally(measuring=w.measuring)
        self.tx, self.rx, self.io = stages(HSIZE, pay.psize, pay.variants)
        self.txv = memoryview(self.tx.headers)
        self.txq = self.txv.cast("Q")
        self.rxq = memoryview(self.rx.headers).cast("Q")
        window, paced = cfg.udp_window(), bool(w.rate)
        every = latency_every(cfg.pattern, w.rate)
        self.live = [
            (Flow((w.index << 16) | i, pay, window, self.tally, paced, every), sock)
            for i, sock in enumerate(w.socks)
        ]
        self.flows = [f for f, _ in self.live]  # failed ones too: their losses count
        self.byfd = {sock.fileno(): (f, sock) for f, sock in self.live}
        self.poller = select.poll()
        for fd in self.byfd:
            self.poller.register(fd, select.POLLIN)
        self.selectable = max(self.byfd, default=0) < FD_SETSIZE
        self.timeout_ns = int(cfg.udp_timeout * 1e9)
        self.scan_ns = max(1_000_000, min(SCAN_MAX_NS, self.timeout_ns // 10))
        self.limit = cfg.rounds_limit()  # datagrams per flow
        self.by_time = cfg.duration is not None
        self.sent = 0  # since the last flush
        self.sched: RateSchedule | None = None
        self.paced_n = 0  # datagrams sent on the schedule so far
        self.rr = 0
        if paced:
            self.sched = RateSchedule(w.rate)
            self.sched.start(w.start_ns)

    # -- the loop

    def run(self) -> None:
        """Run until the end of the load, then wait for what is in flight; fill in the figures."""
        w, clock = self.w, time.monotonic_ns
        now = clock()
        check_at, scan_at = w.next_check(now), now + self.scan_ns
        stop_at = drain_end = 0
        while self.live:
            now = clock()
            if now >= scan_at:
                self.expire(now)
                scan_at = now + self.scan_ns
            if not stop_at and now >= check_at:
                check_at = w.next_check(now)
                if not self.duties(now):
                    stop_at = now
            wake = min(check_at, scan_at)
            if not stop_at:
                wake = min(wake, self.send(now))
                if self.all_sent():
                    stop_at = now
            if stop_at:
                if not drain_end:
                    linger = self.timeout_ns + 2 * self.scan_ns
                    if w.interrupted():
                        linger = min(linger, INTERRUPTED_DRAIN_NS)
                    drain_end = stop_at + linger
                if now >= drain_end or not any(f.outstanding for f, _ in self.live):
                    break
                wake = min(scan_at, drain_end)
            for fd in self.wait(wake - clock()):
                self.receive(fd)
        for f in self.flows:
            f.lose_all()  # in flight still: past the drain's end, or after a signal
        w.stopped_ns = max(stop_at or clock(), self.tally.last_echo)
        self.flush()
        w.notes["udp_io"] = [{"calls": self.io}]

    def wait(self, gap: int) -> list[int]:
        """Wait up to `gap` ns (less SPIN_NS) for echoes; return the fds that have some.

        poll(2) counts in milliseconds; a shorter wait, as between paced sends, goes through
        select(2), which counts in microseconds, rather than spinning.
        """
        if gap <= SPIN_NS:
            return [fd for fd, _ in self.poller.poll(0)]
        if gap >= 1_000_000 + SPIN_NS or not self.selectable:
            return [fd for fd, _ in self.poller.poll((gap - SPIN_NS) // 1_000_000)]
        return select.select(list(self.byfd), [], [], (gap - SPIN_NS) / 1e9)[0]

    def all_sent(self) -> bool:
        """Whether every flow has sent its --rounds (a run by duration never has)."""
        if self.by_time:
            return False
        if self.sched is not None:
            return self.paced_n >= self.limit * len(self.live)
        return all(f.nxt >= self.limit for f, _ in self.live)

    def duties(self, now: int) -> bool:
        """Flush the figures and do the worker's duties; start counting when measuring starts."""
        w, t = self.w, self.tally
        self.flush()
        going = w.duties(now, [], None)
        if w.measuring and not t.measuring:
            t.measuring = True
            for f in self.flows:
                f.start_measuring()
        return going

    def flush(self) -> None:
        """Move the counts and latencies gathered since the last flush into the worker's."""
        w, t = self.w, self.tally
        if t.measuring and w.measuring:
            c = w.counters
            c.requests += t.echoed
            c.datagrams_sent += self.sent
            c.lost += t.lost
            c.late += t.late
            c.duplicates += t.duplicates
            c.mismatches += t.mismatches
            c.reordered += t.reordered
            w.hist.record_many(t.lat)
            w.raw_hist.record_many(t.raw)
        w.warmup_errors += t.warmup_errors
        t.echoed = t.lost = t.late = t.duplicates = t.mismatches = t.reordered = 0
        t.warmup_errors = self.sent = 0
        t.lat.clear()
        t.raw.clear()

    # -- sending

    def send(self, now: int) -> int:
        """Send what may go now; return when the loop should look again (now: at once)."""
        if self.sched is not None:
            return self.send_due(now)
        tx, txq, txv, limit = self.tx, self.txq, self.txv, self.limit
        wake = 1 << 62  # nothing more to send until echoes come back
        failed = []
        for f, sock in self.live:
            room = min(f.room(), limit - f.nxt)
            while room > 0:
                n = room if room < VARIANTS else VARIANTS
                j = f.stage(txq, now, n)
                try:
                    sent = tx.send(sock, j, n)
                except OSError as exc:
                    failed.append((f, sock, exc))
                    break
                if sent:
                    f.commit(txv, j, sent, None)
                    self.sent += sent
                if sent < n:  # the socket's buffer is full: try again on the next pass
                    wake = now
                    break
                room -= sent
        for failure in failed:
            self.fail(*failure)
        return wake

    def send_due(self, now: int) -> int:
        """Paced: send the datagrams due by now, round the flows, each up to its window."""
        sched = self.sched
        assert sched is not None
        total = self.limit * len(self.live)
        due = min(sched.due(now), total) - self.paced_n
        start, per = sched.start_ns, 1e9 / sched.rate
        tx, txq, txv, live = self.tx, self.txq, self.txv, self.live
        idle = 0  # flows in a row that could send nothing
        failed = []
        while due > 0 and idle < len(live):
            f, sock = live[self.rr % len(live)]
            self.rr += 1
            n = min(f.room(), due, VARIANTS)
            if n <= 0:
                idle += 1
                continue
            j = f.stage(txq, now, n)
            a = self.paced_n
            try:
                sent = tx.send(sock, j, n)
            except OSError as exc:
                failed.append((f, sock, exc))
                break
            if sent:
                due_at = [start + int((a + k) * per) for k in f.sampled(sent)]
                f.commit(txv, j, sent, due_at)
                self.sent += sent
                self.paced_n += sent
                due -= sent
            idle = 0 if sent == n else idle + 1
        for failure in failed:
            self.fail(*failure)
        if due > 0 or self.paced_n >= total:
            return 1 << 62  # behind (every window full) or done: echoes or losses come first
        return sched.intended(self.paced_n)

    # -- receiving and losses

    def receive(self, fd: int) -> None:
        """Read and check the echoes waiting on one flow."""
        entry = self.byfd.get(fd)
        if entry is None:
            return
        f, sock = entry
        rx, rxq, clock = self.rx, self.rxq, time.monotonic_ns
        for _ in range(BATCHES_PER_EVENT):
            try:
                n = rx.recv(sock, rx.slots)
            except OSError as exc:
                self.fail(f, sock, exc)
                return
            if not n:
                return
            f.receive(rx.headers, rxq, rx.payloads, rx.lengths(n), clock())
            if n < rx.slots:
                return

    def expire(self, now: int) -> None:
        """Count as lost what has been in flight longer than the timeout."""
        cut = now - self.timeout_ns
        for f in self.flows:
            if f.outstanding:
                f.expire(cut)

    def fail(self, f: Flow, sock: socket.socket, exc: OSError) -> None:
        """A flow's socket failed (ECONNREFUSED: nothing listens): count it, drop the flow."""
        if (f, sock) not in self.live:
            return
        self.w.count_failure(exc)
        notes = self.w.notes.setdefault("udp_errors", [])
        if len(notes) < NOTES_KEPT:
            notes.append({"flow": f.fid, "error": exc.strerror or str(exc)})
        f.lose_all()
        self.live.remove((f, sock))
        del self.byfd[sock.fileno()]
        self.poller.unregister(sock)
        self.w.socks.remove(sock)
        sock.close()


def run_udp(w: UdpHost) -> None:
    """The worker's whole run with --udp."""
    Engine(w).run()
