"""Interrupting `echoctl bench` and `compare`: workers and daemons stop, results print; progress."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from echoctl.client import ControlClient
from tests.integration.bench_util import echo, fake_server
from tests.integration.echo_util import wait_for
from tests.util import log_events


def children(pid: int) -> dict[int, str]:
    """Return the direct children of `pid` with their command lines."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out[int(entry)] = cmdline.decode(errors="replace")
    return out


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's init may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def daemon_connections(control: str) -> int:
    """The daemon's open echo connections, or 0 while its control socket does not answer."""
    try:
        with ControlClient(control, timeout=5) as client:
            return int(client.call("status")["connections"])
    except OSError:
        return 0


def echoctl_command(command: str, *args: str) -> list[str]:
    script = f"from echoctl.benchcmd import {command}; {command}()"
    return [sys.executable, "-c", script, *args]


def start_long_compare(
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], queue.Queue[str], threading.Thread]:
    """A 30 s `compare --spawn` in user mode, a queue of its stderr lines, and their reader."""
    cmd = echoctl_command("compare", "--spawn", "--modes", "user", "--repeat", "1", "-c", "2")
    proc = subprocess.Popen(
        [*cmd, "-d", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stderr or ():
            lines.put(line.decode())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


def start_bench(port: int, *args: str) -> subprocess.Popen[str]:
    cmd = echoctl_command("bench", "--port", str(port), "-c", "2", "--workers", "2", *args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_the_bench_workers() -> None:
    with fake_server(echo) as server:
        cmd = echoctl_command("bench", "--port", str(server.port), "-c", "2", "--workers", "2")
        proc = subprocess.Popen([*cmd, "-d", "30"], stdout=subprocess.DEVNULL)
        workers: dict[int, str] = {}
        try:
            wait_for(lambda: len(children(proc.pid)) >= 2, 10, what="two bench workers")
            workers = children(proc.pid)
            assert len(workers) >= 2
            wait_for(lambda: len(server.conns) >= 2, what="the workers to connect")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 128 + signal.SIGTERM
            wait_for(lambda: not any(running(w) for w in workers), 5, what="the workers to exit")
        finally:
            proc.kill()
            proc.wait()
            for w in workers or {}:  # if the test failed, leave no orphan loading the machine
                if running(w):
                    os.kill(w, signal.SIGKILL)


def test_sigterm_stops_the_spawned_daemon() -> None:
    proc, lines, reader = start_long_compare()
    daemons: list[int] = []
    try:
        control = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("starting "):
                control = line.split("--control ")[1].strip()
            if line.startswith("[1/1]"):
                break
        daemons = [pid for pid, cmdline in children(proc.pid).items() if "echod" in cmdline]
        assert control
        assert len(daemons) == 1
        wait_for(lambda: daemon_connections(control) >= 2, what="the bench to connect")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        wait_for(lambda: not running(daemons[0]), 5, what="the spawned daemon to exit")
        assert not Path(control).parent.exists()
    finally:
        proc.kill()
        proc.wait()
        for pid in daemons:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("signum", "status", "pattern"),
    [
        (signal.SIGINT, 130, "pingpong"),
        (signal.SIGTERM, 143, "pingpong"),
        (signal.SIGINT, 130, "stream"),
    ],
)
def test_a_signal_prints_what_was_measured(signum: int, status: int, pattern: str) -> None:
    with fake_server(echo) as server:
        proc = start_bench(server.port, "--pattern", pattern, "-s", "1-4096", "-d", "30", "-j")
        try:
            wait_for(lambda: len(server.conns) >= 2, what="the bench to connect")
            time.sleep(1.0)  # measuring for a while: the reported duration is checked
            sent = time.monotonic()
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=15)
            took = time.monotonic() - sent
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert took < 3
    r = json.loads(out)
    assert r["interrupted"] == signal.Signals(signum).name
    assert r["requests"] > 0
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert 0.5 < r["duration_s"] < 5


def test_human_interrupted_report_is_marked() -> None:
    echoed = [0, 0]

    def counting_echo(conn: socket.socket, index: int) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
            echoed[index] += len(data)

    with fake_server(counting_echo) as server:
        proc = start_bench(server.port, "-d", "30")
        try:
            # Requests flow only once the run has started: a signal now stops a measuring run.
            wait_for(lambda: all(echoed), what="requests on both connections")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert out.startswith("load (interrupted)")
    assert "2 workers" in out
    assert "interrupted by SIGINT" in err


def test_progress_is_one_line_per_interval() -> None:
    with fake_server(echo) as server:
        cmd = echoctl_command("bench", "--port", str(server.port), "-c", "4", "--workers", "2")
        line = shlex.join([*cmd, "-d", "3.5"])
        # A terminal on stderr turns progress on; `script` provides one.
        r = subprocess.run(
            ["script", "-qec", line, "/dev/null"], capture_output=True, text=True, timeout=60
        )
    assert r.returncode == 0, r
    ticks = [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip().endswith(" µs")]
    ticks = [t for t in ticks if t.replace(".", "").isdigit()]
    assert ticks == ["1.0", "2.0", "3.0"]


def test_compare_stops_at_once_on_sigint() -> None:
    # What could end the run on its own takes far longer than the wait below: the measurement
    # (30 s) and, through the environment the spawned daemon inherits, its shutdown grace
    # (60 s; echoctl kills a daemon that takes 20 s). So an exit within that wait means
    # nothing was waited out.
    env = {**os.environ, "ECHOD_SHUTDOWN_GRACE": "60"}
    proc, lines, reader = start_long_compare(env)
    log = None
    try:
        control = ""
        deadline = time.monotonic() + 30
        while not (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))).startswith(
            "[1/1]"
        ):
            if line.startswith("starting "):
                control = line.split("--control ")[1].strip()
        assert control
        daemons = [pid for pid, cmdline in children(proc.pid).items() if "echod" in cmdline]
        assert len(daemons) == 1
        # The daemon's log, kept readable after compare removes its directory.
        log = open(f"/proc/{daemons[0]}/fd/1", errors="replace")
        wait_for(lambda: daemon_connections(control) >= 2, what="the bench to connect")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        events = log_events(log.read())
        assert "service.stopped" in events
        assert "conn.drain_timeout" not in events
    finally:
        if log is not None:
            log.close()
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
