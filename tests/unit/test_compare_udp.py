"""`compare --udp` without sockets: the path check on the daemon's counters, what fails a run,
the summary and the table."""

from __future__ import annotations

from typing import Any

import pytest

from echoctl.bench.config import BenchConfig
from echoctl.bench.udpreport import udp_delta
from echoctl.comparefigures import change_pct, summarize
from echoctl.comparepaths import CompareError
from echoctl.comparerender import render_table
from echoctl.compareudp import UdpPaths

USER = {"echoed_packets": 0, "dropped_loop": 0, "dropped_allow": 0, "dropped_rate": 0}
KERNEL = {**USER, "passed_packets": 0}


def counters(user: int, kernel: int | None, rate: int = 0) -> dict[str, Any]:
    return {
        "user": {**USER, "echoed_packets": user, "dropped_rate": rate},
        "kernel": None if kernel is None else {**KERNEL, "echoed_packets": kernel},
    }


def report(path: str, echoed: int, moved: dict[str, Any], **counts: int) -> dict[str, Any]:
    server = {"mode": path, "path_start": path, "path_end": path, "path_changes": [], "udp": moved}
    figures = {"lost": 0, "late": 0, "duplicates": 0, "mismatches": 0, "errors": 0}
    return {
        "protocol": "udp",
        "datagrams_echoed": echoed,
        "datagrams_sent": echoed + counts.get("lost", 0),
        "requests": echoed,
        "loss_fraction": counts.get("lost", 0) / (echoed + counts.get("lost", 0)),
        "max_loss": 0.001,
        "qps": echoed / 2.0,
        "latency_us": {"avg": 20.0, "p50": 18.0, "p99": 40.0},
        "cpu": {"machine": {"busy": 1.0, "softirq": 0.5}},
        "server": server,
        **figures,
        **counts,
    }


def test_each_path_moved_by_its_counters() -> None:
    before = counters(100, None)
    assert udp_delta(before, counters(150, None)) == {
        "user": {**USER, "echoed_packets": 50},
        "kernel": None,  # not attached: not counted
    }
    assert udp_delta(counters(7, 10), counters(7, 510))["kernel"] == {
        **KERNEL,
        "echoed_packets": 500,
    }
    assert udp_delta(None, counters(1, 1)) == {"user": None, "kernel": None}


def test_the_path_claimed_echoed_what_came_back() -> None:
    r = report("kernel", 500, udp_delta(counters(7, 0), counters(7, 500)))
    UdpPaths().check(BenchConfig(udp=True), r, "kernel")
    assert r["path_check"] == {
        "path": "kernel",
        "bench_echoed": 500,
        "daemon_echoed": {"user": 0, "kernel": 500},
        "dropped": {"loop": 0, "allow": 0, "rate": 0},
    }


@pytest.mark.parametrize(
    ("path", "before", "after", "message"),
    [
        ("kernel", counters(0, None), counters(500, None), "kernel path echoed none"),
        ("kernel", counters(0, 0), counters(480, 20), "kernel path echoed 20"),
        ("user", counters(0, 0), counters(0, 500), "user path echoed 0"),
    ],
)
def test_echoes_on_another_path_fail_the_check(
    path: str, before: dict[str, Any], after: dict[str, Any], message: str
) -> None:
    r = report(path, 500, udp_delta(before, after))
    with pytest.raises(CompareError, match=message):
        UdpPaths().check(BenchConfig(udp=True), r, path)


def test_a_udp_path_switched_during_the_run_fails_it() -> None:
    r = report("kernel", 500, udp_delta(counters(0, 0), counters(0, 500)))
    r["server"]["path_changes"] = [{"from": "kernel", "to": "user", "after_s": 1, "by_s": 1.25}]
    with pytest.raises(CompareError, match="went from kernel to user"):
        UdpPaths().check(BenchConfig(udp=True), r, "kernel")


def test_loss_names_the_daemons_rate_limit() -> None:
    r = report("user", 900, udp_delta(counters(0, None), counters(900, None, rate=100)), lost=100)
    UdpPaths().check(BenchConfig(udp=True), r, "user")
    reasons = UdpPaths().failures(r)
    assert reasons[0] == "100 lost (10 %, more than --max-loss 0.1 %)"
    assert "dropped 100 datagrams over its udp_rate_per_source" in reasons[1]
    assert UdpPaths().failures(report("user", 5, {}, duplicates=1)) == ["1 duplicates"]


def test_the_table_counts_datagrams_on_each_path() -> None:
    user = report("user", 600, udp_delta(counters(0, None), counters(600, None)))
    kernel = report("kernel", 900, udp_delta(counters(0, 0), counters(0, 900)))
    UdpPaths().check(BenchConfig(udp=True), user, "user")
    UdpPaths().check(BenchConfig(udp=True), kernel, "kernel")
    summary = {"user": summarize([user], udp=True), "kernel": summarize([kernel], udp=True)}
    assert summary["user"]["daemon_echoed_kernel"] is None
    assert summary["kernel"]["daemon_echoed_kernel"] == 900
    load = {"connections": 2, "size": 64, "duration_s": 2.0, "qps": 0.0}
    result = {
        "protocol": "udp",
        "modes": ["user", "kernel"],
        "repeat": 1,
        "load": {**load, "rounds": None, "pattern": "flood", "window": 32},
        "summary": summary,
        "change_pct": change_pct(("user", "kernel"), summary),
    }
    lines = render_table(result).splitlines()
    assert lines[0].startswith("UDP, 2 flows x 64 B flood (32 in flight per flow), 2 s per run")
    rows = {line.split("  ")[0]: line.split() for line in lines[2:]}
    assert rows["rate (datagrams/s)"][-3:] == ["300", "450", "+50.0%"]
    assert "round trip p50 (µs)" in rows  # a flood's latency is mostly the window's wait
    assert rows["echoed by user path (daemon)"][-2:] == ["600", "0"]
    assert rows["echoed by kernel path (daemon)"][-2:] == ["-", "900"]
