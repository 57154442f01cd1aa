"""`echoctl compare`: the table, JSON and plot, a spawned daemon, and its failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from echoctl import benchcmd
from echoctl.bench.config import BenchConfig
from echoctl.benchcmd import compare
from echoctl.compare import _bench as compare_one
from echoctl.comparepaths import CompareError
from echoctl.comparerender import render_sweep, render_table
from tests.integration.bench_util import echo, fake_server, target
from tests.integration.conftest import Factory


@pytest.mark.bpf
def test_compare_table_json_and_plot(echod_factory: Factory, tmp_path: Path) -> None:
    d = echod_factory(mode="user")
    png = tmp_path / "sweep.png"
    args = [*target(d), "--repeat", "1", "-c", "4", "-d", "0.5", "--sizes", "64,4096"]
    args += ["--sweep-duration", "0.3", "--plot", str(png), "--json"]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["modes"] == ["user", "kernel"]
    assert [r["mode"] for r in out["runs"]] == ["user", "kernel"]
    for mode in ("user", "kernel"):
        assert out["summary"][mode]["qps"] > 0
        assert out["summary"][mode]["mismatches"] == 0
        assert out["runs"][0]["report"]["server"]["mode"] == "user"
    assert out["runs"][1]["report"]["server"]["mode"] == "kernel"
    assert out["change_pct"]["kernel"]["qps"] is not None
    for mode in ("user", "kernel"):
        for size in ("64", "4096"):
            cell = out["sweep"]["modes"][mode][size]
            assert cell["p50_us"]["median"] > 0
            assert cell["mb_per_s"]["median"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = render_table(out)
    for row in (
        "req/s",
        "latency p50",
        "latency p99",
        "CPU per request, softirq",
        "kernel vs user",
    ):
        assert row in table
    assert "4 KiB" in render_sweep(out)
    status = d.status()  # compare put the daemon back in the mode it was asked for before
    assert (status["mode"], status["requested_mode"]) == ("user", "user")


@pytest.mark.bpf
def test_compare_bypass_measures_the_four_paths(echod_factory: Factory) -> None:
    """--bypass adds each mode's +bypass path; each really took its path; the daemon is
    left asking for what it asked for before."""
    d = echod_factory(mode="kernel", args=["--bypass"])
    args = [*target(d), "--bypass", "--repeat", "1", "-c", "2", "-d", "0.5", "--sizes", "1024"]
    args += ["--sweep-duration", "0.3", "--json"]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    paths = ["user", "user+bypass", "kernel", "kernel+bypass"]
    assert out["modes"] == paths
    for run, path in zip(out["runs"], paths, strict=True):
        server = run["report"]["server"]
        assert server["mode"] == path.split("+")[0]
        assert server["bypass"] is path.endswith("+bypass")
        if server["bypass"]:
            assert server["bypass_redirects"] > 0
            assert server["bypass_failures"] == 0
        assert run["report"]["mismatches"] == 0
    for path in paths:
        assert out["sweep"]["modes"][path]["1024"]["mismatches"] == 0
    assert "tcp_lat µs kernel+bypass" in render_sweep(out)
    assert "kernel+bypass vs user" in render_table(out)
    status = d.status()
    assert (status["requested_mode"], status["bypass"]["enabled"]) == ("kernel", True)


def test_compare_refuses_an_unknown_path() -> None:
    result = CliRunner().invoke(compare, ["--spawn", "--modes", "user,kernel+fast"])
    assert result.exit_code == 2
    assert "user+bypass" in result.output


def test_compare_spawns_its_own_daemon() -> None:
    args = ["--spawn", "--modes", "user", "--repeat", "2", "-c", "2", "-d", "0.3"]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "req/s" in result.stdout
    assert "median of 2" in result.stdout
    assert "[2/2] user" in result.stderr


def test_compare_fails_without_server_figures() -> None:
    with fake_server(echo) as server:
        cfg = BenchConfig(port=server.port, connections=1, duration=0.2)
        with pytest.raises(CompareError, match="no daemon here"):
            compare_one(cfg, lambda: {"error": "no daemon here"}, "user")


def test_a_failed_plot_still_prints_the_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(result: dict[str, Any], path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(benchcmd, "plot", broken)
    args = ["--spawn", "--modes", "user", "--repeat", "1", "-c", "1", "-d", "0.2", "--sizes", "64"]
    args += ["--sweep-duration", "0.2", "--plot", str(tmp_path / "sweep.png")]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert "req/s" in result.stdout
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].endswith("No space left on device")


# matplotlib marked absent (as a sys.modules None entry is), then echoctl as the console script.
NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None
sys.argv = ["echoctl", *sys.argv[1:]]
from echoctl.cli import main
main()
"""


def test_plot_without_matplotlib_names_this_environments_pip(tmp_path: Path) -> None:
    """The hint installs into the environment echoctl runs from (/opt/echod/bin/pip there)."""
    args = ["compare", "--spawn", "--sizes", "64", "--plot", str(tmp_path / "p.png")]
    r = subprocess.run(
        [sys.executable, "-c", NO_MATPLOTLIB, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r
    pip = Path(sys.executable).parent / "pip"
    assert r.stderr.strip().endswith(f"--plot needs matplotlib: {pip} install 'matplotlib>=3.7'")
    # That pip is this interpreter's: it installs where echoctl imports from.
    version = subprocess.run([pip, "--version"], capture_output=True, text=True, timeout=60)
    assert str(Path(sys.prefix)) in version.stdout, version
    assert not (tmp_path / "p.png").exists()
