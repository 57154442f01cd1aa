"""The figures of `status` and `stats`: this process's own, their rates, and their sum over workers.

This process's own figures (CPU, memory, fds) come from one meter.
psutil's cpu_percent(interval=None) measures since the previous call on the same Process
object: asked from a fresh object it is always 0.0. The meter therefore keeps one, and its
CPU share is taken over the daemon's 1 s tick (tick()), so every reader sees the same figure,
however often it asks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import psutil

from echod.control.replies import (
    BaseStatus,
    ConnectionCounts,
    Stats,
    Status,
    UdpCounts,
    UdpFigures,
    UserCounts,
    WorkerEntry,
)

__all__ = [
    "METER",
    "ProcessMeter",
    "Rates",
    "merge_stats",
    "merge_status",
    "process_figures",
    "retire",
    "sum_process",
    "worker_entry",
]


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


# -- adding the workers' figures up, without double counting -------------------------------
#
# Each worker reports its own connections, user-path counters and process figures; they are
# summed. The kernel counters and the BPF programs belong to the one BPF object the supervisor
# owns, so they come from the supervisor alone, once.

# Process figures that add up across processes; cpu_percent adds up too (of one core each).
_PROCESS_SUMS = (
    "cpu_percent",
    "cpu_user_s",
    "cpu_system_s",
    "rss_bytes",
    "ctx_voluntary",
    "ctx_involuntary",
    "page_faults_minor",
    "page_faults_major",
    "open_fds",
    "threads",
)


class Rates:
    """Per-second rates of monotonic counters, over the interval between two samples."""

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}
        self._last: tuple[float, Mapping[str, int]] | None = None

    def sample(self, current: Mapping[str, int]) -> dict[str, float]:
        """Take a sample; returns the rates since the previous one (keys `<counter>_per_s`)."""
        now = time.monotonic()
        if self._last is not None:
            then, prev = self._last
            dt = max(now - then, 1e-6)
            self.rates = {
                f"{k}_per_s": round(max(v - prev.get(k, 0), 0) / dt, 1) for k, v in current.items()
            }
        self._last = (now, dict(current))
        return self.rates


def add_counts(total: dict[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """Add part's numbers into total, key by key, nested maps too; returns total."""
    for key, value in part.items():
        if isinstance(value, Mapping):
            add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    return total


def sum_process(figures: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The process figures of every process of the daemon, added up."""
    out: dict[str, Any] = dict.fromkeys(_PROCESS_SUMS, 0)
    count = 0
    for fig in figures:
        count += 1
        for key in _PROCESS_SUMS:
            out[key] += fig.get(key, 0)
    out["cpu_percent"] = round(out["cpu_percent"], 1)
    out["cpu_user_s"] = round(out["cpu_user_s"], 6)
    out["cpu_system_s"] = round(out["cpu_system_s"], 6)
    out["processes"] = count
    return out


def merge_stats(
    workers: list[Mapping[str, Any]], retired: Mapping[str, Any], own: Mapping[str, Any]
) -> Stats:
    """One `stats` from the workers' (and what workers that exited had counted).

    `own` holds the supervisor's parts: kernel, bypass, bpf_programs, rates, process, workers,
    and udp (nil while UDP is off; else its kernel path's counters).
    """
    conns: dict[str, Any] = add_counts({}, retired.get("connections", {}))
    user: dict[str, Any] = add_counts({}, retired.get("user", {}))
    zero = dict.fromkeys(sorted(UdpCounts.__required_keys__), 0)
    udp_user: dict[str, Any] = add_counts(zero, retired.get("udp_user", {}))
    kernel_sockets = 0
    for st in workers:
        add_counts(conns, st["connections"])
        add_counts(user, st["user"])
        add_counts(udp_user, (st.get("udp") or {}).get("user") or {})
        kernel_sockets += st["kernel_sockets"]
    conns["active"] = sum(st["connections"]["active"] for st in workers)
    udp: UdpFigures | None = None
    if own.get("udp") is not None:
        udp = {"user": cast(UdpCounts, udp_user), "kernel": own["udp"]["kernel"]}
    return {
        "connections": cast(ConnectionCounts, conns),
        "user": cast(UserCounts, user),
        "udp": udp,
        "kernel": own["kernel"],
        "kernel_sockets": kernel_sockets,
        "bypass": own["bypass"],
        "rates": own["rates"],
        "process": own["process"],
        "processes": own["processes"],
        "bpf_programs": own["bpf_programs"],
        "workers": own["workers"],
    }


def retire(retired: dict[str, Any], last_stats: Mapping[str, Any] | None) -> None:
    """Keep what an exited worker had counted, so totals never go backwards."""
    if last_stats is None:
        return
    add_counts(retired.setdefault("connections", {}), last_stats["connections"])
    retired["connections"].pop("active", None)
    add_counts(retired.setdefault("user", {}), last_stats["user"])
    add_counts(retired.setdefault("udp_user", {}), (last_stats.get("udp") or {}).get("user") or {})


def worker_entry(index: int, status: Mapping[str, Any]) -> WorkerEntry:
    """One worker's line in `status`, from that worker's own status."""
    entry: WorkerEntry = {
        "index": index,
        "pid": status["pid"],
        "state": status["state"],
        "mode": status["mode"],
        "connections": status["connections"],
        "connections_by_path": status["connections_by_path"],
    }
    if status.get("stale"):
        entry["stale"] = True
        entry["silent_s"] = status["silent_s"]
    return entry


def merge_status(
    own: BaseStatus, workers: Sequence[tuple[int, Mapping[str, Any] | None]]
) -> Status:
    """The daemon's `status`: the supervisor's own fields, plus the workers' connections.

    `workers` pairs each worker's index with its status (None: it did not answer).
    """
    listen: list[str] = []
    udp_listen: list[str] = []
    total, kernel, user = 0, 0, 0
    entries: list[WorkerEntry] = []
    for index, st in workers:
        if st is None:
            entries.append({"index": index, "pid": None, "state": "unresponsive", "mode": None})
            continue
        listen = listen or list(st["listen"])
        udp_listen = udp_listen or list((st.get("udp") or {}).get("listen") or [])
        total += st["connections"]
        kernel += st["connections_by_path"]["kernel"]
        user += st["connections_by_path"]["user"]
        entries.append(worker_entry(index, st))
    merged: Status = {
        **own,
        "listen": listen,
        "connections": total,
        "connections_by_path": {"kernel": kernel, "user": user},
        "workers": entries,
    }
    if "udp" in own:  # the supervisor's path and fallback, the workers' sockets
        merged["udp"] = {**own["udp"], "listen": udp_listen}
    return merged
