"""The bench report: the workers' figures merged into one object, and its human rendering.

`build_report` makes the `--json` object; `failures` says why a finished run counts as failed;
`render_report` and `progress_line` are what a person sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from echoctl.bench.config import BenchConfig
from echoctl.bench.histogram import Histogram
from echoctl.bench.messages import Counters, Result


@dataclass
class Merged:
    """The workers' results added up: histograms, counters, the longest run, CPU time."""

    hist: Histogram
    raw: Histogram
    totals: dict[str, int]
    duration: float
    errors: int  # socket errors of every kind
    cpu_user: float
    cpu_sys: float


def merge_results(results: list[Result]) -> Merged:
    """Add the workers' results up (TCP and UDP reports alike)."""
    hist, raw = Histogram(), Histogram()
    totals = {k: sum(getattr(r.counters, k) for r in results) for k in asdict(Counters())}
    for r in results:
        hist.merge_sparse(r.hist)
        if r.raw_hist:
            raw.merge_sparse(r.raw_hist)
    errors = totals["short_reads"] + totals["resets"] + totals["timeouts"] + totals["other_errors"]
    return Merged(
        hist,
        raw,
        totals,
        max(r.elapsed_ns for r in results) / 1e9,
        errors,
        sum(r.cpu_user_s for r in results),
        sum(r.cpu_system_s for r in results),
    )


