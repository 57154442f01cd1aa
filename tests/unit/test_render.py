"""Human output: units, alignment and the watch figures."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from echoctl import checkcmd, comparerender, render, statusrender
from echoctl.bench.sizes import size_label


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1234, "1.2k"),
        (3_400_000, "3.4M"),
        (None, "-"),
        ("x", "-"),
        (True, "-"),
        (2.5, "2.5"),
    ],
)
def test_fmt_count(value: Any, text: str) -> None:
    assert render.fmt_count(value) == text


def test_units() -> None:
    assert render.fmt_bytes(512) == "512 B"
    assert render.fmt_bytes(48 * 1024 * 1024) == "48.0 MiB"
    assert render.fmt_bytes(1536) == "1.5 KiB"
    assert render.fmt_byte_rate(12_300_000) == "12.3 MB/s"
    assert render.fmt_byte_rate(999) == "999 B/s"
    assert render.fmt_rate(1234) == "1.2k req/s"
    assert render.fmt_rate(None) == "-"
    assert render.fmt_percent(12.345) == "12.3 %"
    assert render.fmt_ns(85.2) == "85 ns"
    assert render.fmt_ns(1500) == "1.5 µs"
    assert render.fmt_ns(0) == "-"
    assert render.fmt_duration(12.34) == "12.3s"
    assert render.fmt_duration(245) == "4m 05s"
    assert render.fmt_duration(3723) == "1h 02m 03s"
    assert render.fmt_duration(90061) == "1d 01h 01m"


def test_table_alignment() -> None:
    out = render.table(["id", "name", "runs"], [["7", "echo", "12"], ["123", "x", "1.2k"]], (0, 2))
    assert out.splitlines() == [
        " id  name  runs",
        "  7  echo    12",
        "123  x     1.2k",
    ]
    assert render.kv([("a", "1"), ("long", "2")]) == "a     1\nlong  2"


STATUS = {
    "state": "serving",
    "mode": "user",
    "requested_mode": "auto",
    "fallback_reason": "kernel lacks sockmap",
    "listen": ["127.0.0.1:8888", "[::1]:8888"],
    "port": 8888,
    "connections": 10,
    "connections_by_path": {"kernel": 0, "user": 10},
    "pid": 42,
    "version": "0.1.0",
    "uptime_s": 3723.0,
    "bpf": {"attached": False, "programs": [], "maps": []},
    "bypass": {"enabled": False, "requested": False},
    "control": {"clients": 2, "watchers": 1},
}


def test_render_status_with_the_short_circuit() -> None:
    bypass = {
        "enabled": True,
        "path": "short_circuit",
        "port": 8888,
        "attach": "cgroup sock_ops + sockhash sk_msg, through BPF links",
        "cgroup": "/sys/fs/cgroup",
        "link_ids": [7, 8],
    }
    status = {**STATUS, "mode": "kernel", "requested_mode": "kernel", "bypass": bypass}
    rows = dict(line.split(None, 1) for line in statusrender.render_status(status).splitlines())
    assert rows["mode"] == "kernel + bypass"
    assert rows["bypass"] == (
        "short circuit, port 8888; cgroup sock_ops + sockhash sk_msg, through BPF links at "
        "/sys/fs/cgroup (links 7, 8)"
    )
    assert statusrender.summary({**status, "listen": ["127.0.0.1:8888"]}) == (
        "echod serving in kernel + bypass mode on 127.0.0.1:8888"
    )


def test_render_status() -> None:
    assert statusrender.render_status(STATUS).splitlines() == [
        "state        serving",
        "mode         user (requested auto)",
        "fallback     kernel lacks sockmap",
        "listen       127.0.0.1:8888, [::1]:8888",
        "connections  10 (kernel 0, user 10)",
        "uptime       1h 02m 03s",
        "pid          42",
        "version      0.1.0",
        "bpf          not attached",
        "bypass       off",
        "control      clients 2, watchers 1",
    ]
    assert (
        statusrender.summary(STATUS)
        == "echod serving in user (requested auto) mode on 127.0.0.1:8888, [::1]:8888"
    )
    assert statusrender.summary({"state": "stopped"}) == "echod stopped"
    restarted = {**STATUS, "migration": {"moved": 3, "stayed": 1}}
    assert statusrender.summary(restarted).endswith("[::1]:8888; connections moved 3, stayed 1")


def _snap(t: float, user: int, kernel: int, runs: int, run_ns: int) -> dict[str, Any]:
    return {
        "time": t,
        "status": {"state": "serving", "mode": "kernel", "pid": 1},
        "stats": {
            "connections": {"active": 10},
            "user": {"bytes": user * 64, "messages": user},
            "kernel": {"redirected_packets": kernel, "redirected_bytes": kernel * 64},
            "process": {"cpu_percent": 3.0, "rss_bytes": 48 * 1024 * 1024},
            "bpf_programs": [{"id": 1, "name": "v", "run_cnt": runs, "run_time_ns": run_ns}],
        },
    }


def test_the_short_circuit_counts_as_echo_and_its_redirects_are_shown() -> None:
    def snap(t: float, short: int, failures: int) -> dict[str, Any]:
        out = _snap(t, user=0, kernel=0, runs=0, run_ns=0)
        out["stats"]["bypass"] = {
            "short_msgs": short,
            "short_bytes": short * 64,
            "ingress_msgs": 0,
            "redirect_failures": failures,
            "bypassed_conns": 10,
        }
        out["stats"]["bpf_programs"].append(
            {"id": 2, "name": "bypass_msg", "type": "sk_msg", "run_cnt": short, "run_time_ns": 9}
        )
        return out

    a, b = snap(10.0, 1000, 0), snap(11.0, 5000, 2)
    r = render.rates_between(a, b)
    assert r.req_per_s == pytest.approx(4000.0)  # the kernel echoed them, not user space
    assert r.redirects_per_s == pytest.approx(4000.0)
    assert r.kernel_share == pytest.approx(100.0)
    assert r.ns_per_verdict is None  # the sk_msg program is not the echo verdict
    rows = dict(render.watch_rows(b, r))
    assert rows["bypass"] == "4.0k redirects/s, 2 failures, 10 connections bypassed"
    assert dict(render.watch_rows(_snap(1.0, 1, 1, 1, 1), render.Rates()))["bypass"] == "off"


def test_rates_between_snapshots() -> None:
    a = _snap(100.0, user=1000, kernel=0, runs=0, run_ns=0)
    b = _snap(102.0, user=2000, kernel=3000, runs=3000, run_ns=300_000)
    assert render.rates_between(None, a) == render.Rates()
    r = render.rates_between(a, b)
    assert r.req_per_s == pytest.approx(2000.0)
    assert r.bytes_per_s == pytest.approx(128_000.0)
    assert r.kernel_share == pytest.approx(75.0)
    assert r.ns_per_verdict == pytest.approx(100.0)
    # A restart resets counters: no negative rates.
    assert render.rates_between(b, a) == render.Rates()
    rows = dict(render.watch_rows(b, r))
    assert rows["requests"] == "2.0k req/s"
    assert rows["throughput"] == "128.0 kB/s"
    assert rows["kernel / user"] == "75.0 % / 25.0 %"
    assert rows["rss"] == "48.0 MiB"
    assert rows["per verdict"] == "100 ns"


def test_watch_table_renders() -> None:
    a = _snap(1.0, 0, 0, 0, 0)
    console = Console(width=80, record=True, color_system=None)
    console.print(render.watch_table(a, render.Rates(), 1.0))
    text = console.export_text()
    assert "connections" in text
    assert "48.0 MiB" in text


def test_render_stats_and_reload() -> None:
    stats = {
        "connections": {
            "accepted": 1500,
            "active": 3,
            "closed": 1497,
            "refused": {"max_connections": 2, "allow": 0},
        },
        "user": {"bytes": 2048, "messages": 32},
        "kernel": None,
        "rates": {
            "user_messages_per_s": 1234.0,
            "user_bytes_per_s": 12_300_000.0,
            "accepted_per_s": 0.0,
        },
        "process": {"cpu_percent": 1.0, "rss_bytes": 50331648, "open_fds": 12, "threads": 1},
        "bpf_programs": [],
    }
    out = statusrender.render_stats(stats)
    rows = {line[:19].strip(): line[19:] for line in out.splitlines()}
    assert rows["accepted"] == "1.5k"
    assert rows["refused"] == "2 (allow 0, max_connections 2)"
    assert rows["kernel"] == "-"
    assert "1.2k req/s, 12.3 MB/s, 0 conn/s" in out
    assert rows["rss"] == "48.0 MiB"
    assert rows["aborted (backlog)"] == "0"
    assert rows["insert failed"] == "0"
    assert (
        statusrender.render_reload({"applied": [], "needs_restart": []})
        == "configuration unchanged"
    )
    assert statusrender.render_reload({"applied": ["log_level"], "needs_restart": ["port"]}) == (
        "applied        log_level\nneeds restart  port"
    )


PROGS = [{"id": 7, "name": "echo_verdict", "run_cnt": 0, "run_time_ns": 0, "ns_per_run": 0}]


def test_stats_show_dropped_bytes_and_why_inserts_failed() -> None:
    conns = {
        "active": 1,
        "aborted_backlog": 3,
        "insert_failed": 2,
        "insert_failed_reasons": {"peer_gone": 2},
    }
    out = statusrender.render_stats({"connections": conns, "bpf_programs": PROGS})
    assert "aborted (backlog)  3" in out
    assert "insert failed      2 (peer_gone 2; served on the user path)" in out


def test_bpf_run_figures_unavailable_rather_than_zero() -> None:
    off = statusrender.render_stats(
        {"connections": {}, "bpf_programs": PROGS}, bpf_stats_enabled=False
    )
    assert "unavailable" in off
    assert "kernel.bpf_stats_enabled=1" in off
    on = statusrender.render_stats(
        {"connections": {}, "bpf_programs": PROGS}, bpf_stats_enabled=True
    )
    assert "unavailable" not in on


def test_watch_rows_show_drops_and_unavailable_verdict_time() -> None:
    snap = {
        "time": 1.0,
        "status": {"state": "serving", "mode": "kernel", "bpf": {"stats_enabled": False}},
        "stats": {"connections": {"active": 2, "aborted_backlog": 1, "insert_failed": 4}},
    }
    rows = dict(render.watch_rows(snap, render.Rates(ns_per_verdict=0.0)))
    assert rows["aborted (backlog)"] == "1"
    assert rows["insert failed"] == "4"
    assert rows["per verdict"] == "unavailable"


@pytest.mark.parametrize(
    ("n", "text"),
    [(1, "1 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (1 << 20, "1 MiB")],
)
def test_size_labels(n: int, text: str) -> None:
    assert size_label(n) == text


def _sweep_result() -> dict[str, Any]:
    sizes = [1, 64, 4096, 65536]

    def cell(v: float) -> dict[str, float]:
        return {"median": v, "min": v * 0.9, "max": v * 1.1}

    modes = {
        m: {str(s): {"p50_us": cell(40.0 + s / 1000), "mb_per_s": cell(s / 10)} for s in sizes}
        for m in ("user", "kernel")
    }
    return {
        "modes": ["user", "kernel"],
        "repeat": 3,
        "machine": {"kernel": "6.18", "cpus": 2},
        "sweep": {"sizes": sizes, "duration_s": 1.0, "modes": modes},
    }


def test_sweep_plot_scales_and_labels() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = comparerender.draw(_sweep_result())
    try:
        ax_lat, ax_bw = fig.axes
        assert ax_lat.get_xscale() == "log"
        assert ax_bw.get_xscale() == "log"
        assert ax_bw.get_yscale() == "log"
        assert ax_lat.get_ylim()[0] == 0
        assert "lower is better" in ax_lat.get_title()
        assert "higher is better" in ax_bw.get_title()
        fig.canvas.draw()
        labels = [t.get_text() for t in ax_lat.get_xticklabels()]
        assert labels == ["1 B", "64 B", "4 KiB", "64 KiB"]
    finally:
        plt.close(fig)


def test_sweep_of_an_interrupted_compare_shows_dashes() -> None:
    """Points that an interrupted comparison never reached have no figures: shown as '-'."""
    result = _sweep_result()
    for cell in result["sweep"]["modes"]["kernel"].values():
        cell["p50_us"] = cell["mb_per_s"] = None
    rows = comparerender.render_sweep(result).splitlines()[2:]
    assert all(row.split()[-1] == "-" for row in rows)
    assert all(row.split()[3] == "-" for row in rows)


def test_a_silent_worker_is_shown_stale() -> None:
    entry = {"index": 0, "pid": 7, "state": "serving", "mode": "user", "connections": 2}
    status = {
        **STATUS,
        "workers": [entry, {**entry, "index": 1, "pid": 8, "stale": True, "silent_s": 3.2}],
    }
    rows = dict(line.split(None, 1) for line in statusrender.render_status(status).splitlines())
    assert rows["workers"] == "2: #0 pid 7 serving 2; #1 pid 8 serving 2 (stale: silent 3.2 s)"


CHECK = {
    "kernel": "6.18.44",
    "cases": [{"name": "early_1b", "title": "send 1 B right after connect"}],
    "paths": {
        p: {"result": "passed", "cases": {"early_1b": "passed"}} for p in checkcmd.PATH_ORDER
    },
    "passed": True,
}


def test_check_shows_udps_kernel_path_after_the_tcp_table() -> None:
    cases = [
        {"address": a, "bytes": n, "result": r}
        for (a, n), r in zip(
            [("127.0.0.1", 1), ("127.0.0.1", 1472), ("::1", 1), ("::1", 1472)],
            ["passed", "passed", "failed", "not_run"],
            strict=True,
        )
    ]
    reason = "1 B to ::1: no echo within 0.5 s"
    udp = {"result": "failed", "reason": reason, "cases": cases, "ms": 510.2, "checked_at": 1.0}
    lines = checkcmd.render_check({**CHECK, "udp": udp, "passed": False}).splitlines()
    first = lines.index("datagram              UDP kernel path (TCX)")
    assert lines[first - 2].split() == ["result", "PASSED", "PASSED", "PASSED", "PASSED"]
    assert lines[first - 1] == ""
    assert lines[first + 1 :] == [
        "1 B to 127.0.0.1      ok",
        "1,472 B to 127.0.0.1  ok",
        "1 B to ::1            FAILED",
        "1,472 B to ::1        not run",
        "result                FAILED",
        f"udp: failed: {reason}",
    ]


def test_check_of_a_daemon_without_the_udp_entry_shows_the_tcp_table_alone() -> None:
    text = checkcmd.render_check(CHECK)
    assert "UDP" not in text
    assert text.splitlines()[-1].startswith("result")


def test_check_says_why_udp_was_not_run() -> None:
    udp = {"result": "not_run", "reason": "UDP kernel path: no UDP kernel path in this build"}
    text = checkcmd.render_check({**CHECK, "udp": {**udp, "cases": [], "ms": 0.0}})
    assert text.splitlines()[-2:] == [
        "result    NOT_RUN",
        "udp: not run: UDP kernel path: no UDP kernel path in this build",
    ]
