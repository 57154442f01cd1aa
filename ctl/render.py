"""Human output for echoctl: numbers with units, short aligned tables, the live watch table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

DASH = "-"


def _num(value: Any) -> float | None:
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
    v = _num(value)
    if v is None:
        return DASH
    if abs(v) < 1000:
        return f"{v:.0f}" if v == int(v) else f"{v:.1f}"
    scaled, prefix = _scaled(v, 1000.0, ("", "k", "M", "G", "T"))
    return f"{scaled:.1f}{prefix}"


def fmt_bytes(value: Any) -> str:
    """Sizes in binary units: 50331648 -> '48.0 MiB'."""
    v = _num(value)
    if v is None:
        return DASH
    if abs(v) < 1024:
        return f"{v:.0f} B"
    scaled, prefix = _scaled(v, 1024.0, ("", "Ki", "Mi", "Gi", "Ti"))
    return f"{scaled:.1f} {prefix}B"


def fmt_byte_rate(value: Any) -> str:
    """Throughput in decimal units: 12_300_000 -> '12.3 MB/s'."""
    v = _num(value)
    if v is None:
        return DASH
    if abs(v) < 1000:
        return f"{v:.0f} B/s"
    scaled, prefix = _scaled(v, 1000.0, ("", "k", "M", "G", "T"))
    return f"{scaled:.1f} {prefix}B/s"


def fmt_rate(value: Any, unit: str = "req/s") -> str:
    """Events per second: 1234 -> '1.2k req/s'."""
    return DASH if _num(value) is None else f"{fmt_count(value)} {unit}"


def fmt_percent(value: Any) -> str:
    """12.345 -> '12.3 %'."""
    v = _num(value)
    return DASH if v is None else f"{v:.1f} %"


def fmt_ns(value: Any) -> str:
    """A per-run time in nanoseconds: '85 ns', '1.5 µs'."""
    v = _num(value)
    if v is None or v <= 0:
        return DASH
    if v < 1000:
        return f"{v:.0f} ns"
    if v < 1_000_000:
        return f"{v / 1000:.1f} µs"
    return f"{v / 1_000_000:.1f} ms"


def fmt_duration(value: Any) -> str:
    """Seconds as '1h 02m 03s', '4m 05s' or '12.3s'."""
    v = _num(value)
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


def mode_text(status: Mapping[str, Any]) -> str:
    """Effective mode (with " + bypass" when on), plus what was requested when that differs."""
    mode = str(status.get("mode") or DASH)
    if _get(status, "bypass", "enabled"):
        mode += " + bypass"
    requested = status.get("requested_mode")
    if requested and requested != status.get("mode"):
        return f"{mode} (requested {requested})"
    return mode


def summary(status: Mapping[str, Any]) -> str:
    """One line after start/stop/restart: 'echod serving in kernel mode on 127.0.0.1:8888'.

    After a restart it adds the migration: '; connections moved 3, stayed 0'.
    """
    state = status.get("state", "unknown")
    if state != "serving":
        return f"echod {state}"
    listen = ", ".join(status.get("listen") or []) or DASH
    text = f"echod serving in {mode_text(status)} mode on {listen}"
    migration = status.get("migration")  # restart's reply carries it
    if isinstance(migration, Mapping):
        moved, stayed = migration.get("moved"), migration.get("stayed")
        text += f"; connections moved {fmt_count(moved)}, stayed {fmt_count(stayed)}"
    return text


def _bpf_text(bpf: Any) -> str:
    if not isinstance(bpf, Mapping):
        return DASH
    if not bpf.get("attached"):
        return "not attached"
    progs = bpf.get("programs") or []
    names = ", ".join(f"{p.get('name')}#{p.get('id')} ({p.get('type')})" for p in progs)
    maps = len(bpf.get("maps") or [])
    return f"attached: {names or 'no programs'}; {maps} map{'s' if maps != 1 else ''}"


def _bypass_text(bypass: Any) -> str:
    if not isinstance(bypass, Mapping):
        return DASH
    if not bypass.get("enabled"):
        return "off"
    path = "short circuit" if bypass.get("path") == "short_circuit" else "ingress redirect"
    return (
        f"{path}, port {bypass.get('port', DASH)}; {bypass.get('attach', DASH)} at "
        f"{bypass.get('cgroup', DASH)} (links {', '.join(map(str, bypass.get('link_ids') or []))})"
    )


def _connections_text(status: Mapping[str, Any]) -> str:
    text = fmt_count(status.get("connections"))
    by_path = status.get("connections_by_path")
    if isinstance(by_path, Mapping) and by_path:
        text += " (" + ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(by_path.items())) + ")"
    return text


def render_status(status: Mapping[str, Any]) -> str:
    """`echoctl status` output."""
    rows = [
        ("state", str(status.get("state", DASH))),
        ("mode", mode_text(status)),
    ]
    if status.get("fallback_reason"):
        rows.append(("fallback", str(status["fallback_reason"])))
    rows += [
        ("listen", ", ".join(status.get("listen") or []) or DASH),
        ("connections", _connections_text(status)),
        ("uptime", fmt_duration(status.get("uptime_s"))),
        ("pid", str(status.get("pid", DASH))),
        ("version", str(status.get("version", DASH))),
        ("bpf", _bpf_text(status.get("bpf"))),
        ("bypass", _bypass_text(status.get("bypass"))),
    ]
    if "self_check" in status:
        rows.append(("self-check", _self_check_text(status["self_check"])))
    workers = status.get("workers") or []
    if len(workers) > 1:
        rows.append(("workers", _workers_text(workers)))
    control = status.get("control")
    if isinstance(control, Mapping):
        rows.append(
            (
                "control",
                f"clients {control.get('clients', 0)}, watchers {control.get('watchers', 0)}",
            )
        )
    return kv(rows)


def _self_check_text(paths: Any) -> str:
    """'kernel passed, kernel+bypass failed (<reason>)'; paths not checked are left out."""
    if not isinstance(paths, Mapping):
        return DASH
    parts = []
    for path, entry in paths.items():
        result = (entry or {}).get("result") if isinstance(entry, Mapping) else None
        if result == "passed":
            parts.append(f"{path} passed")
        elif result == "failed":
            parts.append(f"{path} failed ({entry.get('reason')})")
        elif result == "not_run" and entry.get("detail"):
            parts.append(f"{path} not run ({entry.get('detail')})")
    return "; ".join(parts) or "none run"


def _workers_text(workers: list[Mapping[str, Any]]) -> str:
    """One entry per worker: pid, state and connections (a silent one's as it said last)."""
    parts = [
        f"#{w.get('index')} pid {w.get('pid') or DASH} {w.get('state', DASH)} "
        f"{fmt_count(w.get('connections', 0))}"
        + (f" (stale: silent {w.get('silent_s')} s)" if w.get("stale") else "")
        for w in workers
    ]
    return f"{len(workers)}: " + "; ".join(parts)


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


BPF_STATS_OFF = "unavailable (needs kernel.bpf_stats_enabled=1)"


def _insert_failed_text(conns: Mapping[str, Any]) -> str:
    reasons = conns.get("insert_failed_reasons") or {}
    why = ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(reasons.items()))
    text = fmt_count(conns.get("insert_failed", 0))
    return text + (f" ({why}; served on the user path)" if why else "")


