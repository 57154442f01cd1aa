"""`compare --spawn`, `make bench` and `make cpaths` serve on the port they are given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from echoctl.benchcmd import compare
from tests.integration.conftest import free_port, require_bpf

ROOT = Path(__file__).resolve().parents[2]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    """Run make in the checkout, with this venv's tools (make venv made them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_") and k != "PORT"}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"BIN={Path(sys.executable).parent}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_compare_spawn_honours_port() -> None:
    port = free_port()
    args = ["--spawn", "--port", str(port), "--modes", "user", "--repeat", "1"]
    result = CliRunner().invoke(compare, [*args, "-c", "1", "-d", "0.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f" --port {port} " in result.stderr
    assert "req/s" in result.stdout


def test_compare_spawn_on_a_busy_port_fails_with_one_line() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = ["--spawn", "--port", str(port), "--modes", "user", "-c", "1", "-d", "0.2"]
        result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output


def test_make_bench_takes_port() -> None:
    port = free_port()
    r = _make("bench", f"PORT={port}", "BENCH_ARGS=--modes user -c 1 -d 0.2 --repeat 1")
    assert r.returncode == 0, r
    assert f" --port {port} " in r.stderr
    assert "req/s" in r.stdout


@pytest.mark.bpf
def test_make_cpaths_takes_port() -> None:
    require_bpf()
    port = free_port()
    r = _make("cpaths", f"PORT={port}", "CPATHS_ARGS=--rounds 1 --seconds 0.2 --workers 1")
    assert r.returncode == 0, r
    assert f"echod on port {port}\n" in r.stderr
    assert "kernel+bypass" in r.stdout
