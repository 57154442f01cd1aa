"""`echoctl bench` and `echoctl compare` against real daemons and a deliberately broken server."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from echoctl import benchcmd
from echoctl.bench.config import BenchConfig
from echoctl.benchcmd import bench, compare
from echoctl.client import ControlClient
from echoctl.compare import CompareError
from echoctl.compare import _bench as compare_one
from echoctl.comparerender import render_sweep, render_table
from tests.integration.conftest import Echod, free_port
from tests.integration.echo_util import wait_for

CONTRACT = ("qps", "requests", "errors", "mismatches", "latency_us")
LATENCY_KEYS = ("avg", "p50", "p90", "p99", "p999", "max")
REPORT_KEYS = (
    "connect_us",
    "short_reads",
    "resets",
    "timeouts",
    "bytes_sent",
    "bytes_received",
    "duration_s",
    "connections",
    "size",
    "pattern",
    "cpu",
)

Factory = Callable[..., Echod]


def run_bench(*args: str) -> tuple[int, dict[str, Any]]:
    """Invoke `bench --json ...`; return the exit code and the parsed object."""
    result = CliRunner().invoke(bench, [*args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def target(d: Echod) -> list[str]:
    return ["--host", d.host, "--port", str(d.port), "--control", d.control]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_bench_json_has_every_key_and_no_mismatch(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "-c", "4", "-s", "64", "-d", "1")
    assert code == 0, r
    for key in CONTRACT + REPORT_KEYS:
        assert key in r, key
    for key in LATENCY_KEYS:
        assert r["latency_us"][key] >= 0
        assert key in r["connect_us"]
    assert r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"]
    assert r["requests"] > 100
    assert r["errors"] == r["mismatches"] == 0
    assert r["bytes_sent"] == r["bytes_received"] == r["requests"] * 64
    assert r["qps"] == pytest.approx(r["requests"] / r["duration_s"], rel=0.01)
    assert {"user_s", "system_s"} <= r["cpu"]["client"].keys()
    assert {"user", "system", "softirq", "idle"} <= r["cpu"]["machine"].keys()
    assert r["server"]["mode"] == mode
    assert {"cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary"} <= r["server"].keys()


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_churn_opens_a_connection_per_request(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    before = d.stats()["connections"]["accepted"]
    args = ["-c", "4", "--workers", "2", "-r", "300", "-s", "1000", "--pattern", "crr"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    assert r["requests"] == 1200
    assert r["errors"] == r["mismatches"] == 0
    assert r["bytes_verified"] == r["bytes_received"] == 1200 * 1000
    assert r["conn_per_s"] == r["qps"] > 0
    # Every request had its own connection (each worker also opens one to check the target).
    wait_for(lambda: d.stats()["connections"]["active"] == 0, what="the daemon to see the closes")
    stats = d.stats()
    assert stats["connections"]["accepted"] - before == 1200 + 2
    assert stats["connections"]["closed"] == stats["connections"]["accepted"]


def test_churn_catches_a_corrupting_server(corrupting_server: FakeServer) -> None:
    port = str(corrupting_server.port)
    code, r = run_bench("--port", port, "-c", "2", "-r", "50", "--pattern", "crr")
    assert code == 1
    assert r["mismatches"] == r["requests"] == 100


def test_churn_human_report_shows_connections_per_second(corrupting_server: FakeServer) -> None:
    args = ["--port", str(corrupting_server.port), "-c", "1", "-r", "5", "--pattern", "crr"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 1
    assert "conn/s" in result.stdout
    assert "5 opened, echoed and closed" in result.stdout
    assert "5 mismatches" in result.stderr


@pytest.mark.bpf
def test_bench_by_rounds_counts_exactly(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel")
    code, r = run_bench(*target(d), "-c", "3", "-r", "500", "-s", "1000", "--workers", "2")
    assert code == 0
    assert r["requests"] == 1500
    assert r["mismatches"] == 0


def test_rate_is_held(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    code, r = run_bench(*target(d), "-c", "10", "-s", "64", "-q", "2000", "-d", "2")
    assert code == 0
    assert r["qps"] == pytest.approx(2000, rel=0.02)
    assert r["target_qps"] == 2000
    assert set(LATENCY_KEYS) <= r["latency_raw_us"].keys()
    # Measured from the intended send time, latency can only be longer than from the real one.
    assert r["latency_us"]["avg"] >= r["latency_raw_us"]["avg"]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_stream_moves_bytes_both_ways(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "--pattern", "stream", "-c", "2", "-s", "4096", "-d", "1")
    assert code == 0, r
    assert r["pattern"] == "stream"
    assert r["bytes_sent"] > 1_000_000
    assert r["bytes_received"] > 1_000_000
    assert r["mb_per_s_sent"] > 0
    assert r["mb_per_s_received"] > 0
    assert r["mismatches"] == r["errors"] == 0


Serve = Callable[[socket.socket, int], None]


class FakeServer:
    """A loopback server that runs `serve(conn, index)` in a thread per accepted connection."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn, len(self.conns) - 1), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            self.serve(conn, index)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            conn.close()
        for t in [self.accepting, *self.threads]:
            t.join(timeout=5)


