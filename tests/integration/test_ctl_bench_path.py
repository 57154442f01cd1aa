"""bench's `server` line names the path the daemon was on: at the start, at the end, and when
it changed during the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Echod, Factory

ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def bench(d: Echod, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    return subprocess.run(
        [ECHOCTL, "--control", d.control, "bench", "-c", "2", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def server_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("server "))


@pytest.mark.bpf
def test_kernel_with_bypass_is_named_so(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel", args=["--bypass"])
    r = bench(d, "-d", "0.5")
    assert r.returncode == 0, r
    assert server_line(r.stdout).split(None, 1)[1].startswith("kernel + bypass mode, CPU"), r
    out = json.loads(bench(d, "-d", "0.5", "--json").stdout)["server"]
    assert (out["path_start"], out["path_end"], out["path_changes"]) == (
        "kernel+bypass",
        "kernel+bypass",
        [],
    )


def _restart_during(d: Echod, at_s: float, *args: str) -> subprocess.CompletedProcess[str]:
    """Bench for 3 s, switching the daemon to kernel mode `at_s` seconds in."""

    def switch() -> None:
        time.sleep(at_s)
        d.call("restart", {"mode": "kernel"}, timeout=30)

    t = threading.Thread(target=switch)
    t.start()
    try:
        return bench(d, "-d", "3", "--warmup", "0", *args)
    finally:
        t.join(timeout=40)


@pytest.mark.bpf
def test_a_switch_during_the_run_is_reported(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    r = _restart_during(d, 1.5, "--json")
    assert r.returncode == 0, r
    server = json.loads(r.stdout)["server"]
    assert (server["path_start"], server["path_end"]) == ("user", "kernel")
    [change] = server["path_changes"]
    assert (change["from"], change["to"]) == ("user", "kernel")
    # The bench's clock starts a little after the thread's: allow for that, and for one poll.
    assert 0.5 <= change["after_s"] <= change["by_s"] <= 2.5, change
    assert change["by_s"] - change["after_s"] <= 1.0, change

    d.call("restart", {"mode": "user"}, timeout=30)
    r = _restart_during(d, 1.5)
    assert r.returncode == 0, r
    line = server_line(r.stdout)
    assert "user mode at the start, kernel mode at the end (changed to kernel mode between " in (
        line
    ), line
