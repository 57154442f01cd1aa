"""Human output for echoctl: numbers with units, short aligned tables, the mode, the live watch.

It owns the formatting every command's output shares (units, `kv` and `table`, `mode_text`)
and the `watch` screen (rates between two snapshots, the live table). The one-shot replies
(status, stats, reload and the start/stop/restart summary) are statusrender.py's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

DASH = "-"


def as_number(value: Any) -> float | None:
    """The value as a float; None when it is not a number (bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _scaled(value: float, base: float, prefixes: Sequence[str]) -> tuple[float, str]:
    for prefix in prefixes[:-1]:
        if abs(value) < base:
            return value, prefix
        value /= base
    return value, prefixes[-1]


def fmt_count(value: Any) -> str:
    """1234 -> '1.2k'; small integers stay exact."""
    v = as_number(value)
    if v is None:
        return DASH
    if abs(v) < 1000:
        return f"{v:.0f}" if v == int(v) else f"{v:.1f}"
    scaled, prefix = _scaled(v, 1000.0, ("", "k", "M", "G", "T"))
    return f"{scaled:.1f}{prefix}"


def fmt_bytes(value: Any) -> str:
    """Sizes in binary units: 50331648 -> '48.0 MiB'."""
    v = as_number(value)
    if v is None:
        return DASH
    if abs(v) < 1024:
        return f"{v:.0f} B"
    scaled, prefix = _scaled(v, 1024.0, ("", "Ki", "Mi", "Gi", "Ti"))
    return f"{scaled:.1f} {prefix}B"


def fmt_byte_rate(value: Any) -> str:
    """Throughput in decimal units: 12_300_000 -> '12.3 MB/s'."""
    v = as_number(value)
    if v is None:
        return DASH
    if abs(v) < 1000:
        return f"{v:.0f} B/s"
    scaled, prefix = _scaled(v, 1000.0, ("", "k", "M", "G", "T"))
    return f"{scaled:.1f} {prefix}B/s"


def fmt_rate(value: Any, unit: str = "req/s") -> str:
    """Events per second: 1234 -> '1.2k req/s'."""
    return DASH if as_number(value) is None else f"{fmt_count(value)} {unit}"


def fmt_percent(value: Any) -> str:
    """12.345 -> '12.3 %'."""
    v = as_number(value)
    return DASH if v is None else f"{v:.1f} %"


def fmt_ns(value: Any) -> str:
    """A per-run time in nanoseconds: '85 ns', '1.5 µs'."""
    v = as_number(value)
    if v is None or v <= 0:
        return DASH
    if v < 1000:
        return f"{v:.0f} ns"
    if v < 1_000_000:
        return f"{v / 1000:.1f} µs"
    return f"{v / 1_000_000:.1f} ms"


def fmt_duration(value: Any) -> str:
    """Seconds as '1h 02m 03s', '4m 05s' or '12.3s'."""
    v = as_number(value)
    if v is None or v < 0:
        return DASH
    if v < 60:
        return f"{v:.1f}s"
    total = int(v)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s"


def kv(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns: label and value."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """An aligned table; columns whose index is in `right` are right-aligned."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def get_in(d: Any, *keys: str) -> Any:
    """d[k1][k2]...; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def mode_text(status: Mapping[str, Any]) -> str:
    """Effective mode (with " + bypass" when on), plus what was requested when that differs."""
    mode = str(status.get("mode") or DASH)
    if get_in(status, "bypass", "enabled"):
        mode += " + bypass"
    requested = status.get("requested_mode")
    if requested and requested != status.get("mode"):
        return f"{mode} (requested {requested})"
    return mode


@dataclass
class Rates:
    """Per-second figures computed between two watch snapshots."""

    req_per_s: float | None = None
    bytes_per_s: float | None = None
    kernel_share: float | None = None
    ns_per_verdict: float | None = None
    redirects_per_s: float | None = None
    udp_per_s: float | None = None


def _totals(snapshot: Mapping[str, Any]) -> tuple[float, ...]:
    """Echoed messages and bytes, bytes echoed in the kernel, verdict runs and ns, redirects.

    The short circuit's sends are echoes the kernel made; the ingress path's are counted
    where user space echoes them already.
    """
    stats = snapshot.get("stats") or {}
    user_msgs = as_number(get_in(stats, "user", "messages")) or 0.0
    user_bytes = as_number(get_in(stats, "user", "bytes")) or 0.0
    k_pkts = as_number(get_in(stats, "kernel", "redirected_packets")) or 0.0
    k_bytes = as_number(get_in(stats, "kernel", "redirected_bytes")) or 0.0
    short_msgs = as_number(get_in(stats, "bypass", "short_msgs")) or 0.0
    short_bytes = as_number(get_in(stats, "bypass", "short_bytes")) or 0.0
    redirects = short_msgs + (as_number(get_in(stats, "bypass", "ingress_msgs")) or 0.0)
    runs = run_ns = 0.0
    for prog in stats.get("bpf_programs") or []:
        if prog.get("type") not in ("sock_ops", "sk_msg"):  # "per verdict": the echo verdict
            runs += as_number(prog.get("run_cnt")) or 0.0
            run_ns += as_number(prog.get("run_time_ns")) or 0.0
    kernel_bytes = k_bytes + short_bytes
    return (
        user_msgs + k_pkts + short_msgs,
        user_bytes + kernel_bytes,
        kernel_bytes,
        runs,
        run_ns,
        redirects,
    )


def rates_between(prev: Mapping[str, Any] | None, cur: Mapping[str, Any]) -> Rates:
    """Rates from the cumulative counters of two snapshots (None before the second one)."""
    if prev is None:
        return Rates()
    dt = (as_number(cur.get("time")) or 0.0) - (as_number(prev.get("time")) or 0.0)
    if dt <= 0:
        return Rates()
    (m0, b0, k0, r0, n0, d0), (m1, b1, k1, r1, n1, d1) = _totals(prev), _totals(cur)
    # Counters reset when the service restarts; a negative delta means "unknown", not negative.
    if m1 < m0 or b1 < b0 or k1 < k0:
        return Rates()
    db = b1 - b0
    runs = r1 - r0
    u0, u1 = _udp_echoed(prev), _udp_echoed(cur)
    return Rates(
        req_per_s=(m1 - m0) / dt,
        bytes_per_s=db / dt,
        kernel_share=100.0 * (k1 - k0) / db if db > 0 else None,
        ns_per_verdict=(n1 - n0) / runs if runs > 0 else None,
        redirects_per_s=(d1 - d0) / dt if d1 >= d0 and get_in(cur, "stats", "bypass") else None,
        udp_per_s=(u1 - u0) / dt if u1 >= u0 and get_in(cur, "stats", "udp") else None,
    )


def _udp_echoed(snapshot: Mapping[str, Any]) -> float:
    """UDP datagrams echoed on both paths."""
    return sum(
        as_number(get_in(snapshot, "stats", "udp", path, "echoed_packets")) or 0.0
        for path in ("user", "kernel")
    )


def watch_rows(snapshot: Mapping[str, Any], rates: Rates) -> list[tuple[str, str]]:
    """The rows of the live watch table."""
    status = snapshot.get("status") or {}
    stats = snapshot.get("stats") or {}
    proc = stats.get("process") or {}
    conns = stats.get("connections") or {}
    share = rates.kernel_share
    verdict = fmt_ns(rates.ns_per_verdict)
    if get_in(status, "bpf", "stats_enabled") is False:
        verdict = "unavailable"
    rows = [
        ("state", str(status.get("state", DASH))),
        ("mode", mode_text(status)),
        ("connections", fmt_count(conns.get("active"))),
        ("aborted (backlog)", fmt_count(conns.get("aborted_backlog", 0))),
        ("insert failed", fmt_count(conns.get("insert_failed", 0))),
        ("requests", fmt_rate(rates.req_per_s)),
        ("throughput", fmt_byte_rate(rates.bytes_per_s)),
        (
            "kernel / user",
            DASH if share is None else f"{share:.1f} % / {100.0 - share:.1f} %",
        ),
        ("bypass", _watch_bypass(stats.get("bypass"), rates)),
        ("cpu", fmt_percent(proc.get("cpu_percent"))),
        ("rss", fmt_bytes(proc.get("rss_bytes"))),
        ("per verdict", verdict),
    ]
    if get_in(status, "udp", "enabled"):  # after the bypass's row
        at = [label for label, _ in rows].index("bypass") + 1
        rows.insert(at, ("udp", _watch_udp(stats.get("udp"), status["udp"], rates)))
    return rows


def _watch_udp(udp: Any, status: Mapping[str, Any], rates: Rates) -> str:
    """'1.2k datagrams/s (user path), dropped 14'."""
    dropped = sum(
        as_number(get_in(udp, path, f"dropped_{reason}")) or 0.0
        for path in ("user", "kernel")
        for reason in ("loop", "allow", "rate")
    )
    path = status.get("path") or "not serving"
    return f"{fmt_rate(rates.udp_per_s, 'datagrams/s')} ({path} path), dropped {fmt_count(dropped)}"


def _watch_bypass(bypass: Any, rates: Rates) -> str:
    if not isinstance(bypass, Mapping):
        return "off"
    return (
        f"{fmt_rate(rates.redirects_per_s, 'redirects/s')}, "
        f"{fmt_count(bypass.get('redirect_failures'))} failures, "
        f"{fmt_count(bypass.get('bypassed_conns'))} connections bypassed"
    )


def watch_table(snapshot: Mapping[str, Any], rates: Rates, interval: float) -> Table:
    """The rich table `echoctl watch` refreshes in place on a terminal."""
    status = snapshot.get("status") or {}
    title = f"echod {status.get('pid', DASH)}, every {interval:g}s"
    t = Table(title=title, show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    for label, value in watch_rows(snapshot, rates):
        t.add_row(label, value)
    return t
