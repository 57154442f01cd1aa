"""Load generator engine: worker processes that drive echo connections and measure them.

Each worker process owns a share of the connections and drives them from one thread:
plain ping-pong (one size, one message in flight) sends one message on every connection, then
reads every echo; pipelined ping-pong, random sizes and the stream pattern run byte-checked
streams through epoll (echoctl.flow). Workers fold latencies into a log-linear histogram and
send their figures to the parent, which merges them into one report.
"""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
import os
import queue
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from echoctl.client import ControlClient
from echoctl.flow import Flow, ShortRead, Stalled
from echoctl.histogram import Histogram
from echoctl.interrupt import Interrupt
from echoctl.progress import Progress, ProgressFn, Sample
from echoctl.sizes import SizeRange
from echoctl.sysstat import cpu_count, machine_cpu, own_cpu

PATTERNS = ("pingpong", "stream")
PAYLOADS_PER_CONN = 4  # rotated each round; a power of two so rotation is a mask
MAX_RUN_S = 3600.0  # a run by rounds still stops after this long
FOLD_AT = 8192  # latencies kept in a plain list before they are folded into the histogram
CHECK_NS = 100_000_000  # how often the hot loop looks at the clock-driven duties
PROGRESS_NS = 1_000_000_000
STREAM_WINDOW = 1 << 20  # default bytes in flight per stream connection
STREAM_WINDOW_MSGS = 512  # and at most this many messages: each small send is its own skb
PACED_PER_WORKER = 25_000  # requests/s one paced worker is given by default
SPIN_NS = 150_000  # the scheduler spins for the last 150 µs: sleep() here wakes ~100 µs late


