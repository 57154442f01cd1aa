"""One worker process: its share of the connections, its counters and histograms, its entry point.

The parent forks the workers (runner.py). Each opens its connections, sends `Ready`, waits for
the common start, then drives its connections from one thread: plain ping-pong in pingpong.py,
everything byte-checked in stream.py. It folds latencies into log-linear histograms and ends
with one `Done` or `Failed` record (messages.py).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from echoctl.bench.config import MAX_RUN_S, PROGRESS_NS, BenchConfig
from echoctl.bench.crr import run_crr
from echoctl.bench.histogram import Histogram
from echoctl.bench.messages import Counters, Done, Failed, Ready, Result, Tick
from echoctl.bench.pingpong import run_paced, run_pingpong
from echoctl.bench.progress import Sample
from echoctl.bench.stream import Flow, ShortRead, Stalled
from echoctl.bench.udp import run_udp, udp_socket
from echoctl.sysstat import own_cpu

CHECK_NS = 100_000_000  # how often the hot loop looks at the clock-driven duties


class _Orphaned(Exception):
    """The parent process is gone: nobody will read the figures, so the worker stops."""


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def connect(
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


class Worker:
    """One worker process's connections, counters and histograms."""

    def __init__(self, cfg: BenchConfig, index: int, nconns: int, rate: float, out: Any) -> None:
        self.cfg = cfg
        self.index = index
        self.nconns = nconns
        self.rate = rate
        self.out = out
        self.socks: list[socket.socket] = []
        self.counters = Counters()
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
        self.family = 0  # the target, for patterns that connect during the run (crr)
        self.sockaddr: tuple[Any, ...] = ()

    # -- setup

    def connect_all(self, family: int, sockaddr: tuple[Any, ...]) -> None:
        """Open this worker's connections, timing each connect.

        Churn opens its connections during the run: here it only checks, with one connection
        opened and closed, that the target answers.
        """
        self.family, self.sockaddr = family, sockaddr
        if self.cfg.udp:
            for _ in range(self.nconns):  # one by one: close_all closes those made so far
                self.socks.append(udp_socket(family, sockaddr))
            return
        if self.cfg.pattern == "crr":
            t0 = time.monotonic_ns()
            connect(family, sockaddr, self.cfg, blocking=True).close()
            self.connect_hist.record_many([time.monotonic_ns() - t0])
            return
        blocking = not self.cfg.uses_flow()
        times = []
        for _ in range(self.nconns):
            t0 = time.monotonic_ns()
            self.socks.append(connect(family, sockaddr, self.cfg, blocking))
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
        self.counters = Counters()
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
        self.out.put(Tick(self.index, sample))

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

    def result(self, elapsed_ns: int) -> Result:
        """Return this worker's figures for the parent."""
        cpu = own_cpu().minus(self.cpu_start)
        return Result(
            index=self.index,
            counters=self.counters,
            elapsed_ns=elapsed_ns,
            hist=self.hist.to_sparse(),
            raw_hist=self.raw_hist.to_sparse() if self.rate else None,
            cpu_user_s=cpu.user_s,
            cpu_system_s=cpu.system_s,
            warmup_errors=self.warmup_errors,
            connections_alive=self.alive,
            notes=self.notes,
        )

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


def worker_main(
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
    worker = Worker(cfg, index, nconns, rate, out)
    try:
        worker.connect_all(family, sockaddr)
    except OSError as exc:
        worker.close_all()
        out.put(Failed(index, f"cannot connect to {cfg.host}:{cfg.port}: {exc.strerror or exc}"))
        return
    out.put(Ready(index, worker.connect_hist.to_sparse()))
    if not await_go(go, cfg.timeout + 30, worker.parent_pid) or stop_flag.value:
        worker.close_all()
        out.cancel_join_thread()  # the parent may be gone: never block exit on the queue
        return
    worker.begin(start_ns.value, stop_flag)
    wait = worker.start_ns - time.monotonic_ns()
    if wait > 0:
        time.sleep(wait / 1e9)
    try:
        if cfg.udp:
            run_udp(worker)
        elif cfg.pattern == "crr":
            run_crr(worker)
        elif cfg.uses_flow():
            Flow(worker).run()
        elif rate:
            run_paced(worker)
        else:
            run_pingpong(worker)
    except _Orphaned:
        worker.close_all()
        out.cancel_join_thread()
        return
    except Exception as exc:  # report, don't die silently: the parent turns it into BenchError
        out.put(Failed(index, f"worker {index} failed: {exc!r}"))
        worker.close_all()
        return
    elapsed = (worker.stopped_ns or time.monotonic_ns()) - worker.measure_ns
    worker.alive = len(worker.socks)
    worker.close_all()
    out.put(Done(worker.result(max(elapsed, 1))))


def await_go(go: Any, timeout: float, parent_pid: int) -> bool:
    """Wait for the start signal; False on timeout or when the parent has died meanwhile."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if go.wait(min(left, 0.5)):
            return True
        if os.getppid() != parent_pid:
            return False
    return False
