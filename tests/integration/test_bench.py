"""`echoctl bench` and `echoctl compare` against real daemons and a deliberately broken server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from echoctl.benchcmd import bench, compare
from echoctl.compare import render_sweep, render_table
from tests.integration.conftest import Echod, free_port

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


class CorruptingServer:
    """An echo server that flips one bit of every chunk it sends back."""

    def __init__(self) -> None:
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
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(bytes([data[0] ^ 0x01]) + data[1:])
            except OSError:
                return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        for t in [self.accepting, *self.threads]:
            t.join(timeout=5)


@pytest.fixture
def corrupting_server() -> Iterator[CorruptingServer]:
    server = CorruptingServer()
    yield server
    server.close()


@pytest.mark.parametrize("pattern", ["pingpong", "stream"])
def test_corrupting_server_is_caught(corrupting_server: CorruptingServer, pattern: str) -> None:
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


@pytest.mark.parametrize(
    "args",
    [["--host", "192.0.2.1"], ["-c", "0"], ["--pattern", "stream", "-q", "100"], ["-s", "x"]],
)
def test_bad_input_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(bench, [*args, "-r", "1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


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
    for row in ("QPS", "latency p50", "latency p99", "CPU/1k req, softirq", "kernel vs user"):
        assert row in table
    assert "4096" in render_sweep(out)
    assert d.status()["mode"] == "kernel"  # compare left the daemon in the last mode run


def test_compare_spawns_its_own_daemon() -> None:
    args = ["--spawn", "--modes", "user", "--repeat", "2", "-c", "2", "-d", "0.3"]
    result = CliRunner().invoke(compare, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "QPS" in result.stdout
    assert "median of 2" in result.stdout
    assert "[2/2] user" in result.stderr


def test_compare_refuses_an_unknown_mode() -> None:
    result = CliRunner().invoke(compare, ["--spawn", "--modes", "user,turbo"])
    assert result.exit_code == 2