def echo(conn: socket.socket, index: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def corrupt(conn: socket.socket, index: int) -> None:
    """Flip one bit of every chunk sent back."""
    while data := conn.recv(65536):
        conn.sendall(bytes([data[0] ^ 0x01]) + data[1:])


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def reset_first_after(delay: float) -> Serve:
    """Echo; reset the first connection `delay` seconds after it was accepted."""

    def serve(conn: socket.socket, index: int) -> None:
        deadline = time.monotonic() + delay if index == 0 else float("inf")
        conn.settimeout(0.02)
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            conn.sendall(data)
        reset(conn)

    return serve


def echo_then_swallow(limit: int, reset_after: float | None = None) -> Serve:
    """Echo the first `limit` bytes, then read and drop; reset `reset_after` s after accept."""

    def serve(conn: socket.socket, index: int) -> None:
        end = time.monotonic() + (reset_after if reset_after is not None else 60.0)
        echoed = 0
        conn.settimeout(0.02)
        while time.monotonic() < end:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            if echoed < limit:
                conn.sendall(data[: limit - echoed])
                echoed += len(data)
        reset(conn)

    return serve


def echo_twice(conn: socket.socket, index: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data + data)


@contextlib.contextmanager
def fake_server(serve: Serve) -> Iterator[FakeServer]:
    server = FakeServer(serve)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def corrupting_server() -> Iterator[FakeServer]:
    with fake_server(corrupt) as server:
        yield server


@pytest.mark.parametrize("pattern", ["pingpong", "stream"])
def test_corrupting_server_is_caught(corrupting_server: FakeServer, pattern: str) -> None:
    port = str(corrupting_server.port)
    code, r = run_bench("--port", port, "-c", "2", "-s", "256", "-d", "0.5", "--pattern", pattern)
    assert code == 1
    assert r["mismatches"] > 0
    if pattern == "pingpong":
        assert r["mismatches"] == r["requests"]


def test_unreachable_server_is_one_line() -> None:
    result = CliRunner().invoke(bench, ["--port", str(free_port()), "-r", "1"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot connect" in lines[0]


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


def test_compare_spawns_its_own_daemon() -> None:
    args = ["--spawn", "--modes", "user", "--repeat", "2", "-c", "2", "-d", "0.3"]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "req/s" in result.stdout
    assert "median of 2" in result.stdout
    assert "[2/2] user" in result.stderr


def test_json_failure_prints_an_error_object() -> None:
    result = CliRunner().invoke(bench, ["--port", str(free_port()), "-r", "1", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "failed"


def test_reset_during_warmup_fails_the_run() -> None:
    with fake_server(reset_first_after(0.2)) as server:
        args = ["--port", str(server.port), "-c", "2", "--workers", "1"]
        code, r = run_bench(*args, "-d", "0.3", "--warmup", "0.6")
    assert code == 1
    assert r["warmup_errors"] == 1
    assert (r["connections_alive"], r["connections"]) == (1, 2)
    assert r["requests"] > 0


@pytest.mark.parametrize(
    ("serve", "counters"),
    [
        (echo_then_swallow(65536), ("stalled",)),  # echoes never come back
        (echo_then_swallow(65536, reset_after=0.8), ("resets",)),  # reset while draining
        # Every segment twice: the copy is caught as a mismatch where it lands in the stream,
        # or as extra bytes when nothing more was owed.
        (echo_twice, ("mismatches", "other_errors")),
    ],
)
def test_stream_counts_what_never_came_back(serve: Serve, counters: tuple[str, ...]) -> None:
    with fake_server(serve) as server:
        args = ["--port", str(server.port), "--pattern", "stream", "-c", "2", "-s", "1024"]
        code, r = run_bench(*args, "-d", "0.3", "--stall-timeout", "2")
    assert code == 1
    assert sum(r[c] for c in counters) == 2
    assert r["errors"] + r["stalled"] + r["mismatches"] == 2
    assert r["connections_alive"] == 0


def test_warmup_does_not_lower_the_rate(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    args = ["-c", "4", "-q", "2000", "-d", "0.5", "--warmup", "0.55"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    # The switch to measuring used to come at the next 100 ms check, losing those requests.
    assert r["qps"] == pytest.approx(2000, rel=0.03)


def test_paced_payloads_rotate_on_every_request() -> None:
    size = 32
    repeats: list[int] = []

    def check(conn: socket.socket, index: int) -> None:
        pending, last = b"", b""
        while data := conn.recv(65536):
            pending += data
            while len(pending) >= size:
                message, pending = pending[:size], pending[size:]
                if message == last:
                    repeats.append(index)
                last = message
                conn.sendall(message)

    with fake_server(check) as server:
        # Faster than the server answers, so batches wrap round to connections already served.
        args = ["--port", str(server.port), "-c", "3", "-s", str(size), "-q", "20000"]
        code, r = run_bench(*args, "-d", "0.3")
    assert code == 0, r
    assert r["requests"] > 100
    assert repeats == []


def test_bench_takes_the_port_from_the_control_socket(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    code, r = run_bench("--control", d.control, "-c", "2", "-d", "0.3")
    assert code == 0, r
    assert r["server"]["mode"] == "user"
    assert r["server"]["connections_by_path"]["user"] >= 2
    wrong = str(free_port())
    result = CliRunner().invoke(bench, ["--control", d.control, "--port", wrong, "-r", "1"])
    assert result.exit_code == 1
    assert "is not the port of the daemon" in result.stderr


def test_compare_refuses_a_port_its_daemon_does_not_serve(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    args = ["--control", d.control, "--modes", "user", "--repeat", "1", "-c", "2", "-d", "0.3"]
    result = CliRunner().invoke(compare, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["runs"][0]["report"]
    assert report["server"]["connections_by_path"]["user"] >= 2
    result = CliRunner().invoke(compare, [*args, "--port", str(free_port()), "--json"])
    assert result.exit_code == 1
    assert "is not the port" in json.loads(result.stdout)["error"]["message"]


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


def start_long_compare() -> tuple[subprocess.Popen[bytes], queue.Queue[str], threading.Thread]:
    """A 30 s `compare --spawn` in user mode, a queue of its stderr lines, and their reader."""
    cmd = echoctl_command("compare", "--spawn", "--modes", "user", "--repeat", "1", "-c", "2")
    proc = subprocess.Popen([*cmd, "-d", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stderr or ():
            lines.put(line.decode())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


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


# ---------------------------------------------------------------------------------------------
# Soak features: random sizes, pipelining, long byte-checked streams, the stall detector


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_random_sizes_are_byte_checked(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    code, r = run_bench(*target(d), "-c", "4", "-s", "1-1048576", "-d", "1.5")
    assert code == 0, r
    assert (r["size"], r["size_min"], r["size_max"]) == ("1-1048576", 1, 1048576)
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["requests"] > 50
    # Every byte sent in the measured window came back and was compared at its offset.
    assert r["bytes_verified"] == r["bytes_sent"] > 0
    # Log-uniform: the mean message is far below the range's midpoint (512 KiB).
    assert r["bytes_sent"] / r["requests"] < 256 * 1024


def batching(batch: int) -> Serve:
    """Echo only in whole batches of `batch` bytes: a client with fewer in flight would stall."""

    def serve(conn: socket.socket, index: int) -> None:
        held = b""
        while data := conn.recv(65536):
            held += data
            cut = len(held) - len(held) % batch
            if cut:
                conn.sendall(held[:cut])
                held = held[cut:]

    return serve


def test_pipeline_keeps_n_messages_in_flight() -> None:
    with fake_server(batching(16 * 64)) as server:
        args = ["--port", str(server.port), "-c", "3", "-s", "64", "--workers", "1"]
        code, r = run_bench(*args, "--pipeline", "16", "-r", "1600", "--stall-timeout", "2")
        assert code == 0, r
        assert r["requests"] == 3 * 1600
        assert r["pipeline"] == 16
        assert r["bytes_verified"] == r["bytes_sent"] == 3 * 1600 * 64
        # One message in flight never fills a batch: every connection stalls.
        code, r = run_bench(*args, "-r", "10", "--stall-timeout", "0.5")
    assert code == 1
    assert r["stalled"] == 3


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_pipelined_random_sizes_against_the_daemon(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    args = ["-c", "4", "-s", "1-65536", "--pipeline", "8", "-r", "300", "--seed", "7"]
    code, r = run_bench(*target(d), *args)
    assert code == 0, r
    assert r["requests"] == 4 * 300
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["bytes_verified"] == r["bytes_sent"] == r["bytes_received"]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_stream_soak_checks_every_byte(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    args = ["--pattern", "stream", "-c", "4", "-s", "1-1M", "--window", "1M"]
    started = time.monotonic()
    code, r = run_bench(*target(d), *args, "-d", "3", "--stall-timeout", "3")
    assert time.monotonic() - started < 30
    assert code == 0, r
    assert r["errors"] == r["mismatches"] == r["stalled"] == 0
    assert r["connections_alive"] == 4
    assert r["window_bytes"] == 1 << 20
    assert r["bytes_verified"] == r["bytes_sent"] > 10_000_000
    assert r["mb_per_s_sent"] > 0
    assert r["mb_per_s_received"] > 0


@pytest.mark.parametrize("pattern", ["pingpong", "stream"])
@pytest.mark.parametrize("sizes", ["64", "1-65536"])
def test_a_stall_is_detected(pattern: str, sizes: str) -> None:
    # The server echoes the first 64 KiB, then reads and drops: the connections stall.
    with fake_server(echo_then_swallow(65536, reset_after=20)) as server:
        args = ["--port", str(server.port), "-c", "2", "-s", sizes, "--pattern", pattern]
        started = time.monotonic()
        code, r = run_bench(*args, "-d", "4", "--stall-timeout", "1")
        took = time.monotonic() - started
    assert code == 1
    assert r["stalled"] == 2
    assert r["errors"] == r["mismatches"] == 0
    assert r["connections_alive"] == 0
    assert took < 15
    if sizes != "64" or pattern == "stream":
        details = r["stall_details"]
        assert len(details) == 2
        assert all(s["sent"] > s["received"] >= 0 and s["idle_s"] >= 1 for s in details)


def corrupt_at(offset: int) -> Serve:
    """Echo, but flip one bit of the byte at stream `offset`."""

    def serve(conn: socket.socket, index: int) -> None:
        seen = 0
        while data := conn.recv(65536):
            if seen <= offset < seen + len(data):
                i = offset - seen
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
            seen += len(data)
            conn.sendall(data)

    return serve


@pytest.mark.parametrize("pattern", ["pingpong", "stream"])
def test_a_mismatch_names_its_stream_offset(pattern: str) -> None:
    with fake_server(corrupt_at(100_003)) as server:
        args = ["--port", str(server.port), "-c", "2", "-s", "1-4096", "--pattern", pattern]
        code, r = run_bench(*args, "-d", "1", "--pipeline", "4")
    assert code == 1
    assert r["mismatches"] == 2
    assert sorted(m["offset"] for m in r["mismatch_details"]) == [100_003, 100_003]


# ---------------------------------------------------------------------------------------------
# Interruption, progress, and a target beyond loopback


def start_bench(port: int, *args: str) -> subprocess.Popen[str]:
    cmd = echoctl_command("bench", "--port", str(port), "-c", "2", "--workers", "2", *args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def test_compare_stops_within_a_second() -> None:
    proc, lines, reader = start_long_compare()
    try:
        control = ""
        deadline = time.monotonic() + 30
        while not (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))).startswith(
            "[1/1]"
        ):
            if line.startswith("starting "):
                control = line.split("--control ")[1].strip()
        assert control
        wait_for(lambda: daemon_connections(control) >= 2, what="the bench to connect")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        assert time.monotonic() - sent < 1.0
    finally:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


@contextlib.contextmanager
def veth_namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair in 198.18.0.0/15.

    Yields (namespace, host address, namespace address); everything is removed afterwards.
    """
    n = os.getpid()
    ns, veth = f"echod-bench-{n}", f"eb{n % 10**8}"
    # A /30 of its own per test process, so that concurrent runs do not collide.
    base = f"198.18.{n % 256}.{4 * ((n >> 8) % 64)}"
    prefix, last = base.rsplit(".", 1)
    host_ip, ns_ip = f"{prefix}.{int(last) + 1}", f"{prefix}.{int(last) + 2}"
    try:
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        ip("link", "del", veth, check=False)
        ip("netns", "del", ns, check=False)


def test_bench_measures_a_daemon_beyond_loopback(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with veth_namespace() as (ns, _host_ip, ns_ip):
        port = free_port()
        control = str(tmp_path / "control.sock")
        echod = str(Path(sys.executable).parent / "echod")
        argv = ["ip", "netns", "exec", ns, echod, "--mode", "user", "--host", ns_ip]
        log = open(tmp_path / "echod.log", "wb")  # noqa: SIM115 - closed in finally
        proc = subprocess.Popen(
            [*argv, "--port", str(port), "--control", control], stdout=log, stderr=log
        )
        try:
            wait_for(lambda: os.path.exists(control), 15, what="the daemon's control socket")
            args = ["--host", ns_ip, "--port", str(port), "--control", control]
            code, r = run_bench(*args, "-c", "4", "-d", "1")
            assert code == 0, (r, (tmp_path / "echod.log").read_text())
            assert r["errors"] == r["mismatches"] == r["stalled"] == 0
            assert r["requests"] > 100
            assert r["server"]["mode"] == "user"
            code, r = run_bench(*args, "-c", "2", "-s", "1-65536", "--pattern", "stream", "-d", "1")
            assert code == 0, r
            assert r["bytes_verified"] == r["bytes_sent"] > 0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
