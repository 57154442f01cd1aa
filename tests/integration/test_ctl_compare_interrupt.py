"""Ctrl-C or SIGTERM on `compare` prints the runs that finished, marked as interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.integration.echo_util import wait_for
from tests.integration.test_bench_signals import children, echoctl_command


def _bench_workers(pid: int) -> set[int]:
    """The bench worker processes of the compare `pid` (forked: not the spawned echod)."""
    return {child for child, cmdline in children(pid).items() if "echod" not in cmdline}


def interrupt_after_first_run(signum: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """A 3-run `compare --spawn` (1 s each), sent `signum` once the second run measures."""
    args = ["--spawn", "--modes", "user", "--repeat", "3", "-c", "2", "-d", "1", *extra]
    proc = subprocess.Popen(
        echoctl_command("compare", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Each run forks its own workers: new ones after the first run's mean the second began.
        first: set[int] = set()
        wait_for(lambda: bool(first.update(_bench_workers(proc.pid)) or first), 30)
        time.sleep(0.3)  # every worker of the first run is forked by now (it measures 1 s)
        first |= _bench_workers(proc.pid)
        wait_for(lambda: bool(_bench_workers(proc.pid) - first), 30, what="the second run")
        time.sleep(0.5)  # into the second run's measuring
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        proc.kill()
        proc.communicate()


def test_ctrl_c_prints_the_finished_runs() -> None:
    r = interrupt_after_first_run(signal.SIGINT)
    assert r.returncode == 130, r
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "INTERRUPTED by SIGINT: runs finished: user 1 of 3 each; the run under way is not counted"
    ), r.stdout
    rate = next(line for line in lines if line.startswith("rate (req/s)"))
    assert int(rate.split()[-1].replace(",", "")) > 0
    assert r.stderr.strip().splitlines()[-1] == "echoctl: compare: interrupted by SIGINT"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_json_has_the_finished_runs(signum: int) -> None:
    r = interrupt_after_first_run(signum, "--json")
    assert r.returncode == 128 + signum, r
    out = json.loads(r.stdout)
    assert out["interrupted"] == signal.Signals(signum).name
    assert [(run["mode"], run["repeat"]) for run in out["runs"]] == [("user", 1)]
    assert out["summary"]["user"]["qps"] > 0
    assert out["summary"]["user"]["mismatches"] == 0
