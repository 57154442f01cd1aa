"""`bench --udp`: its options, their usage errors, and its report and exit rule (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from echoctl.bench.config import BenchConfig
from echoctl.bench.histogram import Histogram
from echoctl.bench.messages import Counters, Result
from echoctl.bench.options import bench_options
from echoctl.bench.udpreport import build_udp_report, render_udp_report, udp_failures
from echoctl.benchcmd import bench, compare
from tests.unit.test_benchopts import parse as parse_options


def parse(*args: str) -> BenchConfig:
    """Parse with bench's own options (--udp is bench's), and check the config as bench does."""
    cfg = parse_options(*args, options=bench_options)
    cfg.validate()
    return cfg


def test_the_three_patterns() -> None:
    cfg = parse("--udp")
    assert (cfg.udp, cfg.udp_pattern(), cfg.udp_window()) == (True, "pingpong", 1)
    assert (cfg.udp_timeout, cfg.max_loss) == (1.0, 0.001)
    cfg = parse("--udp", "--pattern", "flood")
    assert (cfg.udp_pattern(), cfg.udp_window()) == ("flood", 32)
    cfg = parse("--udp", "--pattern", "flood", "--window", "256", "--udp-timeout", "0.2")
    assert (cfg.udp_window(), cfg.udp_timeout) == (256, 0.2)
    cfg = parse("--udp", "-q", "300000", "--max-loss", "0.01")
    assert (cfg.udp_pattern(), cfg.udp_window(), cfg.max_loss) == ("rate", 32, 0.01)
    assert cfg.worker_count() <= 2  # one paced worker per 200,000 datagrams/s


@pytest.mark.parametrize(
    "args",
    [
        ["--pattern", "flood"],
        ["--udp-timeout", "2"],
        ["--max-loss", "0.1"],
        ["--udp", "--pattern", "stream"],
        ["--udp", "--pattern", "crr"],
        ["--udp", "-s", "23"],
        ["--udp", "-s", "65508"],
        ["--udp", "-s", "64-128"],
        ["--udp", "--pipeline", "4"],
        ["--udp", "--window", "8"],
        ["--udp", "--pattern", "flood", "-q", "1000"],
        ["--udp", "--pattern", "flood", "--window", "100000"],
        ["--udp", "--pattern", "flood", "-c", "1000", "--window", "65536"],
        ["--udp", "-c", "70000"],
        ["--udp", "--udp-timeout", "0"],
        ["--udp", "--max-loss", "1.5"],
        ["--udp", "--control", "/nonexistent.sock"],
        ["--udp", "--stall-timeout", "3"],
        ["--udp", "--warmup", "1"],
    ],
)
def test_bad_input_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(bench, [*args, "-r", "1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_compare_floods_only_with_udp() -> None:
    result = CliRunner().invoke(compare, ["--spawn", "--pattern", "flood"])
    assert result.exit_code == 2
    assert "--pattern flood needs --udp" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bypass"], "the bypass is TCP's"),
        (["--modes", "user,kernel+bypass"], "the bypass is TCP's"),
        (["--modes", "user,turbo"], "with --udp, modes must be a list of user, kernel"),
        (["--stall-timeout", "3"], "--stall-timeout is for TCP"),
        (["--pattern", "stream"], "--udp patterns are pingpong and flood"),
        (["--sizes", "8"], "with --udp, sweep sizes are 24 to 65507 bytes"),
    ],
)
def test_compare_udp_usage_errors(args: list[str], message: str) -> None:
    """Refused before any daemon starts: exit 2 and the reason."""
    result = CliRunner().invoke(compare, ["--udp", "--spawn", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "starting" not in result.output


def test_compare_udp_options_need_udp() -> None:
    result = CliRunner().invoke(compare, ["--spawn", "--max-loss", "0.01"])
    assert result.exit_code == 2
    assert "--max-loss needs --udp" in result.output


def result(**counts: int) -> Result:
    hist = Histogram()
    hist.record_many([20_000, 30_000, 40_000])
    return Result(
        index=0,
        counters=Counters(**counts),
        elapsed_ns=2_000_000_000,
        hist=hist.to_sparse(),
        raw_hist=None,
        cpu_user_s=0.5,
        cpu_system_s=0.25,
        warmup_errors=0,
        connections_alive=4,
        notes={"udp_io": [{"calls": "sendmmsg"}]},
    )


def report(**counts: int) -> dict[str, Any]:
    cfg = BenchConfig(udp=True, pattern="flood", connections=4, size=100)
    results = [result(**counts), result(requests=1000, datagrams_sent=1000)]
    return build_udp_report(cfg, results, Histogram(), 2)


def test_the_report_sums_the_workers() -> None:
    r = report(requests=9_990, datagrams_sent=10_000, lost=10, late=3, reordered=5)
    assert r["protocol"] == "udp"
    assert (r["pattern"], r["window"], r["size"], r["io"]) == ("flood", 32, 100, "sendmmsg")
    assert (r["datagrams_sent"], r["datagrams_echoed"], r["requests"]) == (11_000, 10_990, 10_990)
    assert r["datagrams_per_s"] == r["qps"] == 5_495.0
    assert r["sent_per_s"] == 5_500.0
    assert (r["lost"], r["late"], r["reordered"], r["duplicates"]) == (10, 3, 5, 0)
    assert r["loss_fraction"] == round(10 / 11_000, 6)
    assert r["bytes_received"] == 10_990 * 100
    assert r["latency_us"]["p50"] == pytest.approx(30.0, rel=0.01)
    assert udp_failures(r) == []  # 0.09 % lost: within --max-loss 0.1 %, and late is no error
    text = render_udp_report(r)
    for words in ("flood, UDP, 4 flows x 100 B (32 datagrams in flight)", "5,495 datagrams/s"):
        assert words in text


def test_what_fails_a_run() -> None:
    assert udp_failures(report(requests=10, datagrams_sent=10, duplicates=1)) == ["1 duplicates"]
    assert udp_failures(report(requests=10, datagrams_sent=10, mismatches=2)) == ["2 mismatches"]
    lossy = report(requests=900, datagrams_sent=1_000, lost=100)
    assert udp_failures(lossy) == ["100 lost (5 %, more than --max-loss 0.1 %)"]
    lossy["max_loss"] = 0.05
    assert udp_failures(lossy) == []
    assert udp_failures(report(other_errors=1)) == ["1 socket errors"]
