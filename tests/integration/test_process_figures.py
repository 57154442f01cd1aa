"""The daemon's process figures in `stats`: CPU share over the last tick, every process."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import psutil
import pytest

from tests.integration.conftest import Echod


def _load(port: int, until: float) -> None:
    """Ping-pong 16 KiB until `until` (monotonic), every echo checked."""
    payload = os.urandom(16384)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while time.monotonic() < until:
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "the daemon closed the connection"
                got += chunk
            assert got == payload


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cpu_percent_under_load_agrees_with_psutil(
    echod_factory: Callable[..., Echod], workers: str
) -> None:
    d = echod_factory(mode="user", args=["--workers", workers])
    supervisor = psutil.Process(d.proc.pid)
    procs = [supervisor, *supervisor.children()]
    assert len(procs) == (1 if workers == "1" else 3)
    until = time.monotonic() + 8
    clients = [threading.Thread(target=_load, args=(d.port, until)) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(2.5)  # past a tick or two of load
        agreed = []
        for _ in range(3):  # three windows of 1.5 s; the figure is over the daemon's last tick
            t0, c0 = time.monotonic(), _cpu_seconds(procs)
            time.sleep(1.5)
            t1, c1 = time.monotonic(), _cpu_seconds(procs)
            reported = d.stats()["process"]
            measured = (c1 - c0) / (t1 - t0) * 100
            assert measured > 10, f"the load did not load the daemon ({measured:.1f} %)"
            agreed.append((reported["cpu_percent"], round(measured, 1)))
    finally:
        for t in clients:
            t.join()
    # Each reading within ±25 % of psutil's total for the same processes (at least two of
    # three: the tick and the window are not the same second).
    close = [abs(r - m) <= 0.25 * m for r, m in agreed]
    assert sum(close) >= 2, agreed


def test_stats_lists_every_process_and_sums_them(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user", args=["--workers", "2"])
    stats = d.stats()
    procs = stats["processes"]
    assert [p["worker"] for p in procs] == ["supervisor", "0", "1"]
    pids = {p.pid for p in psutil.Process(d.proc.pid).children()}
    assert len(pids) == 2
    total = stats["process"]
    assert total["processes"] == 3
    assert total["rss_bytes"] == sum(p["rss_bytes"] for p in procs)
    assert total["open_fds"] == sum(p["open_fds"] for p in procs)
    # CPU seconds are rounded to the microsecond, never float noise.
    for fig in [total, *procs]:
        assert fig["cpu_user_s"] == round(fig["cpu_user_s"], 6)
