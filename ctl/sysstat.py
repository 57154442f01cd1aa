"""CPU accounting for benchmarks: machine time by kind from /proc/stat, and own-process CPU."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

# Column order of the "cpu" line in /proc/stat (proc(5)).
PROC_STAT_FIELDS = (
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guest_nice",
)
_IDLE_KINDS = ("idle", "iowait")


@dataclass(frozen=True)
class MachineCpu:
    """Cumulative whole-machine CPU seconds by kind, from the first line of /proc/stat."""

    seconds: dict[str, float]

    def minus(self, before: MachineCpu) -> MachineCpu:
        """Return the time spent between `before` and this sample."""
        return MachineCpu({k: self.seconds[k] - before.seconds.get(k, 0.0) for k in self.seconds})

    def report(self) -> dict[str, float]:
        """Return seconds by kind plus `busy`, `total` and `busy_pct`."""
        # guest time is already included in user time (proc(5)), so it must not count twice.
        counted = {k: v for k, v in self.seconds.items() if not k.startswith("guest")}
        total = sum(counted.values())
        busy = total - sum(counted.get(k, 0.0) for k in _IDLE_KINDS)
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["busy"] = round(busy, 3)
        out["total"] = round(total, 3)
        out["busy_pct"] = round(100.0 * busy / total, 1) if total > 0 else 0.0
        return out


def parse_proc_stat(text: str, ticks_per_second: int) -> MachineCpu:
    """Parse the aggregate "cpu" line of /proc/stat text."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            return MachineCpu(
                {k: v / ticks_per_second for k, v in zip(PROC_STAT_FIELDS, values, strict=False)}
            )
    raise ValueError("no aggregate cpu line in /proc/stat")


def machine_cpu(path: str = "/proc/stat") -> MachineCpu:
    """Sample whole-machine CPU time now."""
    with open(path) as f:
        return parse_proc_stat(f.read(), os.sysconf("SC_CLK_TCK"))


def cpu_count() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ProcessCpu:
    """User and system CPU seconds of one process."""

    user_s: float
    system_s: float

    def minus(self, before: ProcessCpu) -> ProcessCpu:
        """Return the CPU time spent between `before` and this sample."""
        return ProcessCpu(self.user_s - before.user_s, self.system_s - before.system_s)


def own_cpu() -> ProcessCpu:
    """Sample this process's CPU time (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return ProcessCpu(usage.ru_utime, usage.ru_stime)