def render_stats(stats: Mapping[str, Any], bpf_stats_enabled: bool | None = None) -> str:
    """`echoctl stats` output: counters, rates, process figures and BPF programs.

    `bpf_stats_enabled` is `status.bpf.stats_enabled`: when False the kernel keeps no run
    figures, so they show as unavailable rather than as zeros.
    """
    conns = stats.get("connections") or {}
    refused = conns.get("refused") or {}
    refused_n = sum(v for v in refused.values() if _num(v) is not None) if refused else 0
    refused_why = ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(refused.items()))
    rows = [
        ("active", fmt_count(conns.get("active"))),
        ("accepted", fmt_count(conns.get("accepted"))),
        ("closed", fmt_count(conns.get("closed"))),
        ("refused", fmt_count(refused_n) + (f" ({refused_why})" if refused_why else "")),
        # The one case where echod drops bytes on purpose: a peer that never read its echoes.
        ("aborted (backlog)", fmt_count(conns.get("aborted_backlog", 0))),
        ("insert failed", _insert_failed_text(conns)),
        (
            "user",
            f"{fmt_bytes(_get(stats, 'user', 'bytes'))}, "
            f"{fmt_count(_get(stats, 'user', 'messages'))} messages",
        ),
    ]
    kernel = stats.get("kernel")
    if isinstance(kernel, Mapping):
        rows.append(
            (
                "kernel",
                f"{fmt_bytes(kernel.get('redirected_bytes'))}, "
                f"{fmt_count(kernel.get('redirected_packets'))} packets redirected; "
                f"{fmt_bytes(kernel.get('passed_bytes'))}, "
                f"{fmt_count(kernel.get('passed_packets'))} passed",
            )
        )
    else:
        rows.append(("kernel", DASH))
    rows.append(("bypass", _bypass_stats_text(stats.get("bypass"))))
    rates = stats.get("rates")
    if isinstance(rates, Mapping) and _rate_items(rates):
        rows.append(("rates", ", ".join(_rate_items(rates))))
    proc = stats.get("process") or {}
    pool = stats.get("workers")
    if isinstance(pool, Mapping) and pool.get("count", 1) > 1:
        rows.append(
            (
                "workers",
                f"{fmt_count(pool.get('count'))} ({fmt_count(pool.get('restarts', 0))} restarted"
                + (
                    f", #{', #'.join(map(str, pool['unresponsive']))} silent: not counted"
                    if pool.get("unresponsive")
                    else ""
                )
                + f"); figures below are for all {fmt_count(proc.get('processes'))} processes",
            )
        )
    rows += [
        (
            "cpu",
            f"{fmt_percent(proc.get('cpu_percent'))} "
            f"(user {fmt_duration(proc.get('cpu_user_s'))}, "
            f"system {fmt_duration(proc.get('cpu_system_s'))})",
        ),
        ("rss", fmt_bytes(proc.get("rss_bytes"))),
        (
            "ctx switches",
            f"{fmt_count(proc.get('ctx_voluntary'))} voluntary, "
            f"{fmt_count(proc.get('ctx_involuntary'))} involuntary",
        ),
        (
            "page faults",
            f"{fmt_count(proc.get('page_faults_minor'))} minor, "
            f"{fmt_count(proc.get('page_faults_major'))} major",
        ),
        ("fds", fmt_count(proc.get("open_fds"))),
        ("threads", fmt_count(proc.get("threads"))),
    ]
    out = kv(rows)
    progs = stats.get("bpf_programs") or []
    if progs:
        off = bpf_stats_enabled is False
        prog_rows = [
            [
                str(p.get("id", DASH)),
                str(p.get("name", DASH)),
                "unavailable" if off else fmt_count(p.get("run_cnt")),
                "unavailable" if off else fmt_ns(p.get("run_time_ns")),
                "unavailable" if off else fmt_ns(p.get("ns_per_run")),
            ]
            for p in progs
        ]
        out += "\n\n" + table(
            ["id", "program", "runs", "run time", "per run"], prog_rows, (0, 2, 3, 4)
        )
        if off:
            out += f"\nrun figures {BPF_STATS_OFF}"
    return out


