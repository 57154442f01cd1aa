"""Human output of echoctl's one-shot daemon commands: status, stats, reload, the summary line.

It owns how `status`, `stats` and `reload` replies and the line after start, stop and restart
read; the units, tables and the live `watch` table it builds on are render.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from echoctl.render import (
    DASH,
    as_number,
    fmt_byte_rate,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_ns,
    fmt_percent,
    fmt_rate,
    get_in,
    kv,
    mode_text,
    table,
)


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


def _udp_text(udp: Mapping[str, Any]) -> str:
    """'user path on 127.0.0.1:8888, [::1]:8888 (UDP kernel path unavailable: ...)'."""
    path = udp.get("path")
    if path is None:
        return "on, not serving"
    text = f"{path} path on {', '.join(udp.get('listen') or []) or DASH}"
    return text + (f" ({udp['fallback_reason']})" if udp.get("fallback_reason") else "")


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
    udp = status.get("udp")
    if isinstance(udp, Mapping) and udp.get("enabled"):
        rows.append(("udp", _udp_text(udp)))
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
    refused_n = sum(v for v in refused.values() if as_number(v) is not None) if refused else 0
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
            f"{fmt_bytes(get_in(stats, 'user', 'bytes'))}, "
            f"{fmt_count(get_in(stats, 'user', 'messages'))} messages",
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
    udp = stats.get("udp")
    if isinstance(udp, Mapping):
        for path in ("user", "kernel"):
            if isinstance(udp.get(path), Mapping):
                rows.append((f"udp ({path})", _udp_stats_text(udp[path])))
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


def _udp_stats_text(counts: Mapping[str, Any]) -> str:
    """'12 datagrams, 1.2 KiB echoed; dropped: loop 1, allow 0, rate 3; 0 send errors'."""
    text = (
        f"{fmt_count(counts.get('echoed_packets'))} datagrams, "
        f"{fmt_bytes(counts.get('echoed_bytes'))} echoed; dropped: "
        + ", ".join(
            f"{r} {fmt_count(counts.get(f'dropped_{r}'))}" for r in ("loop", "allow", "rate")
        )
    )
    if "send_errors" in counts:
        text += f"; {fmt_count(counts.get('send_errors'))} send errors"
    if "passed_packets" in counts:
        text += f"; {fmt_count(counts.get('passed_packets'))} passed to user space"
    return text


def _rate_items(rates: Mapping[str, Any]) -> list[str]:
    def total(*keys: str) -> float | None:
        values = [as_number(rates.get(k)) for k in keys]
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
    if as_number(rates.get("accepted_per_s")) is not None:
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
