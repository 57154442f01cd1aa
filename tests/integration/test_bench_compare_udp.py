"""`echoctl compare --udp`: UDP's user and kernel paths through a real daemon, the check that
each run's datagrams were echoed on its path, the table and JSON, and its failures."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from echoctl.benchcmd import compare
from echoctl.comparerender import render_table
from tests.integration.bench_util import target
from tests.integration.conftest import Factory
from tests.integration.test_bench_signals import echoctl_command
from tests.integration.test_ctl_compare_interrupt import interrupt_after_first_run


def compare_udp(*args: str) -> Any:
    return CliRunner().invoke(compare, ["--udp", *args], catch_exceptions=False)


def assert_on_path(run: dict[str, Any]) -> None:
    """The daemon's counters of the run's path moved by at least what the bench got back."""
    path, report = run["mode"], run["report"]
    check = report["path_check"]
    assert check["path"] == path
    assert check["bench_echoed"] == report["datagrams_echoed"] > 0
    assert check["daemon_echoed"][path] >= check["bench_echoed"]
    assert report["server"]["path_start"] == report["server"]["path_end"] == path


@pytest.mark.bpf
def test_compare_udp_spawn_json() -> None:
    result = compare_udp("--spawn", "--repeat", "2", "-c", "2", "-d", "0.5", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["protocol"], out["modes"], out["failures"]) == ("udp", ["user", "kernel"], [])
    assert [r["mode"] for r in out["runs"]] == ["user", "kernel", "user", "kernel"]
    assert out["load"]["pattern"] == "pingpong"
    for run in out["runs"]:
        assert_on_path(run)
        assert run["report"]["mismatches"] == run["report"]["duplicates"] == 0
    for path in ("user", "kernel"):
        summary = out["summary"][path]
        assert summary["datagrams_echoed"] > 0
        assert summary["qps"] > 0
        assert summary["p50_us"] > 0
        assert summary["mismatches"] == summary["duplicates"] == summary["errors"] == 0
    # The private daemon serves nobody else: each path echoed exactly the bench's datagrams.
    assert out["summary"]["user"]["daemon_echoed_kernel"] is None  # no kernel path attached
    assert out["summary"]["kernel"]["daemon_echoed_user"] == 0
    assert out["change_pct"]["kernel"]["qps"] is not None
    table = render_table(out)
    assert table.startswith("UDP, 2 flows x 64 B pingpong, 0.5 s per run, median of 2")
    assert "latency p99 (µs)" in table


@pytest.mark.bpf
def test_compare_udp_flood_table_and_sweep(tmp_path: Path) -> None:
    png = tmp_path / "udp.png"
    args = ["--spawn", "--pattern", "flood", "--repeat", "1", "-c", "2", "-d", "0.5"]
    args += ["--sizes", "1024", "--sweep-duration", "0.3", "--plot", str(png)]
    result = compare_udp(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("UDP, 2 flows x 64 B flood (32 in flight per flow), 0.5 s per run")
    assert lines[1].split() == ["user", "kernel", "kernel", "vs", "user"]
    rows = {line.split("  ")[0]: line.split() for line in lines[2:] if line}
    assert int(rows["rate (datagrams/s)"][2].replace(",", "")) > 0
    assert rows["errors / mismatches / duplicates"][-10:] == ["0", "/", "0", "/", "0"] * 2
    assert rows["echoed by kernel path (daemon)"][-2] == "-"  # the user path's run
    assert int(rows["echoed by kernel path (daemon)"][-1].replace(",", "")) > 0
    assert "udp_bw MB/s kernel" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[6/6] kernel: sweep 1024 B flood, repeat 1" in result.stderr


@pytest.mark.bpf
def test_compare_udp_switches_a_daemon_and_puts_it_back(echod_factory: Factory) -> None:
    """--control: the daemon is switched with restart --mode, and left in the mode it was."""
    d = echod_factory(mode="kernel", args=["--udp", "--udp-rate-per-source", "0"])
    args = [*target(d), "--modes", "user,kernel", "--repeat", "1", "-c", "1", "-d", "0.3"]
    result = compare_udp(*args, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for run in out["runs"]:
        assert_on_path(run)
    status = d.status()
    assert (status["requested_mode"], status["udp"]["path"]) == ("kernel", "kernel")


def test_a_daemon_without_udp_is_named_with_the_setting(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    result = compare_udp("--control", d.control, "--repeat", "1", "-d", "0.3")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"echoctl: compare: the daemon behind {d.control} does not echo UDP: start it with "
        "--udp (or udp = true in its config file)"
    )
    assert "[1/" not in result.stderr  # refused before any run
    out = json.loads(compare_udp("--control", d.control, "-d", "0.3", "--json").stdout)
    assert out["error"]["message"].endswith("(or udp = true in its config file)")


def test_the_daemons_rate_limit_is_named_when_it_loses_datagrams(echod_factory: Factory) -> None:
    d = echod_factory(mode="user", args=["--udp", "--udp-rate-per-source", "200"])
    args = [*target(d), "--modes", "user", "--repeat", "1", "-c", "1", "-d", "0.5"]
    result = compare_udp(*args, "--pattern", "flood", "--udp-timeout", "0.2")
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("echoctl: compare: failed: user repeat 1: "), last
    assert "more than --max-loss" in last
    assert "over its udp_rate_per_source (0 turns the limit off)" in last


@pytest.mark.parametrize("args", [["--modes", "user,kernel+bypass"], ["--bypass"]])
def test_udp_with_the_bypass_is_a_usage_error(args: list[str]) -> None:
    cmd = echoctl_command("compare", "--udp", "--spawn", *args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: the bypass is TCP's (a sockmap between TCP sockets): with --udp the paths are "
        "user and kernel"
    )
    assert "starting" not in r.stderr  # no daemon was started


def test_ctrl_c_reports_the_udp_runs_that_finished() -> None:
    r = interrupt_after_first_run(signal.SIGINT, "--udp", "--json")
    assert r.returncode == 130, r
    out = json.loads(r.stdout)
    assert (out["protocol"], out["interrupted"]) == ("udp", "SIGINT")
    assert [(run["mode"], run["repeat"]) for run in out["runs"]] == [("user", 1)]
    assert out["summary"]["user"]["datagrams_echoed"] > 0
    assert (
        out["summary"]["user"]["daemon_echoed_user"] == out["summary"]["user"]["datagrams_echoed"]
    )