def _bypass_stats_text(bypass: Any) -> str:
    if not isinstance(bypass, Mapping):
        return DASH
    return (
        f"{fmt_count(bypass.get('bypassed_conns'))} connections bypassed "
        f"({fmt_count(bypass.get('late_bypassed_conns'))} after a first echo through TCP), "
        f"{fmt_count(bypass.get('tcp_conns'))} on TCP; "
        f"{fmt_bytes(bypass.get('short_bytes'))}, {fmt_count(bypass.get('short_msgs'))} sends "
        f"short-circuited; {fmt_bytes(bypass.get('ingress_bytes'))}, "
        f"{fmt_count(bypass.get('ingress_msgs'))} to the peer's ingress; "
        f"{fmt_count(bypass.get('redirect_failures'))} redirect failures"
    )


def _rate_items(rates: Mapping[str, Any]) -> list[str]:
    def total(*keys: str) -> float | None:
        values = [_num(rates.get(k)) for k in keys]
        present = [v for v in values if v is not None]
        return sum(present) if present else None

    reqs = total(
        "user_messages_per_s", "kernel_redirected_packets_per_s", "bypass_short_msgs_per_s"
    )
    bps = total("user_bytes_per_s", "kernel_redirected_bytes_per_s", "bypass_short_bytes_per_s")
    items = []
    if reqs is not None:
        items.append(fmt_rate(reqs))
    if bps is not None:
        items.append(fmt_byte_rate(bps))
    if _num(rates.get("accepted_per_s")) is not None:
        items.append(fmt_rate(rates["accepted_per_s"], "conn/s"))
    return items


