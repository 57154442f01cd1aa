"""Usage errors and an absent daemon, as `echod` and `echoctl` report them (no daemon runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ECHOD = str(BIN / "echod")
ECHOCTL = str(BIN / "echoctl")


def echoctl(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run echoctl --control <path> ARGS (stdout is a pipe, so never a TTY)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    return subprocess.run(
        [ECHOCTL, "--control", path, *args], capture_output=True, text=True, timeout=60, env=env
    )


def ok_json_rc(r: subprocess.CompletedProcess[str], rc: int) -> dict:
    assert r.returncode == rc, r
    return json.loads(r.stdout)


def test_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.sock")
    r = echoctl(path, "status")
    assert r.returncode == 3
    assert r.stderr.strip() == (
        f"echoctl: cannot connect to {path}: No such file or directory (is echod running?)"
    )
    assert "Traceback" not in r.stderr
    for cmd in ("stats", "stop", "start", "restart", "reload", "watch"):
        r = echoctl(path, cmd)
        assert r.returncode == 1, cmd
        assert path in r.stderr
    err = ok_json_rc(echoctl(path, "--json", "status"), 3)
    assert err["error"]["code"] == "unreachable"


def test_usage_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.sock")
    assert echoctl(path, "start", "--mode", "turbo").returncode == 2
    assert echoctl(path, "start", "--port", "0").returncode == 2
    assert echoctl(path, "watch", "--interval", "0").returncode == 2
    assert echoctl(path, "nosuchcommand").returncode == 2
    r = echoctl(path, "--json", "start", "--port", "x")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"]["code"] == "usage"
    assert echoctl(path, "--help").returncode == 0


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e300", "x"])
def test_timeout_out_of_range_is_a_usage_error(tmp_path: Path, timeout: str) -> None:
    path = str(tmp_path / "nothing.sock")
    r = echoctl(path, "--timeout", timeout, "status")
    assert r.returncode == 2, r
    assert "Invalid value for '--timeout'" in r.stderr
    assert "Traceback" not in r.stderr
    r = echoctl(path, "--json", "--timeout", timeout, "status")
    assert r.returncode == 2, r
    assert json.loads(r.stdout)["error"]["code"] == "usage"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--mode", "bogus"], "option --mode='bogus': must be one of auto, kernel, user"),
        (["--port", "0"], "option --port='0': must be an integer from 1 to 65535"),
        (["--port", "70000"], "option --port='70000': must be an integer from 1 to 65535"),
        (["--port", "http"], "option --port='http': must be an integer"),
        (["--max-connections", "0"], "option --max-connections='0': must be an integer >= 1"),
        (["--no-such-flag"], "No such option"),
        (["--config", "/nonexistent/echod.toml"], "config file not found"),
    ],
)
def test_bad_command_line(argv: list[str], needle: str) -> None:
    proc = subprocess.run([ECHOD, *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
