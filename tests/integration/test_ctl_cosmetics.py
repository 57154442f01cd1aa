"""Small things a person reads: a tiny bench's CPU line, a bad size, the bypass experiment."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from echoctl.bench.report import render_report
from echoctl.benchcmd import bench, compare
from tests.integration.bench_util import echo, fake_server

ROOT = Path(__file__).resolve().parents[2]
ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def _machine_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("machine CPU"))


def test_a_tiny_bench_says_why_it_has_no_cpu_figures() -> None:
    with fake_server(echo) as server:
        result = CliRunner().invoke(
            bench, ["--port", str(server.port), "-c", "1", "-r", "1", "--json"]
        )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    line = _machine_line(render_report(report))
    # Figures when a clock tick fell in the run; otherwise it says so, never an empty line.
    assert re.search(r"\d+%", line) or "too short to measure" in line, line
    report["cpu"]["machine"] = {"total": 0.0, "busy": 0.0, "cpus": 2}
    assert _machine_line(render_report(report)).split(None, 2)[2] == (
        "no tick counted (the run was too short to measure) (2 CPUs)"
    )


def test_size_zero_is_named_as_one_size() -> None:
    r = subprocess.run([ECHOCTL, "bench", "-s", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("message sizes must be from 1 to 1073741824 bytes, got 0"), r
    r = subprocess.run([ECHOCTL, "bench", "-s", "9-3"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("1 <= MIN <= MAX <= 1073741824, got 9-3"), r


def test_the_bypass_experiment_is_named() -> None:
    text = CliRunner().invoke(compare, ["--help"], terminal_width=200).output
    assert "istio-tcpip-bypass" in text
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "## Same-host bypass: the istio-tcpip-bypass experiment" in docs
    for where in (text, docs):
        assert "seed 003" not in where
