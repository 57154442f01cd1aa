"""The figures of `echoctl compare`: medians per path, the change in %, the size sweep.

The rows are the same for TCP and UDP (a UDP report's `qps` is its datagrams/s); a UDP
summary also adds up the datagrams lost, late and duplicated, and each path's echoes as the
daemon counted them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def cpu_per_request(report: dict[str, Any]) -> dict[str, float | None]:
    """Return CPU µs per request: the daemon, softirq, the whole machine."""
    requests = report.get("requests") or 0
    if not requests:
        return {"daemon": None, "softirq": None, "machine": None}
    scale = 1e6 / requests  # seconds to µs, per request
    server = report.get("server") or {}
    daemon = None
    if "cpu_user_s" in server and "cpu_system_s" in server:
        daemon = (server["cpu_user_s"] + server["cpu_system_s"]) * scale
    machine = report["cpu"]["machine"]
    return {
        "daemon": daemon,
        "softirq": machine.get("softirq", 0.0) * scale,
        "machine": machine.get("busy", 0.0) * scale,
    }


ROWS: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("qps", "rate (req/s)", lambda r: r["qps"]),
    ("avg_us", "latency avg (µs)", lambda r: r["latency_us"]["avg"]),
    ("p50_us", "latency p50 (µs)", lambda r: r["latency_us"]["p50"]),
    ("p99_us", "latency p99 (µs)", lambda r: r["latency_us"]["p99"]),
    ("cpu_daemon_us", "CPU per request, daemon (µs)", lambda r: cpu_per_request(r)["daemon"]),
    ("cpu_softirq_us", "CPU per request, softirq (µs)", lambda r: cpu_per_request(r)["softirq"]),
    ("cpu_machine_us", "CPU per request, machine (µs)", lambda r: cpu_per_request(r)["machine"]),
)


UDP_SUMS = ("lost", "late", "duplicates", "datagrams_sent", "datagrams_echoed")


def summarize(reports: list[dict[str, Any]], udp: bool = False) -> dict[str, float | None]:
    """Return the median of each table row over the repeats of one mode; the counts summed."""
    out = {key: _median([get(r) for r in reports]) for key, _, get in ROWS}
    out["errors"] = sum(r["errors"] for r in reports)
    out["mismatches"] = sum(r["mismatches"] for r in reports)
    if udp:
        for key in UDP_SUMS:
            out[key] = sum(r[key] for r in reports)
        checks = [(r.get("path_check") or {}).get("daemon_echoed") or {} for r in reports]
        for path in ("user", "kernel"):
            # The datagrams the daemon echoed on each path; None: that path was never attached.
            present = [c[path] for c in checks if c.get(path) is not None]
            out[f"daemon_echoed_{path}"] = sum(present) if present else None
    return out


def change_pct(
    modes: tuple[str, ...], summary: dict[str, dict[str, float | None]]
) -> dict[str, dict[str, Any]]:
    """Return, for each mode after the first, the % change of each row against the first mode."""
    base = summary[modes[0]]
    out: dict[str, dict[str, Any]] = {}
    for mode in modes[1:]:
        out[mode] = {}
        for key, _, _ in ROWS:
            a, b = base.get(key), summary[mode].get(key)
            out[mode][key] = round(100.0 * (b - a) / a, 1) if a and b is not None else None
    return out


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:  # an interrupted comparison that never reached this point
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def sweep_summary(
    modes: tuple[str, ...],
    sizes: tuple[int, ...],
    duration: float,
    points: list[dict[str, Any]],
    bulk: str = "stream",
) -> dict[str, Any]:
    """Return per mode and size: ping-pong p50/avg latency and the MB/s of `bulk` (the stream
    or, for UDP, the flood; median, min, max)."""
    table: dict[str, dict[str, Any]] = {}
    for mode in modes:
        table[mode] = {}
        for size in sizes:
            mine = [p for p in points if p["mode"] == mode and p["size"] == size]
            table[mode][str(size)] = {
                "p50_us": _spread([p["pingpong"]["latency_us"]["p50"] for p in mine]),
                "avg_us": _spread([p["pingpong"]["latency_us"]["avg"] for p in mine]),
                "mb_per_s": _spread([p[bulk]["mb_per_s_received"] for p in mine]),
                "errors": sum(p["pingpong"]["errors"] + p[bulk]["errors"] for p in mine),
                "mismatches": sum(
                    p["pingpong"]["mismatches"] + p[bulk]["mismatches"] for p in mine
                ),
            }
    return {"sizes": list(sizes), "duration_s": duration, "bulk": bulk, "modes": table}