class BenchError(Exception):
    """The run could not be done (server unreachable, workers failed); the message is one line."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the target, the load shape and its bounds."""

    host: str = "127.0.0.1"
    port: int = 8888
    connections: int = 10
    rounds: int = 10_000
    size: int = 64
    size_max: int = 0  # 0: every message is `size` bytes; else drawn from size..size_max
    qps: float = 0.0
    duration: float | None = None
    warmup: float = 0.0
    workers: int = 0  # 0: one per CPU, never more than connections
    pattern: str = "pingpong"
    timeout: float = 5.0
    progress: bool = False
    pipeline: int = 0  # messages in flight per connection; 0: 1 for ping-pong, 512 for stream
    window: int = 0  # bytes in flight per connection; 0: no bound for ping-pong, 1 MiB stream
    stall_timeout: float = 10.0
    seed: int | None = None  # makes message sizes and stream bytes repeatable

    @property
    def sizes(self) -> SizeRange:
        """Return the message sizes as a range (one size when size_max is 0)."""
        return SizeRange(self.size, self.size_max or self.size)

    def uses_flow(self) -> bool:
        """Whether the run needs byte-checked streams rather than plain blocking ping-pong."""
        return (
            self.pattern == "stream" or self.pipeline > 1 or self.window > 0 or not self.sizes.fixed
        )

    def in_flight_messages(self) -> int:
        """Return the bound on messages in flight per connection."""
        if self.pipeline:
            return self.pipeline
        return STREAM_WINDOW_MSGS if self.pattern == "stream" else 1

    def in_flight_bytes(self) -> int:
        """Return the bound on bytes in flight per connection; 0 means none."""
        if self.window:
            return self.window
        return STREAM_WINDOW if self.pattern == "stream" else 0

    def validate(self) -> None:
        """Raise ValueError when the configuration makes no sense."""
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}")
        if self.connections < 1 or self.rounds < 1 or self.size < 1:
            raise ValueError("connections, rounds and size must be at least 1")
        if self.qps < 0 or self.warmup < 0 or self.workers < 0 or self.timeout <= 0:
            raise ValueError("qps, warmup and workers must be >= 0 and timeout > 0")
        if self.duration is not None and not 0 < self.duration <= MAX_RUN_S:
            raise ValueError(f"duration must be in (0, {MAX_RUN_S:g}] seconds")
        if self.qps and self.pattern == "stream":
            raise ValueError("--qps applies to ping-pong only; stream keeps the pipe full")
        self.sizes  # noqa: B018 - validates the range
        if self.qps and self.uses_flow():
            raise ValueError("--qps needs one size, --pipeline 1 and no --window")
        if self.pipeline < 0 or self.window < 0 or not self.stall_timeout > 0:
            raise ValueError("pipeline and window must be >= 0 and stall-timeout > 0")
        if self.warmup and self.duration is None:
            # A run by rounds would spend its rounds in the warm-up and measure nothing.
            raise ValueError("--warmup needs --duration")

    def rounds_limit(self) -> int:
        """Return the rounds per connection; a run by duration is bounded by time only."""
        return self.rounds if self.duration is None else 1 << 62

    def worker_count(self) -> int:
        """Return how many worker processes this run uses."""
        wanted = self.workers or cpu_count()
        if self.qps and not self.workers:
            # Paced workers sleep and spin to hit send times; two of them spinning on a small
            # machine delay each other's sends, so use no more workers than the rate needs.
            wanted = min(wanted, -(-int(self.qps) // PACED_PER_WORKER))
        return max(1, min(wanted, self.connections))


class RateSchedule:
    """Fixed send schedule: request n is due at start + n/rate, whatever happened before.

    Latency measured from `intended(n)` rather than from the actual send includes the time a
    request waited behind a slow one (coordinated-omission correction, as in wrk2). The clock
    and sleep are injectable so tests can drive the schedule with a fake clock.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], None] = time.sleep,
        spin_ns: int = SPIN_NS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.spin_ns = spin_ns
        self.start_ns = 0
        self._period_ns = 1e9 / rate

    def start(self, start_ns: int | None = None) -> None:
        """Anchor request 0 at `start_ns` (default: now)."""
        self.start_ns = self.clock() if start_ns is None else start_ns

    def intended(self, n: int) -> int:
        """Return the time (ns) request `n` should be sent."""
        return self.start_ns + int(n * self._period_ns)

    def due(self, now_ns: int) -> int:
        """Return how many requests are due by `now_ns` (the count of n with intended(n) <= now)."""
        if now_ns < self.start_ns:
            return 0
        n = int((now_ns - self.start_ns) / self._period_ns) + 1
        # Float rounding may put the boundary one off; intended() is the reference.
        while n > 0 and self.intended(n - 1) > now_ns:
            n -= 1
        while self.intended(n) <= now_ns:
            n += 1
        return n

    def wait_until(self, when_ns: int) -> int:
        """Sleep, then spin briefly, until `when_ns`; return the clock reading at wake-up."""
        now = self.clock()
        gap = when_ns - now
        if gap > self.spin_ns:
            self.sleep((gap - self.spin_ns) / 1e9)
            now = self.clock()
        while now < when_ns:
            now = self.clock()
        return now


def resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """Resolve host:port to (family, sockaddr); any address, as a load generator must."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# ---------------------------------------------------------------------------------------------
# Worker side


class _Orphaned(Exception):
    """The parent process is gone: nobody will read the figures, so the worker stops."""


@dataclass
class _Counters:
    requests: int = 0
    mismatches: int = 0
    short_reads: int = 0
    resets: int = 0
    timeouts: int = 0
    other_errors: int = 0
    stalled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_verified: int = 0


def _stalled_if_timed_out(exc: BaseException) -> BaseException:
    """A receive that timed out (SO_RCVTIMEO, the stall timeout) is a stalled connection."""
    return Stalled() if isinstance(exc, BlockingIOError) else exc


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def _connect(
    family: int, sockaddr: tuple[Any, ...], cfg: BenchConfig, blocking: bool
) -> socket.socket:
    timeout = cfg.timeout
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if blocking:
            # No Python-level timeout: CPython would poll() before every send and recv. The
            # kernel's SO_RCVTIMEO/SO_SNDTIMEO bound each call instead, at no extra syscall;
            # an expired one surfaces as BlockingIOError. A receive waits for the stall timeout.
            sock.settimeout(None)
            stall = _timeval(cfg.stall_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        else:
            sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    """One worker process's connections, counters and histograms."""

    def __init__(self, cfg: BenchConfig, index: int, nconns: int, rate: float, out: Any) -> None:
        self.cfg = cfg
        self.index = index
        self.nconns = nconns
        self.rate = rate
        self.out = out
        self.socks: list[socket.socket] = []
        self.counters = _Counters()
        self.hist = Histogram()
        self.raw_hist = Histogram()
        self.connect_hist = Histogram()
        self.start_ns = 0
        self.measure_ns = 0
        self.end_ns = 0
        self.measuring = False
        self.stopped_ns = 0
        self.next_progress = 0
        self.stop_flag: Any = None
        self.cpu_start = own_cpu()
        self.parent_pid = os.getppid()
        self.warmup_errors = 0  # failures and mismatches before measuring; kept across the switch
        self.alive = 0  # connections still open when the run ended
        self.notes: dict[str, list[dict[str, Any]]] = {}  # mismatch offsets, stall details
        self.live_bytes: Callable[[], tuple[int, int]] | None = None  # set by a byte stream

    # -- setup

    def connect_all(self, family: int, sockaddr: tuple[Any, ...]) -> None:
        """Open this worker's connections, timing each connect."""
        blocking = not self.cfg.uses_flow()
        times = []
        for _ in range(self.nconns):
            t0 = time.monotonic_ns()
            self.socks.append(_connect(family, sockaddr, self.cfg, blocking))
            times.append(time.monotonic_ns() - t0)
        self.connect_hist.record_many(times)

    def close_all(self) -> None:
        """Close every connection."""
        for sock in self.socks:
            sock.close()
        self.socks.clear()

    # -- shared bookkeeping

    def begin(self, start_ns: int, stop_flag: Any) -> None:
        """Set the common clock anchors; the run measures from start + warmup."""
        self.start_ns = start_ns
        self.measure_ns = start_ns + int(self.cfg.warmup * 1e9)
        length = self.cfg.duration if self.cfg.duration is not None else MAX_RUN_S
        self.end_ns = self.measure_ns + int(length * 1e9)
        self.measuring = self.cfg.warmup == 0
        self.next_progress = self.measure_ns + PROGRESS_NS
        self.stop_flag = stop_flag
        self.cpu_start = own_cpu()

    def start_measuring(self, now: int) -> None:
        """Drop what the warm-up collected and measure from `now`, the moment of the switch."""
        self.counters = _Counters()
        self.hist.reset()
        self.raw_hist.reset()
        self.measuring = True
        # Elapsed time, CPU and stream byte marks all start here, so that nothing done between
        # the planned start and this check is dropped from the counts but kept in the time.
        self.measure_ns = now
        length = self.cfg.duration if self.cfg.duration is not None else MAX_RUN_S
        self.end_ns = now + int(length * 1e9)
        self.next_progress = now + PROGRESS_NS
        self.cpu_start = own_cpu()

    def next_check(self, now: int) -> int:
        """Return when the hot loop should next call duties(): at the switch, if that is sooner."""
        if not self.measuring:
            return min(now + CHECK_NS, self.measure_ns)
        return now + CHECK_NS

    def duties(self, now: int, lat: list[int], raw: list[int] | None) -> bool:
        """Do the clock-driven chores; return False when the run must end."""
        if os.getppid() != self.parent_pid:
            raise _Orphaned()
        if not self.measuring:
            lat.clear()
            if raw is not None:
                raw.clear()
            if now >= self.measure_ns:
                self.start_measuring(now)
            return not self.stop_flag.value
        self.fold(lat, raw)
        if self.cfg.progress and now >= self.next_progress:
            self.next_progress += PROGRESS_NS
            self.report_progress((self.next_progress - self.measure_ns) // PROGRESS_NS - 1)
        return now < self.end_ns and not self.stop_flag.value

    def interrupted(self) -> bool:
        """Whether the parent asked every worker to stop early."""
        return bool(self.stop_flag.value)

    def report_progress(self, tick: int) -> None:
        """Send the running totals at `tick` whole intervals since measuring began."""
        c = self.counters
        if self.live_bytes is not None:
            sent, received = self.live_bytes()
        else:
            sent = received = c.requests * self.cfg.size
        failed = c.short_reads + c.resets + c.timeouts + c.other_errors + c.stalled + c.mismatches
        sample = Sample(tick, c.requests, sent, received, failed, self.hist.to_sparse())
        self.out.put(("progress", self.index, sample))

    def fold(self, lat: list[int], raw: list[int] | None) -> None:
        """Move collected latencies into the histograms."""
        if not self.measuring:
            lat.clear()
            return
        self.counters.requests += len(lat)
        self.hist.record_many(lat)
        lat.clear()
        if raw is not None:
            self.raw_hist.record_many(raw)
            raw.clear()

    def result(self, elapsed_ns: int) -> dict[str, Any]:
        """Return this worker's figures for the parent."""
        cpu = own_cpu().minus(self.cpu_start)
        return {
            **asdict(self.counters),
            "elapsed_ns": elapsed_ns,
            "hist": self.hist.to_sparse(),
            "raw_hist": self.raw_hist.to_sparse() if self.rate else None,
            "cpu_user_s": cpu.user_s,
            "cpu_system_s": cpu.system_s,
            "warmup_errors": self.warmup_errors,
            "connections_alive": self.alive,
            "notes": self.notes,
        }

    def count_failure(self, exc: BaseException) -> None:
        """Classify a failed connection; it is dropped, never retried silently."""
        if not self.measuring:
            self.warmup_errors += 1
            return
        c = self.counters
        if isinstance(exc, ShortRead):
            c.short_reads += 1
        elif isinstance(exc, Stalled):
            c.stalled += 1
        elif isinstance(exc, BlockingIOError | TimeoutError):
            c.timeouts += 1
        elif isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            c.resets += 1
        else:
            c.other_errors += 1

    def count_mismatch(self) -> None:
        """Count an echo that differs from what was sent."""
        if self.measuring:
            self.counters.mismatches += 1
        else:
            self.warmup_errors += 1

    # -- ping-pong

    def payloads(self) -> list[bytes]:
        """Return one connection's payloads: random, and consecutive ones always differ."""
        size = self.cfg.size
        first = os.urandom(1)[0]
        # Random bytes alone may repeat (one byte in 256 at -s 1); a distinct first byte per
        # payload makes every round's echo tell the previous round's apart.
        return [
            bytes([(first + k) & 0xFF]) + os.urandom(size - 1) for k in range(PAYLOADS_PER_CONN)
        ]

    def finish_recv(self, sock: socket.socket, buf: bytearray, got: int, expect: bytes) -> None:
        """Complete a short first read, then compare; raises on EOF or socket errors."""
        size = len(expect)
        view = memoryview(buf)
        while got < size:
            if got < 0:
                got = 0
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ShortRead()
            got += n
        if buf != expect:
            self.count_mismatch()

    def careful_recv(self, i: int, buf: bytearray, expect: bytes, dead: set[int]) -> int | None:
        """Receive one echo on connection i outside the hot loop; return the time or None."""
        try:
            self.finish_recv(self.socks[i], buf, 0, expect)
        except (OSError, ShortRead) as exc:
            self.count_failure(_stalled_if_timed_out(exc))
            dead.add(i)
            return None
        return time.monotonic_ns()

    def drop(self, dead: set[int], *parallel: list[Any]) -> None:
        """Close and forget the connections that failed, with their entries in `parallel`."""
        for i in sorted(dead, reverse=True):
            self.socks.pop(i).close()
            for items in parallel:
                items.pop(i)

    def run_pingpong(self) -> None:
        """Ping-pong at full speed: a round sends on every connection, then reads every echo."""
        size = self.cfg.size
        rounds = self.cfg.rounds_limit()
        now = time.monotonic_ns
        buf = bytearray(size)
        lat: list[int] = []
        mask = PAYLOADS_PER_CONN - 1
        mine = [self.payloads() for _ in self.socks]
        r = 0
        while self.socks and r < rounds:
            socks = self.socks
            # sendall: a blocking send may still return short when SO_SNDTIMEO expires mid-way.
            sends = [s.sendall for s in socks]
            recvs = [s.recv_into for s in socks]
            table = [[p[k] for p in mine] for k in range(PAYLOADS_PER_CONN)]
            idx = range(len(socks))
            t_send = [0] * len(socks)
            check_at = now()
            dead: set[int] = set()
            while r < rounds:
                cur = table[r & mask]
                r += 1
                i = 0
                try:
                    for i in idx:
                        t_send[i] = now()
                        sends[i](cur[i])
                except OSError as exc:
                    self.count_failure(exc)
                    dead.add(i)
                    for j in range(i):
                        t = self.careful_recv(j, buf, cur[j], dead)
                        if t is not None:
                            lat.append(t - t_send[j])
                    break
                try:
                    for i in idx:
                        n = recvs[i](buf)
                        if n != size or buf != cur[i]:
                            self.finish_recv(socks[i], buf, n, cur[i])
                        lat.append(now() - t_send[i])
                except (OSError, ShortRead) as exc:
                    self.count_failure(_stalled_if_timed_out(exc))
                    dead.add(i)
                    for j in range(i + 1, len(socks)):
                        t = self.careful_recv(j, buf, cur[j], dead)
                        if t is not None:
                            lat.append(t - t_send[j])
                    break
                if len(lat) >= FOLD_AT:
                    self.fold(lat, None)
                t = now()
                if t >= check_at:
                    check_at = self.next_check(t)
                    if not self.duties(t, lat, None):
                        r = rounds
            if dead:
                self.drop(dead, mine)
                self.fold(lat, None)
                if not self.duties(now(), lat, None):
                    break
        self.stopped_ns = now()
        self.fold(lat, None)

    def run_paced(self) -> None:
        """Ping-pong on a fixed schedule (-q): sends what is due, up to one per connection."""
        sched = RateSchedule(self.rate)
        sched.start(self.start_ns)
        size = self.cfg.size
        now = time.monotonic_ns
        buf = bytearray(size)
        lat: list[int] = []
        raw: list[int] = []
        mask = PAYLOADS_PER_CONN - 1
        mine = [self.payloads() for _ in self.socks]
        turn = [0] * len(self.socks)  # requests sent so far on each connection: its rotation
        limit = self.cfg.rounds_limit() * len(self.socks)
        n = 0
        check_at = 0
        while self.socks and n < limit:
            t = now()
            if t >= check_at:
                check_at = self.next_check(t)
                if not self.duties(t, lat, raw):
                    break
            k = len(self.socks)
            due = min(sched.due(t) - n, k, limit - n)
            if due <= 0:
                sched.wait_until(min(sched.intended(n), check_at))
                continue
            sent: list[tuple[int, bytes, int, int]] = []
            dead: set[int] = set()
            for j in range(due):
                c = (n + j) % k
                # Chosen per request: a batch may wrap round to a connection it already served.
                payload = mine[c][turn[c] & mask]
                turn[c] += 1
                t_send = now()
                try:
                    self.socks[c].sendall(payload)
                except OSError as exc:
                    self.count_failure(exc)
                    dead.add(c)
                    continue
                sent.append((c, payload, sched.intended(n + j), t_send))
            for c, payload, intended, t_send in sent:
                done = self.careful_recv(c, buf, payload, dead)
                if done is not None:
                    lat.append(done - intended)
                    raw.append(done - t_send)
            n += due
            if len(lat) >= FOLD_AT:
                self.fold(lat, raw)
            if dead:
                self.drop(dead, mine, turn)
        self.stopped_ns = now()
        self.fold(lat, raw)


def _worker_main(
    cfg: BenchConfig,
    index: int,
    nconns: int,
    rate: float,
    family: int,
    sockaddr: tuple[Any, ...],
    out: Any,
    go: Any,
    start_ns: Any,
    stop_flag: Any,
) -> None:
    """Entry point of a worker process: connect, report ready, run, report figures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and sets stop_flag
    # The parent's handler (inherited through fork) would unwind the parent's code here.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker = _Worker(cfg, index, nconns, rate, out)
    try:
        worker.connect_all(family, sockaddr)
    except OSError as exc:
        worker.close_all()
        out.put(("error", index, f"cannot connect to {cfg.host}:{cfg.port}: {exc.strerror or exc}"))
        return
    out.put(("ready", index, worker.connect_hist.to_sparse()))
    if not _await_go(go, cfg.timeout + 30, worker.parent_pid) or stop_flag.value:
        worker.close_all()
        out.cancel_join_thread()  # the parent may be gone: never block exit on the queue
        return
    worker.begin(start_ns.value, stop_flag)
    wait = worker.start_ns - time.monotonic_ns()
    if wait > 0:
        time.sleep(wait / 1e9)
    try:
        if cfg.uses_flow():
            Flow(worker).run()
        elif rate:
            worker.run_paced()
        else:
            worker.run_pingpong()
    except _Orphaned:
        worker.close_all()
        out.cancel_join_thread()
        return
    except Exception as exc:  # report, don't die silently: the parent turns it into BenchError
        out.put(("error", index, f"worker {index} failed: {exc!r}"))
        worker.close_all()
        return
    elapsed = (worker.stopped_ns or time.monotonic_ns()) - worker.measure_ns
    worker.alive = len(worker.socks)
    worker.close_all()
    out.put(("done", index, worker.result(max(elapsed, 1))))


def _await_go(go: Any, timeout: float, parent_pid: int) -> bool:
    """Wait for the start signal; False on timeout or when the parent has died meanwhile."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if go.wait(min(left, 0.5)):
            return True
        if os.getppid() != parent_pid:
            return False
    return False


# ---------------------------------------------------------------------------------------------
# Parent side


ServerProbe = Callable[[], dict[str, Any]]


@dataclass
class _Collected:
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    connect: Histogram = field(default_factory=Histogram)


def split(total: int, parts: int) -> list[int]:
    """Split `total` connections into `parts` near-equal shares."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_bench(
    cfg: BenchConfig,
    progress: ProgressFn | None = None,
    server_probe: ServerProbe | None = None,
    interrupt: Interrupt | None = None,
) -> dict[str, Any]:
    """Run one benchmark and return the report (the `--json` object).

    With `interrupt`, a signal once measuring has begun stops the workers and the report covers
    what was measured until then, with `interrupted` naming the signal.
    """
    cfg.validate()
    family, sockaddr = resolve(cfg.host, cfg.port)
    nworkers = cfg.worker_count()
    shares = split(cfg.connections, nworkers)
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks for `python -c` and
    # for scripts without a main guard. Workers touch nothing that another thread could hold.
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    go = ctx.Event()
    start_ns = ctx.RawValue("q", 0)
    stop_flag = ctx.RawValue("b", 0)
    procs = []
    for i, share in enumerate(shares):
        rate = cfg.qps * share / cfg.connections if cfg.qps else 0.0
        args = (cfg, i, share, rate, family, sockaddr, out, go, start_ns, stop_flag)
        procs.append(ctx.Process(target=_worker_main, args=args, daemon=True, name=f"bench-{i}"))
    for p in procs:
        p.start()
    got = _Collected()
    lines = (
        Progress(nworkers, PROGRESS_NS / 1e9, cfg.pattern == "stream", progress)
        if progress
        else None
    )
    try:
        _await_ready(cfg, out, procs, got)
        server_before = server_probe() if server_probe else None
        start_ns.value = time.monotonic_ns() + 20_000_000
        measure_ns = start_ns.value + int(cfg.warmup * 1e9)
        go.set()
        if interrupt is not None:
            interrupt.graceful(lambda: setattr(stop_flag, "value", 1))
        _sleep_until(measure_ns, stop_flag)
        machine_before = machine_cpu()
        if server_probe and cfg.warmup:
            server_before = server_probe()
        _await_done(cfg, out, procs, got, lines)
        machine_after = machine_cpu()
        server_after = server_probe() if server_probe else None
    except BaseException:
        stop_flag.value = 1
        go.set()
        _reap(procs)
        raise
    _reap(procs)
    report = _report(cfg, got, nworkers)
    report["cpu"]["machine"] = {
        **machine_after.minus(machine_before).report(),
        "cpus": cpu_count(),
    }
    if server_probe:
        report["server"] = server_delta(server_before, server_after)
    if interrupt is not None and interrupt.name:
        report["interrupted"] = interrupt.name
    return report


def _sleep_until(when_ns: int, stop_flag: Any) -> None:
    while not stop_flag.value and (gap := when_ns - time.monotonic_ns()) > 0:
        time.sleep(min(gap / 1e9, 0.1))


def _reap(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _await_ready(cfg: BenchConfig, out: Any, procs: list[Any], got: _Collected) -> None:
    ready = 0
    deadline = time.monotonic() + cfg.timeout * max(1, cfg.connections // 100) + 30
    while ready < len(procs):
        kind, index, payload = _get(out, deadline, procs)
        if kind == "error":
            raise BenchError(payload)
        if kind == "ready":
            got.connect.merge_sparse(payload)
            ready += 1


def _await_done(
    cfg: BenchConfig, out: Any, procs: list[Any], got: _Collected, lines: Progress | None
) -> None:
    length = cfg.duration if cfg.duration is not None else MAX_RUN_S
    deadline = time.monotonic() + cfg.warmup + length + cfg.timeout + cfg.stall_timeout + 150
    while len(got.results) < len(procs):
        kind, index, *payload = _get(out, deadline, procs)
        if kind == "error":
            raise BenchError(payload[0])
        if kind == "done":
            got.results[index] = payload[0]
        elif kind == "progress" and lines is not None:
            lines.add(index, payload[0])


def _get(out: Any, deadline: float, procs: list[Any]) -> tuple[Any, ...]:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("bench workers did not finish in time")
        try:
            return tuple(out.get(timeout=min(left, 1.0)))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                message = f"bench worker {dead[0].name} died (exit {dead[0].exitcode})"
                raise BenchError(message) from None


def _report(cfg: BenchConfig, got: _Collected, nworkers: int) -> dict[str, Any]:
    results = list(got.results.values())
    hist, raw = Histogram(), Histogram()
    totals = {k: sum(r[k] for r in results) for k in asdict(_Counters())}
    for r in results:
        hist.merge_sparse(r["hist"])
        if r["raw_hist"]:
            raw.merge_sparse(r["raw_hist"])
    duration = max(r["elapsed_ns"] for r in results) / 1e9
    errors = totals["short_reads"] + totals["resets"] + totals["timeouts"] + totals["other_errors"]
    cpu_user = sum(r["cpu_user_s"] for r in results)
    cpu_sys = sum(r["cpu_system_s"] for r in results)
    requests = totals["requests"]
    report: dict[str, Any] = {
        "qps": round(requests / duration, 1),
        "requests": requests,
        "errors": errors,
        "mismatches": totals["mismatches"],
        "short_reads": totals["short_reads"],
        "resets": totals["resets"],
        "timeouts": totals["timeouts"],
        "other_errors": totals["other_errors"],
        "stalled": totals["stalled"],
        "latency_us": hist.summary(),
        "connect_us": got.connect.summary(),
        "bytes_sent": totals["bytes_sent"],
        "bytes_received": totals["bytes_received"],
        "bytes_verified": totals["bytes_verified"],
        "duration_s": round(duration, 3),
        "connections": cfg.connections,
        "connections_alive": sum(r["connections_alive"] for r in results),
        "warmup_errors": sum(r["warmup_errors"] for r in results),
        # One size stays a number; a range is reported as it was given, "MIN-MAX".
        "size": cfg.size if cfg.sizes.fixed else str(cfg.sizes),
        "size_min": cfg.sizes.low,
        "size_max": cfg.sizes.high,
        "pipeline": cfg.in_flight_messages(),
        "window_bytes": cfg.in_flight_bytes(),
        "stall_timeout_s": cfg.stall_timeout,
        "pattern": cfg.pattern,
        "workers": nworkers,
        "warmup_s": cfg.warmup,
        "cpu": {
            "client": {
                "user_s": round(cpu_user, 3),
                "system_s": round(cpu_sys, 3),
                "total_s": round(cpu_user + cpu_sys, 3),
            }
        },
    }
    if not cfg.uses_flow():
        report["bytes_sent"] = report["bytes_received"] = requests * cfg.size
        report["bytes_verified"] = (requests - totals["mismatches"]) * cfg.size
    for kind, key in (("mismatches", "mismatch_details"), ("stalls", "stall_details")):
        notes = [n for r in results for n in r["notes"].get(kind, [])]
        if notes:
            report[key] = notes
    if cfg.qps:
        report["target_qps"] = cfg.qps
        report["latency_raw_us"] = raw.summary()
    report["mb_per_s_sent"] = round(report["bytes_sent"] / duration / 1e6, 2)
    report["mb_per_s_received"] = round(report["bytes_received"] / duration / 1e6, 2)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Return why a finished run counts as failed (exit status 1); empty when it passed."""
    reasons = []
    if report["errors"]:
        reasons.append(f"{report['errors']} errors")
    if report["mismatches"]:
        reasons.append(f"{report['mismatches']} mismatches")
    if report.get("stalled"):
        reasons.append(f"{report['stalled']} stalled connections")
    if report.get("warmup_errors"):
        reasons.append(f"{report['warmup_errors']} errors during the warm-up")
    if not report["requests"]:
        reasons.append("no request completed")
    return reasons


def server_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Return the daemon's mode and its CPU and context-switch deltas between two probes."""
    if not before or not after or "error" in before or "error" in after:
        return {"error": (after or before or {}).get("error", "no server figures")}
    out: dict[str, Any] = {
        "mode": after.get("mode"),
        "requested_mode": after.get("requested_mode"),
        "pid": after.get("pid"),
        # Probed while the bench connections were open, before any of them closed.
        "connections_by_path": before.get("connections_by_path"),
    }
    if before.get("pid") != after.get("pid"):
        out["error"] = "the daemon restarted during the run"
        return out
    p0, p1 = before.get("process", {}), after.get("process", {})
    for key in ("cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary"):
        if key in p0 and key in p1:
            delta = p1[key] - p0[key]
            out[key] = round(delta, 3) if isinstance(delta, float) else delta
    return out


def control_probe(path: str, timeout: float = 5.0) -> ServerProbe:
    """Return a probe that reads `status` and `stats` from the daemon's control socket."""

    def probe() -> dict[str, Any]:
        try:
            with ControlClient(path, timeout=timeout) as client:
                status = client.call("status")
                stats = client.call("stats")
        except Exception as exc:  # ControlError or OSError: report it; the bench still counts
            return {"error": f"control socket {path}: {exc}"}
        process = stats.get("process", {}) if isinstance(stats, dict) else {}
        return {**status, "process": process}

    return probe


def _listen_hosts(listen: list[str]) -> list[str]:
    """Return the addresses of `status.listen` entries ("host:port", "[v6]:port")."""
    return [entry.rpartition(":")[0].strip("[]") for entry in listen]


def control_target(path: str, host: str | None, port: int | None) -> tuple[str, int]:
    """Return the host and port the daemon behind `path` listens on, checked against overrides."""
    try:
        with ControlClient(path, timeout=10.0) as client:
            status = client.call("status")
    except Exception as exc:  # ControlError or OSError
        raise BenchError(f"control socket {path}: {exc}") from exc
    return status_target(status, path, host, port)


def status_target(
    status: dict[str, Any], path: str, host: str | None, port: int | None
) -> tuple[str, int]:
    """Return the loopback host and port from a daemon's `status`; explicit ones must match.

    Without this a run with --control could load whatever listens on the default port while
    reporting the daemon's figures.
    """
    daemon_port = status.get("port")
    if not isinstance(daemon_port, int):
        raise BenchError(f"control socket {path}: status has no port")
    if port is not None and port != daemon_port:
        raise BenchError(
            f"--port {port} is not the port of the daemon behind {path} ({daemon_port})"
        )
    hosts = _listen_hosts(status.get("listen") or [])
    if host is not None:
        wanted = resolve(host, daemon_port)[1][0]
        if hosts and wanted not in hosts and not {"0.0.0.0", "::"} & set(hosts):
            raise BenchError(f"the daemon behind {path} does not listen on {host}")
        return host, daemon_port
    for h in hosts:
        if ipaddress.ip_address(h).is_loopback:
            return h, daemon_port
    if "0.0.0.0" in hosts:
        return "127.0.0.1", daemon_port
    if "::" in hosts:
        return "::1", daemon_port
    shown = ", ".join(status.get("listen") or []) or "nothing"
    raise BenchError(f"the daemon behind {path} listens on {shown}, not on loopback")
