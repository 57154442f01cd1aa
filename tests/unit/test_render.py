"""Human output: units, alignment and the watch figures."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from echoctl import render


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
    "control": {"clients": 2, "watchers": 1},
}


def test_render_status() -> None:
    assert render.render_status(STATUS).splitlines() == [
        "state        serving",
        "mode         user (requested auto)",
        "fallback     kernel lacks sockmap",
        "listen       127.0.0.1:8888, [::1]:8888",
        "connections  10 (kernel 0, user 10)",
        "uptime       1h 02m 03s",
        "pid          42",
        "version      0.1.0",
        "bpf          not attached",
        "control      clients 2, watchers 1",
    ]
    assert (
        render.summary(STATUS)
        == "echod serving in user (requested auto) mode on 127.0.0.1:8888, [::1]:8888"
    )
    assert render.summary({"state": "stopped"}) == "echod stopped"


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
    out = render.render_stats(stats)
    assert "accepted      1.5k" in out
    assert "refused       2 (allow 0, max_connections 2)" in out
    assert "kernel        -" in out
    assert "1.2k req/s, 12.3 MB/s, 0 conn/s" in out
    assert "rss           48.0 MiB" in out
    assert render.render_reload({"applied": [], "needs_restart": []}) == "configuration unchanged"
    assert render.render_reload({"applied": ["log_level"], "needs_restart": ["port"]}) == (
        "applied        log_level\nneeds restart  port"
    )
