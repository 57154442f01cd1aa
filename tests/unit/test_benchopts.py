"""Size ranges, byte counts, bench and compare options and their usage errors (no daemon)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

import click
import pytest
from click.testing import CliRunner

from echoctl.bench.config import STREAM_WINDOW, BenchConfig
from echoctl.bench.options import bench_config, load_options
from echoctl.bench.sizes import SizeRange, parse_bytes
from echoctl.benchcmd import bench, compare

F = TypeVar("F", bound=Callable[..., Any])


@pytest.mark.parametrize(
    ("text", "value"),
    [("64", 64), ("16k", 16384), ("1M", 1 << 20), ("1MiB", 1 << 20), ("2kb", 2048), ("0", 0)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5k", "-1", "1T", "k"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="byte count"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [("64", 64, 64), ("1-1048576", 1, 1 << 20), ("1-1M", 1, 1 << 20), ("4k-4k", 4096, 4096)],
)
def test_size_range_parse(text: str, low: int, high: int) -> None:
    sizes = SizeRange.parse(text)
    assert (sizes.low, sizes.high) == (low, high)
    assert sizes.fixed == (low == high)


@pytest.mark.parametrize("text", ["0", "10-5", "1-", "-5", "1-2-3", "1-2G"])
def test_size_range_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="byte count|sizes must"):
        SizeRange.parse(text)


def test_size_range_prints_as_given() -> None:
    assert str(SizeRange.parse("1-1M")) == "1-1048576"
    assert str(SizeRange.parse("64")) == "64"


def test_draws_stay_in_range_and_reach_both_ends() -> None:
    draw = SizeRange(1, 8).drawer(random.Random(1))
    seen = {draw() for _ in range(5000)}
    assert seen == set(range(1, 9))


def test_draws_are_log_uniform() -> None:
    draw = SizeRange(1, 1 << 20).drawer(random.Random(2))
    sizes = [draw() for _ in range(20000)]
    assert min(sizes) >= 1
    assert max(sizes) <= 1 << 20
    # Each of the 20 doublings holds about a twentieth of the draws.
    below_1k = sum(s < 1024 for s in sizes) / len(sizes)
    assert below_1k == pytest.approx(math.log(1024) / math.log((1 << 20) + 1), abs=0.03)


def test_a_seed_repeats_the_draws() -> None:
    one = SizeRange(1, 1000).drawer(random.Random(5))
    two = SizeRange(1, 1000).drawer(random.Random(5))
    assert [one() for _ in range(100)] == [two() for _ in range(100)]


def parse(*args: str, options: Callable[[F], F] = load_options) -> BenchConfig:
    """Parse bench options as the CLI does (the load options, or `options`); the config."""
    got: dict[str, Any] = {}

    @click.command()
    @options
    def cmd(**kw: Any) -> None:
        got["cfg"] = bench_config(kw, progress=False)

    result = CliRunner().invoke(cmd, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cfg = got["cfg"]
    assert isinstance(cfg, BenchConfig)
    return cfg


def test_defaults_are_plain_ping_pong() -> None:
    cfg = parse()
    assert (cfg.size, cfg.size_max, cfg.pipeline, cfg.window) == (64, 0, 0, 0)
    assert cfg.stall_timeout == 10.0
    assert not cfg.uses_flow()
    assert (cfg.in_flight_messages(), cfg.in_flight_bytes()) == (1, 0)


def test_soak_options() -> None:
    cfg = parse("-s", "1-1M", "--pipeline", "8", "--window", "1M", "--stall-timeout", "3")
    assert (cfg.size, cfg.size_max) == (1, 1 << 20)
    assert (cfg.in_flight_messages(), cfg.in_flight_bytes()) == (8, 1 << 20)
    assert cfg.stall_timeout == 3.0
    assert cfg.uses_flow()
    cfg.validate()


def test_stream_defaults_bound_the_window() -> None:
    cfg = parse("--pattern", "stream", "-j", "--seed", "3")
    assert cfg.in_flight_bytes() == STREAM_WINDOW
    assert cfg.in_flight_messages() == 512
    assert cfg.seed == 3


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "0"],
        ["--pattern", "stream", "-q", "100"],
        ["-s", "x"],
        ["-s", "0"],
        ["-s", "10-5"],
        ["-s", "64", "--pipeline", "4", "-q", "100"],
        ["--pipeline", "0"],
        ["--window", "lots"],
        ["--stall-timeout", "0"],
        ["--pattern", "crr", "-s", "1-64"],
        ["--pattern", "crr", "--pipeline", "4"],
        ["--pattern", "crr", "--window", "4096"],
        ["--pattern", "crr", "-q", "100"],
    ],
)
def test_bad_input_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(bench, [*args, "-r", "1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_json_usage_error_prints_an_error_object() -> None:
    result = CliRunner().invoke(bench, ["--pattern", "stream", "-q", "100", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["code"] == "usage"


def test_warmup_needs_a_duration() -> None:
    result = CliRunner().invoke(bench, ["-r", "10", "--warmup", "0.1"])
    assert result.exit_code == 2
    assert "--warmup needs --duration" in result.output


def test_compare_refuses_an_unknown_mode() -> None:
    result = CliRunner().invoke(compare, ["--spawn", "--modes", "user,turbo"])
    assert result.exit_code == 2


def test_compare_checks_the_plot_path_first() -> None:
    args = ["--spawn", "--sizes", "64", "--plot", "/nonexistent/dir/sweep.png"]
    result = CliRunner().invoke(compare, args)
    assert result.exit_code == 2
    assert "cannot write" in result.output
    assert "starting" not in result.output  # refused before any daemon was started


def test_pacing_needs_plain_ping_pong() -> None:
    with pytest.raises(ValueError, match="--qps"):
        BenchConfig(qps=100.0, pipeline=4).validate()
    with pytest.raises(ValueError, match="--qps"):
        BenchConfig(qps=100.0, size=1, size_max=100).validate()


def test_compare_paths_are_a_mode_and_the_bypass() -> None:
    from echoctl.benchcmd import _with_bypass
    from echoctl.comparepaths import PATHS, split_path

    assert PATHS == ("user", "user+bypass", "kernel", "kernel+bypass")
    assert split_path("kernel+bypass") == ("kernel", True)
    assert split_path("user") == ("user", False)
    assert _with_bypass(("user", "kernel")) == PATHS
    assert _with_bypass(("kernel+bypass", "user")) == ("kernel+bypass", "user", "user+bypass")
