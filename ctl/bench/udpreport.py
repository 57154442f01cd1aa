"""The `bench --udp` report: the workers' datagram figures merged, why a run failed, and
its human rendering (the TCP report is report.py, whose latency and CPU lines it shares)."""

from __future__ import annotations

from typing import Any

from echoctl.bench.config import BenchConfig
from echoctl.bench.histogram import Histogram
from echoctl.bench.messages import Result
from echoctl.bench.report import cpu_rows, latency, merge_results, plural


def build_udp_report(
    cfg: BenchConfig, results: list[Result], connect: Histogram, nworkers: int
) -> dict[str, Any]:
    """Merge the workers' figures into the report (the `--json` object of `bench --udp`)."""
    m = merge_results(results)
    hist, raw, totals, duration = m.hist, m.raw, m.totals, m.duration
    errors, cpu_user, cpu_sys = m.errors, m.cpu_user, m.cpu_sys
    echoed, sent = totals["requests"], totals["datagrams_sent"]
    calls = sorted({n["calls"] for r in results for n in r.notes.get("udp_io", [])})
    report: dict[str, Any] = {
        "protocol": "udp",
        "pattern": cfg.udp_pattern(),
        "qps": round(echoed / duration, 1),
        "datagrams_per_s": round(echoed / duration, 1),
        "sent_per_s": round(sent / duration, 1),
        "requests": echoed,
        "datagrams_sent": sent,
        "datagrams_echoed": echoed,
        "lost": totals["lost"],
        "late": totals["late"],
        "duplicates": totals["duplicates"],
        "mismatches": totals["mismatches"],
        "reordered": totals["reordered"],
        "loss_fraction": round(totals["lost"] / sent, 6) if sent else 0.0,
        "max_loss": cfg.max_loss,
        "errors": errors,
        "other_errors": totals["other_errors"],
        "latency_us": hist.summary(),
        "bytes_sent": sent * cfg.size,
        "bytes_received": echoed * cfg.size,
        "mb_per_s_sent": round(sent * cfg.size / duration / 1e6, 2),
        "mb_per_s_received": round(echoed * cfg.size / duration / 1e6, 2),
        "duration_s": round(duration, 3),
        "connections": cfg.connections,
        "connections_alive": sum(r.connections_alive for r in results),
        "warmup_errors": sum(r.warmup_errors for r in results),
        "size": cfg.size,
        "window": cfg.udp_window(),
        "udp_timeout_s": cfg.udp_timeout,
        "workers": nworkers,
        "warmup_s": cfg.warmup,
        "io": calls[0] if len(calls) == 1 else calls,
        "cpu": {
            "client": {
                "user_s": round(cpu_user, 3),
                "system_s": round(cpu_sys, 3),
                "total_s": round(cpu_user + cpu_sys, 3),
            }
        },
    }
    notes = [n for r in results for n in r.notes.get("udp_errors", [])]
    if notes:
        report["error_details"] = notes
    if cfg.qps:
        report["target_qps"] = cfg.qps
        report["latency_raw_us"] = raw.summary()
    return report


UDP_PATHS = ("user", "kernel")


def udp_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, dict[str, int] | None]:
    """Return what each UDP path's counters (`stats.udp`) moved by between two probes.

    A path counted at only one of them (the kernel path is counted while attached) is None.
    """
    out: dict[str, dict[str, int] | None] = {}
    for path in UDP_PATHS:
        c0, c1 = (before or {}).get(path), (after or {}).get(path)
        if not isinstance(c0, dict) or not isinstance(c1, dict):
            out[path] = None
            continue
        out[path] = {k: int(v) - int(c0.get(k, 0)) for k, v in c1.items()}
    return out


def udp_failures(report: dict[str, Any]) -> list[str]:
    """Return why a finished --udp run counts as failed (exit status 1); empty when it passed.

    Lost datagrams fail it only beyond --max-loss (UDP may drop; an echo server on a healthy
    path should not, so the default allows one in a thousand); late and reordered ones never.
    """
    reasons = []
    if report["errors"]:
        reasons.append(f"{report['errors']} socket errors")
    if report["mismatches"]:
        reasons.append(f"{report['mismatches']} mismatches")
    if report["duplicates"]:
        reasons.append(f"{report['duplicates']} duplicates")
    if report["loss_fraction"] > report["max_loss"]:
        reasons.append(
            f"{report['lost']:,} lost ({_percent(report['loss_fraction'])}, "
            f"more than --max-loss {_percent(report['max_loss'])})"
        )
    if report.get("warmup_errors"):
        reasons.append(f"{report['warmup_errors']} errors during the warm-up")
    if not report["requests"]:
        reasons.append("no datagram echoed")
    return reasons


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g} %"


def _load(r: dict[str, Any]) -> str:
    shape = f"{r['pattern']}, UDP, {plural(r['connections'], 'flow')} x {r['size']} B"
    if r["window"] > 1:
        shape += f" ({r['window']} datagrams in flight)"
    return f"{shape}, {plural(r['workers'], 'worker')}, {r['duration_s']:.2f} s measured"


def render_udp_report(r: dict[str, Any]) -> str:
    """Return a --udp report as a short aligned table with units."""
    title = "load (interrupted)" if r.get("interrupted") else "load"
    target = f" (target {r['target_qps']:,.0f})" if "target_qps" in r else ""
    rows = [
        (title, _load(r)),
        ("flows", f"{r['connections_alive']} of {r['connections']} open at the end"),
        ("datagrams", f"sent {r['datagrams_sent']:,}, echoed {r['datagrams_echoed']:,}"),
        (
            "rate",
            f"{r['datagrams_per_s']:,.0f} datagrams/s echoed{target}, {r['sent_per_s']:,.0f} sent",
        ),
        (
            "bandwidth",
            f"sent {r['mb_per_s_sent']:,.1f} MB/s, received {r['mb_per_s_received']:,.1f} MB/s",
        ),
        (
            "lost",
            f"{r['lost']:,} ({_percent(r['loss_fraction'])}; fails above "
            f"{_percent(r['max_loss'])}), not back within {r['udp_timeout_s']:g} s",
        ),
        ("late", f"{r['late']:,} (back after being counted lost)"),
        ("duplicates", f"{r['duplicates']:,}"),
        ("mismatches", f"{r['mismatches']:,}"),
        ("reordered", f"{r['reordered']:,}"),
        ("socket errors", _errors(r)),
        ("warm-up errors", str(r["warmup_errors"])),
    ]
    if r["pattern"] == "flood":
        # Defined per datagram, but mostly the wait behind the window.
        rows.append(("round trip", latency(r["latency_us"])))
    else:
        label = "latency (corrected)" if "latency_raw_us" in r else "latency"
        rows.append((label, latency(r["latency_us"])))
    if "latency_raw_us" in r:
        rows.append(("latency (raw)", latency(r["latency_raw_us"])))
    rows.append(("calls", str(r["io"])))
    rows += cpu_rows(r)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _errors(r: dict[str, Any]) -> str:
    text = str(r["errors"])
    details = r.get("error_details") or []
    if details:
        text += f" (first: flow {details[0]['flow']:#x}, {details[0]['error']})"
    return text
