"""Hostile config files against a real echod: at start, exit 2 with one line; at reload,
`invalid_config` with nothing stored, and the daemon (workers included) serves on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Echod, free_port
from tests.integration.control_util import still_serving
from tests.integration.echo_util import wait_for

ECHOD = str(BIN / "echod")
ECHOCTL = str(BIN / "echoctl")

# name -> file text; each once escaped the exit-2 path or froze the reload.
HOSTILE = {
    "gid_over_32_bits": '[control]\ngroup = "99999999999999999999"\n',
    "400_nines": "max_connections = " + "9" * 400 + "\n",
    "5000_digits": "max_connections = " + "9" * 5000 + "\n",
    "5000_hex_digits": "max_connections = 0x" + "f" * 5000 + "\n",
    "regex_key": 'control = { "a(" = 1 }\n',
    "catastrophic_key": 'control = { "(a|a)*$x" = 1 } # ' + "a" * 26 + "\n",
    "grace_1e300": "shutdown_grace = 1e300\n",
    "grace_nan": "shutdown_grace = nan\n",
    "grace_inf": "shutdown_grace = inf\n",
    "grace_over_600": "shutdown_grace = 601\n",
    "backlog_over_1tib": "kernel_backlog_limit = " + str((1 << 40) + 1) + "\n",
    "metrics_port_superscript": '[metrics]\naddress = "127.0.0.1:\u00b2"\n',
    "key_with_newline": '"a\\nb" = 1\n',
}
# Each reload must answer at once: the catastrophic key took 21 s.
RELOAD_SECONDS = 5.0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(HOSTILE))
def test_start_refuses_with_one_line_and_exit_2(tmp_path: Path, name: str) -> None:
    cfg = write(tmp_path / "echod.toml", HOSTILE[name])
    argv = [ECHOD, "--config", str(cfg), "--mode", "user", "--workers", "1"]
    argv += ["--port", str(free_port()), "--control", str(tmp_path / "c.sock")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert time.monotonic() - started < 10
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[:2000]
    assert lines[0].startswith(f"echod: configuration error: {cfg}:"), lines[0]
    assert len(lines[0]) < 400, lines[0]
    assert not (tmp_path / "c.sock").exists()


def reload(d: Echod) -> tuple[subprocess.CompletedProcess[str], float]:
    """`echoctl --json reload`, and how long it took."""
    started = time.monotonic()
    proc = subprocess.run(
        [ECHOCTL, "--control", d.control, "--json", "reload"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.monotonic() - started


def worker_pids(d: Echod) -> list[int]:
    return [w["pid"] for w in d.status()["workers"]]


def kill_a_worker_and_wait(d: Echod) -> None:
    """SIGKILL one worker; a new one must come up and serve (its config is split again)."""
    victim = worker_pids(d)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            victim not in worker_pids(d)
            and len(d.status()["workers"]) == 2
            and all(w["state"] == "serving" for w in d.status()["workers"])
        ),
        20,
        what="a new worker to serve",
    )


def test_reload_refuses_each_and_stores_nothing_with_workers(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = write(tmp_path / "echod.toml", "max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg), "--workers", "2"])
    for name, text in HOSTILE.items():
        write(cfg, text)
        proc, took = reload(d)
        assert proc.returncode == 1, (name, proc)
        error = json.loads(proc.stdout)["error"]
        assert error["code"] == "invalid_config", (name, error)
        assert "\n" not in error["message"]
        assert took < RELOAD_SECONDS, (name, took)
    # Nothing was stored: a respawned worker splits the running config, not a rejected one.
    kill_a_worker_and_wait(d)
    still_serving(d)
    write(cfg, "max_connections = 50\n")
    proc, _ = reload(d)
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout)["applied"] == ["max_connections"]
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()
    assert d.log().count("config.reload_rejected") == len(HOSTILE)


def test_400_nines_then_a_worker_kill_keeps_the_daemon(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    """The field report: the rejected value was stored, and a worker's respawn then crashed."""
    cfg = write(tmp_path / "echod.toml", "workers = 2\n")
    d = echod_factory(mode="user", args=["--config", str(cfg), "--workers", "2"])
    write(cfg, "workers = 2\nmax_connections = " + "9" * 400 + "\n")
    proc, _ = reload(d)
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "invalid_config", error
    assert "max_connections: must be an integer >= 1 and <= 10000000" in error["message"]
    kill_a_worker_and_wait(d)
    still_serving(d)
    assert d.stats()["workers"]["restarts"] == 1
    assert "Traceback" not in d.log()


def test_sighup_with_a_catastrophic_key_is_quick(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = write(tmp_path / "echod.toml", "max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    write(cfg, 'control = { "(a|a)*$x" = 1 } # ' + "a" * 30 + "\n")
    started = time.monotonic()
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: "config.reload_rejected" in d.log(), 10, what="the rejection")
    assert time.monotonic() - started < RELOAD_SECONDS
    still_serving(d)
