"""The flags for allow, max_connections_per_ip and shutdown_grace, on a real daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

from tests.integration.conftest import Echod
from tests.integration.echo_util import (
    connect,
    roundtrip,
    send_then_reset,
    send_without_reading,
    wait_for,
)

GRACE = 1.0


def from_address(source: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), 10, (source, 0))


def test_allow_and_per_ip_flags(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(
        mode="user",
        args=["--allow", "127.0.0.2/32,127.0.0.3", "--max-connections-per-ip", "1"],
        hosts=("127.0.0.1",),
    )
    with connect("127.0.0.1", d.port) as outside:
        assert outside.recv(1) == b"", "an address outside --allow was served"
    with from_address("127.0.0.2", d.port) as first, from_address("127.0.0.3", d.port) as other:
        roundtrip(first, b"allowed")
        roundtrip(other, b"allowed too")
        with from_address("127.0.0.2", d.port) as second:
            assert second.recv(1) == b"", "--max-connections-per-ip 1 let a second one in"
    refused = d.stats()["connections"]["refused"]
    assert (refused["allow"], refused["per_ip"]) == (1, 1)


def test_allow_with_peers_reset_before_the_accept(echod_factory: Callable[..., Echod]) -> None:
    """A peer gone before the accept has no address to check: it is dropped, not let in as
    "unknown" (which the allow check cannot parse), and nothing is logged as an error."""
    d = echod_factory(mode="user", args=["--allow", "127.0.0.0/8"], hosts=("127.0.0.1",))
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"served")  # uvloop's server accepts from now on
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(20):
            send_then_reset("127.0.0.1", d.port)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(4096))
    wait_for(lambda: d.status()["connections"] == 0, what="connections to close")
    assert d.stats()["connections"]["refused"]["allow"] == 0
    log = d.log()
    assert "Traceback" not in log, log
    assert "ValueError" not in log, log


def test_shutdown_grace_flag_bounds_the_stop(echod_factory: Callable[..., Echod]) -> None:
    """A client that never reads holds its connection for --shutdown-grace, then no longer."""
    d = echod_factory(mode="user", args=["--shutdown-grace", str(GRACE)], hosts=("127.0.0.1",))
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(connect("127.0.0.1", d.port))
        sent, how = send_without_reading(sock, 8 << 20, 2)
        assert how in ("limit", "deadline"), (sent, how)
        wait_for(lambda: d.status()["connections"] == 1, what="the connection to be counted")
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        took = time.monotonic() - started
    assert GRACE * 0.9 <= took < GRACE + 4, took
