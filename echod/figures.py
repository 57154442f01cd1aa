"""This process's own figures (CPU, memory, fds) for `stats` and /metrics.

psutil's cpu_percent(interval=None) measures since the previous call on the same Process
object: asked from a fresh object it is always 0.0. The meter therefore keeps one, and its
CPU share is taken over the daemon's 1 s tick (tick()), so every reader sees the same figure,
however often it asks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

__all__ = ["METER", "ProcessMeter", "process_figures"]


class ProcessMeter:
    """One process's CPU share over the last tick, and its other figures on demand."""

    def __init__(self) -> None:
        self._pid = 0
        self._proc: psutil.Process | None = None
        self._last: tuple[float, float] | None = None  # (monotonic time, CPU seconds)
        self.cpu_percent = 0.0

    def _process(self) -> psutil.Process:
        pid = os.getpid()
        if self._proc is None or self._pid != pid:  # first use, or a forked child
            self._proc, self._pid = psutil.Process(pid), pid
            self._last, self.cpu_percent = None, 0.0
        return self._proc

    def tick(self) -> None:
        """Take the CPU share since the previous tick (percent of one core)."""
        times = self._process().cpu_times()
        now, busy = time.monotonic(), times.user + times.system
        if self._last is not None:
            then, was = self._last
            self.cpu_percent = round(max(busy - was, 0.0) / max(now - then, 1e-6) * 100, 1)
        self._last = (now, busy)

    def figures(self) -> dict[str, Any]:
        """cpu_percent (over the last tick), CPU seconds, memory, context switches, faults, fds."""
        proc = self._process()
        with proc.oneshot():
            cpu = proc.cpu_times()
            ctx = proc.num_ctx_switches()
            mem = proc.memory_info()
            faults = _page_faults()
            return {
                "cpu_percent": self.cpu_percent,
                # /proc gives clock ticks; floats of them print as 1.6700000000000002.
                "cpu_user_s": round(cpu.user, 6),
                "cpu_system_s": round(cpu.system, 6),
                "rss_bytes": mem.rss,
                "ctx_voluntary": ctx.voluntary,
                "ctx_involuntary": ctx.involuntary,
                "page_faults_minor": faults[0],
                "page_faults_major": faults[1],
                # Linux 6.2+ gives the count as the directory's size; listing it costs ~15 ms
                # at 19k.
                "open_fds": os.stat("/proc/self/fd").st_size or proc.num_fds(),
                "threads": proc.num_threads(),
            }


def _page_faults() -> tuple[int, int]:
    # /proc/self/stat fields 10 (minflt) and 12 (majflt); the command name may hold spaces.
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[9])


# The process's one meter: ticked by the service's 1 s sample, read by stats.
METER = ProcessMeter()


def process_figures() -> dict[str, Any]:
    """This process's figures (METER's)."""
    return METER.figures()
