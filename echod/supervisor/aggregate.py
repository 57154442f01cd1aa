"""Adding the workers' figures up into one `status` and one `stats`, without double counting.

Each worker reports its own connections, user-path counters and process figures; they are
summed. The kernel counters and the BPF programs belong to the one BPF object the supervisor
owns, so they come from the supervisor alone, once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
) -> dict[str, Any]:
    """One `stats` from the workers' (and what workers that exited had counted).

    `own` holds the supervisor's parts: kernel, bypass, bpf_programs, rates, process, workers.
    """
    conns: dict[str, Any] = add_counts({}, retired.get("connections", {}))
    user: dict[str, Any] = add_counts({}, retired.get("user", {}))
    kernel_sockets = 0
    for st in workers:
        add_counts(conns, st["connections"])
        add_counts(user, st["user"])
        kernel_sockets += st["kernel_sockets"]
    conns["active"] = sum(st["connections"]["active"] for st in workers)
    return {
        "connections": conns,
        "user": user,
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


def worker_entry(index: int, status: Mapping[str, Any]) -> dict[str, Any]:
    """One worker's line in `status`, from that worker's own status."""
    return {
        "index": index,
        "pid": status["pid"],
        "state": status["state"],
        "mode": status["mode"],
        "connections": status["connections"],
        "connections_by_path": status["connections_by_path"],
        **({"stale": True, "silent_s": status["silent_s"]} if status.get("stale") else {}),
    }


def merge_status(
    own: dict[str, Any], workers: Sequence[tuple[int, Mapping[str, Any] | None]]
) -> dict[str, Any]:
    """The daemon's `status`: the supervisor's own fields, plus the workers' connections.

    `workers` pairs each worker's index with its status (None: it did not answer).
    """
    listen: list[str] = []
    total, kernel, user = 0, 0, 0
    entries = []
    for index, st in workers:
        if st is None:
            entries.append({"index": index, "pid": None, "state": "unresponsive", "mode": None})
            continue
        listen = listen or list(st["listen"])
        total += st["connections"]
        kernel += st["connections_by_path"]["kernel"]
        user += st["connections_by_path"]["user"]
        entries.append(worker_entry(index, st))
    return {
        **own,
        "listen": listen,
        "connections": total,
        "connections_by_path": {"kernel": kernel, "user": user},
        "workers": entries,
    }