def build_report(
    cfg: BenchConfig, results: list[Result], connect: Histogram, nworkers: int
) -> dict[str, Any]:
    """Merge the workers' figures into the report (the `--json` object of `echoctl bench`)."""
    m = merge_results(results)
    hist, raw, totals, duration = m.hist, m.raw, m.totals, m.duration
    errors, cpu_user, cpu_sys = m.errors, m.cpu_user, m.cpu_sys
    requests = totals["requests"]
    report: dict[str, Any] = {
        "qps": round(requests / duration, 1),
        "requests": requests,
        "errors": errors,
        "mismatches": totals["mismatches"],
        "short_reads": totals["short_reads"],
        "resets": totals["resets"],
        "timeouts": totals["timeouts"],
        "other_errors": totals["other_errors"],
        "stalled": totals["stalled"],
        "latency_us": hist.summary(),
        "connect_us": connect.summary(),
        "bytes_sent": totals["bytes_sent"],
        "bytes_received": totals["bytes_received"],
        "bytes_verified": totals["bytes_verified"],
        "duration_s": round(duration, 3),
        "connections": cfg.connections,
        "connections_alive": sum(r.connections_alive for r in results),
        "warmup_errors": sum(r.warmup_errors for r in results),
        # One size stays a number; a range is reported as it was given, "MIN-MAX".
        "size": cfg.size if cfg.sizes.fixed else str(cfg.sizes),
        "size_min": cfg.sizes.low,
        "size_max": cfg.sizes.high,
        "pipeline": cfg.in_flight_messages(),
        "window_bytes": cfg.in_flight_bytes(),
        "stall_timeout_s": cfg.stall_timeout,
        "pattern": cfg.pattern,
        "workers": nworkers,
        "warmup_s": cfg.warmup,
        "cpu": {
            "client": {
                "user_s": round(cpu_user, 3),
                "system_s": round(cpu_sys, 3),
                "total_s": round(cpu_user + cpu_sys, 3),
            }
        },
    }
    if not cfg.uses_flow():
        report["bytes_sent"] = report["bytes_received"] = requests * cfg.size
        report["bytes_verified"] = (requests - totals["mismatches"]) * cfg.size
    for kind, key in (("mismatches", "mismatch_details"), ("stalls", "stall_details")):
        notes = [n for r in results for n in r.notes.get(kind, [])]
        if notes:
            report[key] = notes
    if cfg.pattern == "crr":
        report["conn_per_s"] = report["qps"]  # one request per connection: the same figure
    if cfg.qps:
        report["target_qps"] = cfg.qps
        report["latency_raw_us"] = raw.summary()
    report["mb_per_s_sent"] = round(report["bytes_sent"] / duration / 1e6, 2)
    report["mb_per_s_received"] = round(report["bytes_received"] / duration / 1e6, 2)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Return why a finished run counts as failed (exit status 1); empty when it passed."""
    reasons = []
    if report["errors"]:
        reasons.append(f"{report['errors']} errors")
    if report["mismatches"]:
        reasons.append(f"{report['mismatches']} mismatches")
    if report.get("stalled"):
        reasons.append(f"{report['stalled']} stalled connections")
    if report.get("warmup_errors"):
        reasons.append(f"{report['warmup_errors']} errors during the warm-up")
    if not report["requests"]:
        reasons.append("no request completed")
    return reasons


def plural(n: int, word: str) -> str:
    """Return `n word`, with an s unless n is 1."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def latency(summary: dict[str, float]) -> str:
    """Return a latency summary on one line, in µs."""
    keys = (("avg", "avg"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"))
    parts = [f"{label} {summary[key]:,.1f}" for key, label in keys]
    return "  ".join(parts) + f"  max {summary['max']:,.1f} µs"


def progress_line(line: dict[str, Any]) -> str:
    """Return one progress line: the interval's figures, summed over every worker."""
    unit = "datagrams/s" if line.get("udp") else "req/s"
    text = f"{line['elapsed_s']:6.1f} s  {line['qps']:>12,.0f} {unit}"
    if line.get("stream"):
        text = (
            f"{line['elapsed_s']:6.1f} s  sent {line['mb_per_s_sent']:>9,.1f} MB/s  "
            f"received {line['mb_per_s_received']:>9,.1f} MB/s"
        )
    elif line.get("requests_interval") and line.get("p99_us") is not None:
        text += f"  p99 {line['p99_us']:,.1f} µs"
    if line.get("stalled") or line.get("failed"):
        text += f"  stalled {line.get('stalled', 0)}, failed {line.get('failed', 0)}"
    return text


def _load(r: dict[str, Any]) -> str:
    shape = f"{r['pattern']}, {plural(r['connections'], 'connection')} x {r['size']} B"
    bounds = []
    if r.get("pipeline", 1) > 1:
        bounds.append(f"{r['pipeline']} messages")
    if r.get("window_bytes"):
        bounds.append(f"{r['window_bytes']:,} B")
    if bounds:
        shape += f" ({' or '.join(bounds)} in flight)"
    return f"{shape}, {plural(r['workers'], 'worker')}, {r['duration_s']:.2f} s measured"


def render_report(r: dict[str, Any]) -> str:
    """Return a bench report as a short aligned table with units."""
    stream = r["pattern"] == "stream"
    churn = r["pattern"] == "crr"
    title = "load (interrupted)" if r.get("interrupted") else "load"
    rows = [(title, _load(r))]
    if churn:
        rows += [
            ("connections", f"{r['requests']:,} opened, echoed and closed"),
            ("rate", f"{r['qps']:,.0f} conn/s"),
        ]
    else:
        alive = f"{r['connections_alive']} of {r['connections']} open at the end"
        rows.append(("connections", alive))
    if stream:
        # A full pipe has no request rate worth the name: bytes per second is the figure.
        rows += [
            (
                "bandwidth",
                f"sent {r['mb_per_s_sent']:,.1f} MB/s, received {r['mb_per_s_received']:,.1f} MB/s",
            ),
            ("messages", f"{r['requests']:,} echoed whole"),
        ]
    elif not churn:
        rows += [
            ("requests", f"{r['requests']:,}"),
            (
                "rate",
                f"{r['qps']:,.0f} req/s"
                + (f" (target {r['target_qps']:,.0f})" if "target_qps" in r else ""),
            ),
        ]
    rows += [
        (
            "bytes",
            f"sent {r['bytes_sent']:,}, received {r['bytes_received']:,}, "
            f"verified {r.get('bytes_verified', 0):,}",
        ),
        (
            "errors",
            f"{r['errors']} (short reads {r['short_reads']}, resets {r['resets']}, "
            f"timeouts {r['timeouts']}, other {r['other_errors']})",
        ),
        ("stalled", _stalled(r)),
        ("mismatches", _mismatches(r)),
        ("warm-up errors", str(r["warmup_errors"])),
    ]
    if stream:
        # Defined per message, but in a full pipe it is mostly the wait behind the window.
        rows.append(("message round trip", latency(r["latency_us"])))
    elif churn:
        rows.append(("cycle (connect to close)", latency(r["latency_us"])))
    else:
        label = "latency" + (" (corrected)" if "latency_raw_us" in r else "")
        rows.append((label, latency(r["latency_us"])))
    if "latency_raw_us" in r:
        rows.append(("latency (raw)", latency(r["latency_raw_us"])))
    if not churn:  # churn's connects are inside its cycles
        rows.append(("connect", latency(r["connect_us"])))
    rows += cpu_rows(r)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _stalled(r: dict[str, Any]) -> str:
    text = f"{r.get('stalled', 0)} (no bytes back for {r.get('stall_timeout_s', 0):g} s)"
    details = r.get("stall_details") or []
    if details:
        first = details[0]
        text += (
            f"; first: connection {first['connection']}, {first['sent'] - first['received']:,} "
            f"B owed at offset {first['received']:,}"
        )
    return text


def _mismatches(r: dict[str, Any]) -> str:
    text = str(r["mismatches"])
    details = r.get("mismatch_details") or []
    if details:
        shown = ", ".join(f"{d['connection']} at offset {d['offset']:,}" for d in details[:3])
        text += f" (first wrong byte: {shown})"
    return text


def cpu_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    client = r["cpu"]["client"]
    rows = [("client CPU", f"user {client['user_s']:.2f} s, sys {client['system_s']:.2f} s")]
    m = r["cpu"].get("machine")
    if m:
        total = m["total"] or 1.0
        kinds = ("user", "system", "softirq", "irq", "iowait", "steal", "idle")
        share = ", ".join(f"{k} {100 * m.get(k, 0.0) / total:.0f}%" for k in kinds if m.get(k))
        # /proc/stat counts in clock ticks (10 ms): a run shorter than one may see none.
        share = share or "no tick counted (the run was too short to measure)"
        rows.append(("machine CPU", f"{share} ({m['cpus']} CPUs)"))
    if "server" in r:
        s = r["server"]
        if "error" in s and "mode" not in s:
            rows.append(("server", f"no figures: {s['error']}"))
        else:
            text = server_path_text(s)
            if "cpu_user_s" in s:
                text += f", CPU user {s['cpu_user_s']:.2f} s, sys {s['cpu_system_s']:.2f} s"
            if "ctx_voluntary" in s:
                text += (
                    f", ctx switches {s['ctx_voluntary']:,} voluntary, "
                    f"{s['ctx_involuntary']:,} involuntary"
                )
            if "error" in s:
                text += f" ({s['error']})"
            rows.append(("server", text))
    return rows


def path_label(path: str | None) -> str:
    """ "kernel+bypass" -> "kernel + bypass mode"; None -> "no mode" (not serving)."""
    if path is None:
        return "no mode"
    return path.replace("+", " + ") + " mode"


def server_path_text(s: dict[str, Any]) -> str:
    """The daemon's path over a run: one, or where it started and ended and when it changed."""
    if "path_start" not in s:  # a report from before paths were recorded
        return f"{s.get('mode')} mode"
    start, end, changes = s["path_start"], s["path_end"], s.get("path_changes") or []
    if not changes and start == end:
        return path_label(end)
    when = "; ".join(
        f"to {path_label(c['to'])} between {c['after_s']:g} and {c['by_s']:g} s" for c in changes
    )
    return f"{path_label(start)} at the start, {path_label(end)} at the end (changed {when})"
