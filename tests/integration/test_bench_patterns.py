"""`echoctl bench` against real daemons: every pattern and its report, every byte checked."""

from __future__ import annotations

import time

import pytest

from tests.integration.bench_util import run_bench, target
from tests.integration.conftest import Factory
from tests.integration.echo_util import wait_for

CONTRACT = ("qps", "requests", "errors", "mismatches", "latency_us")


LATENCY_KEYS = ("avg", "p50", "p90", "p99", "p999", "max")


def consistent(summary: dict[str, float]) -> bool:
    """Every figure of a latency summary is there and above 0 (each sample is a real round
    trip), the percentiles climb to the max, and the mean lies within them."""
    figures = [summary[key] for key in ("p50", "p90", "p99", "p999", "max")]
    return (
        set(summary) == set(LATENCY_KEYS)
        and 0 < figures[0]
        and figures == sorted(figures)
        and 0 < summary["avg"] <= summary["max"]
    )


REPORT_KEYS = (
    "connect_us",
    "short_reads",
    "resets",
    "timeouts",
    "bytes_sent",
    "bytes_received",
    "duration_s",
    "connections",
    "size",
    "pattern",
    "cpu",
)


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_bench_json_has_every_key_and_no_mismatch(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "-c", "4", "-s", "64", "-d", "1")
    assert code == 0, r
    for key in CONTRACT + REPORT_KEYS:
        assert key in r, key
    for summary in (r["latency_us"], r["connect_us"]):
        assert consistent(summary), summary
    assert r["requests"] > 100
    assert r["errors"] == r["mismatches"] == 0
    assert r["bytes_sent"] == r["bytes_received"] == r["requests"] * 64
    assert r["qps"] == pytest.approx(r["requests"] / r["duration_s"], rel=0.01)
    assert {"user_s", "system_s"} <= r["cpu"]["client"].keys()
    assert {"user", "system", "softirq", "idle"} <= r["cpu"]["machine"].keys()
    assert r["server"]["mode"] == mode
    assert {"cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary"} <= r["server"].keys()


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_churn_opens_a_connection_per_request(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    before = d.stats()["connections"]["accepted"]
    args = ["-c", "4", "--workers", "2", "-r", "300", "-s", "1000", "--pattern", "crr"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    assert r["requests"] == 1200
    assert r["errors"] == r["mismatches"] == 0
    assert r["bytes_verified"] == r["bytes_received"] == 1200 * 1000
    assert r["conn_per_s"] == r["qps"] > 0
    # Every request had its own connection (each worker also opens one to check the target).
    wait_for(lambda: d.stats()["connections"]["active"] == 0, what="the daemon to see the closes")
    stats = d.stats()
    assert stats["connections"]["accepted"] - before == 1200 + 2
    assert stats["connections"]["closed"] == stats["connections"]["accepted"]


@pytest.mark.bpf
def test_bench_by_rounds_counts_exactly(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel")
    code, r = run_bench(*target(d), "-c", "3", "-r", "500", "-s", "1000", "--workers", "2")
    assert code == 0
    assert r["requests"] == 1500
    assert r["mismatches"] == 0


def test_rate_is_held(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    code, r = run_bench(*target(d), "-c", "10", "-s", "64", "-q", "2000", "-d", "2")
    assert code == 0
    assert r["qps"] == pytest.approx(2000, rel=0.02)
    assert r["target_qps"] == 2000
    assert set(LATENCY_KEYS) <= r["latency_raw_us"].keys()
    # Measured from the intended send time, latency can only be longer than from the real one.
    assert r["latency_us"]["avg"] >= r["latency_raw_us"]["avg"]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_stream_moves_bytes_both_ways(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "--pattern", "stream", "-c", "2", "-s", "4096", "-d", "1")
    assert code == 0, r
    assert r["pattern"] == "stream"
    assert r["bytes_sent"] > 1_000_000
    assert r["bytes_received"] > 1_000_000
    assert r["mb_per_s_sent"] > 0
    assert r["mb_per_s_received"] > 0
    assert r["mismatches"] == r["errors"] == 0


def test_warmup_does_not_lower_the_rate(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    args = ["-c", "4", "-q", "2000", "-d", "0.5", "--warmup", "0.55"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    # The switch to measuring used to come at the next 100 ms check, losing those requests.
    assert r["qps"] == pytest.approx(2000, rel=0.03)


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_random_sizes_are_byte_checked(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "-c", "4", "-s", "1-1048576", "-d", "1.5")
    assert code == 0, r
    assert (r["size"], r["size_min"], r["size_max"]) == ("1-1048576", 1, 1048576)
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["requests"] > 50
    # Every byte sent in the measured window came back and was compared at its offset.
    assert r["bytes_verified"] == r["bytes_sent"] > 0
    # Log-uniform: the mean message is far below the range's midpoint (512 KiB).
    assert r["bytes_sent"] / r["requests"] < 256 * 1024


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_pipelined_random_sizes_against_the_daemon(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    args = ["-c", "4", "-s", "1-65536", "--pipeline", "8", "-r", "300", "--seed", "7"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    assert r["requests"] == 4 * 300
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["bytes_verified"] == r["bytes_sent"] == r["bytes_received"]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_stream_soak_checks_every_byte(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    args = ["--pattern", "stream", "-c", "4", "-s", "1-1M", "--window", "1M"]
    started = time.monotonic()
    code, r = run_bench(*target(d), *args, "-d", "3", "--stall-timeout", "3")
    assert time.monotonic() - started < 30
    assert code == 0, r
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["connections_alive"] == 4
    assert r["window_bytes"] == 1 << 20
    assert r["bytes_verified"] == r["bytes_sent"] > 10_000_000
    assert r["mb_per_s_sent"] > 0
    assert r["mb_per_s_received"] > 0
