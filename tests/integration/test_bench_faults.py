"""`echoctl bench` against deliberately broken servers: what it catches and how it reports it."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner

from echoctl.benchcmd import bench
from tests.integration.bench_util import FakeServer, Serve, fake_server, run_bench
from tests.integration.conftest import free_port


def corrupt(conn: socket.socket, index: int) -> None:
    """Flip one bit of every chunk sent back."""
    while data := conn.recv(65536):
        conn.sendall(bytes([data[0] ^ 0x01]) + data[1:])


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def receive_until(conn: socket.socket, end: float, handle: Callable[[bytes], object]) -> bool:
    """Hand what conn receives to handle until `end`; False when the peer closed first."""
    conn.settimeout(0.02)
    while time.monotonic() < end:
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return False
        handle(data)
    return True


def reset_first_after(delay: float) -> Serve:
    """Echo; reset the first connection `delay` seconds after it was accepted."""

    def serve(conn: socket.socket, index: int) -> None:
        deadline = time.monotonic() + delay if index == 0 else float("inf")
        if receive_until(conn, deadline, conn.sendall):
            reset(conn)

    return serve


def echo_then_swallow(limit: int, reset_after: float | None = None) -> Serve:
    """Echo the first `limit` bytes, then read and drop; reset `reset_after` s after accept."""

    def serve(conn: socket.socket, index: int) -> None:
        end = time.monotonic() + (reset_after if reset_after is not None else 60.0)
        echoed = 0

        def echo_some(data: bytes) -> None:
            nonlocal echoed
            if echoed < limit:
                conn.sendall(data[: limit - echoed])
                echoed += len(data)

        if receive_until(conn, end, echo_some):
            reset(conn)

    return serve


def echo_twice(conn: socket.socket, index: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data + data)


@pytest.fixture
def corrupting_server() -> Iterator[FakeServer]:
    with fake_server(corrupt) as server:
        yield server


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


@pytest.mark.parametrize("pattern", ["pingpong", "stream"])
def test_a_mismatch_names_its_stream_offset(pattern: str) -> None:
    with fake_server(corrupt_at(100_003)) as server:
        args = ["--port", str(server.port), "-c", "2", "-s", "1-4096", "--pattern", pattern]
        code, r = run_bench(*args, "-d", "1", "--pipeline", "4")
    assert code == 1
    assert r["mismatches"] == 2
    assert sorted(m["offset"] for m in r["mismatch_details"]) == [100_003, 100_003]