def render_reload(result: Mapping[str, Any]) -> str:
    """`echoctl reload` output."""
    applied = list(result.get("applied") or [])
    pending = list(result.get("needs_restart") or [])
    if not applied and not pending:
        return "configuration unchanged"
    rows = [("applied", ", ".join(applied) or DASH)]
    if pending:
        rows.append(("needs restart", ", ".join(pending)))
    return kv(rows)


@dataclass
class Rates:
    """Per-second figures computed between two watch snapshots."""

    req_per_s: float | None = None
    bytes_per_s: float | None = None
    kernel_share: float | None = None
    ns_per_verdict: float | None = None
    redirects_per_s: float | None = None


def _totals(snapshot: Mapping[str, Any]) -> tuple[float, ...]:
    """Echoed messages and bytes, bytes echoed in the kernel, verdict runs and ns, redirects.

    The short circuit's sends are echoes the kernel made; the ingress path's are counted
    where user space echoes them already.
    """
    stats = snapshot.get("stats") or {}
    user_msgs = _num(_get(stats, "user", "messages")) or 0.0
    user_bytes = _num(_get(stats, "user", "bytes")) or 0.0
    k_pkts = _num(_get(stats, "kernel", "redirected_packets")) or 0.0
    k_bytes = _num(_get(stats, "kernel", "redirected_bytes")) or 0.0
    short_msgs = _num(_get(stats, "bypass", "short_msgs")) or 0.0
    short_bytes = _num(_get(stats, "bypass", "short_bytes")) or 0.0
    redirects = short_msgs + (_num(_get(stats, "bypass", "ingress_msgs")) or 0.0)
    runs = run_ns = 0.0
    for prog in stats.get("bpf_programs") or []:
        if prog.get("type") not in ("sock_ops", "sk_msg"):  # "per verdict": the echo verdict
            runs += _num(prog.get("run_cnt")) or 0.0
            run_ns += _num(prog.get("run_time_ns")) or 0.0
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
    dt = (_num(cur.get("time")) or 0.0) - (_num(prev.get("time")) or 0.0)
    if dt <= 0:
        return Rates()
    (m0, b0, k0, r0, n0, d0), (m1, b1, k1, r1, n1, d1) = _totals(prev), _totals(cur)
    # Counters reset when the service restarts; a negative delta means "unknown", not negative.
    if m1 < m0 or b1 < b0 or k1 < k0:
        return Rates()
    db = b1 - b0
    runs = r1 - r0
    return Rates(
        req_per_s=(m1 - m0) / dt,
        bytes_per_s=db / dt,
        kernel_share=100.0 * (k1 - k0) / db if db > 0 else None,
        ns_per_verdict=(n1 - n0) / runs if runs > 0 else None,
        redirects_per_s=(d1 - d0) / dt if d1 >= d0 and _get(cur, "stats", "bypass") else None,
    )


def watch_rows(snapshot: Mapping[str, Any], rates: Rates) -> list[tuple[str, str]]:
    """The rows of the live watch table."""
    status = snapshot.get("status") or {}
    stats = snapshot.get("stats") or {}
    proc = stats.get("process") or {}
    conns = stats.get("connections") or {}
    share = rates.kernel_share
    verdict = fmt_ns(rates.ns_per_verdict)
    if _get(status, "bpf", "stats_enabled") is False:
        verdict = "unavailable"
    return [
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
