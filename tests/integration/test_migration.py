"""Live mode switches (`restart --mode`) with traffic in flight: no byte lost, none doubled."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import Echod
from tests.integration.echo_util import (
    connect,
    recv_exact,
    roundtrip,
    send_without_reading,
    wait_for,
)

DURATION = 6.0


class PingPong(threading.Thread):
    """Ping-pong random messages until stopped; records any mismatch."""

    def __init__(self, port: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.stop_at = time.monotonic() + DURATION * 3
        self.halt = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect("127.0.0.1", self.port) as sock:
                while not self.halt.is_set() and time.monotonic() < self.stop_at:
                    payload = os.urandom(self.size)
                    sock.sendall(payload)
                    if recv_exact(sock, len(payload)) != payload:
                        raise AssertionError(f"mismatch after {self.rounds} rounds")
                    self.rounds += 1
        except BaseException as exc:
            self.error = exc


class Streamer(threading.Thread):
    """Keeps many messages in flight (a pipelined stream) and checks the echoed stream."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.sent = bytearray()
        self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect("127.0.0.1", self.port) as sock:
                reader = threading.Thread(target=self._read, args=(sock,), daemon=True)
                reader.start()
                deadline = time.monotonic() + DURATION * 3
                while not self.halt.is_set() and time.monotonic() < deadline:
                    chunk = os.urandom(8192)
                    self.sent += chunk
                    sock.sendall(chunk)
                    time.sleep(0.0005)  # pacing: a steady stream, not one burst
                sock.shutdown(socket.SHUT_WR)
                reader.join(20)
                if reader.is_alive():
                    raise AssertionError("the reader did not see the end of the echo")
                if self.received != len(self.sent):
                    raise AssertionError(f"received {self.received} of {len(self.sent)} bytes")
        except BaseException as exc:
            self.error = exc

    def _read(self, sock: socket.socket) -> None:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            expected = bytes(self.sent[self.received : self.received + len(chunk)])
            if chunk != expected:
                self.error = AssertionError(f"stream differs at byte {self.received}")
                return
            self.received += len(chunk)


@pytest.mark.bpf
def test_restart_switches_modes_under_traffic(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user")
    clients: list[PingPong | Streamer] = [PingPong(d.port, s) for s in (1, 64, 1500, 30000)]
    clients.append(Streamer(d.port))
    for c in clients:
        c.start()
    wait_for(lambda: d.status()["connections"] == len(clients), what="the clients to connect")
    sequence = ["kernel", "user", "kernel", "user", "kernel"]
    seen = []
    for mode in sequence:
        st = d.call("restart", {"mode": mode})
        assert st["mode"] == mode
        assert st["connections"] == len(clients), "a connection was dropped by the switch"
        seen.append((st["connections_by_path"], st["migration"]))
        time.sleep(DURATION / len(sequence))  # traffic runs on each path for a while
    for c in clients:
        c.halt.set()
    for c in clients:
        c.join(30)
        assert not c.is_alive(), "client hung"
        assert c.error is None, repr(c.error)
    assert all(c.rounds > 10 for c in clients if isinstance(c, PingPong))
    n = len(clients)
    # user -> kernel moves every connection into the map; kernel -> user leaves them there
    # (they keep the kernel path until they close), so later switches move nothing.
    assert seen[0] == ({"kernel": n, "user": 0}, {"moved": n, "stayed": 0})
    assert seen[1] == ({"kernel": n, "user": 0}, {"moved": 0, "stayed": n})
    assert seen[2] == ({"kernel": n, "user": 0}, {"moved": 0, "stayed": 0})
    stats = d.stats()
    assert stats["user"]["bytes"] > 0
    assert stats["kernel"]["redirected_bytes"] > 0


@pytest.mark.bpf
def test_new_connections_follow_the_mode_and_old_ones_keep_their_path(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as old:
        roundtrip(old, b"abc")
        st = d.call("restart", {"mode": "user"})
        assert st["migration"] == {"moved": 0, "stayed": 1}
        assert st["bpf"]["attached"], "BPF unloaded under a kernel-path connection"
        before = d.stats()
        with connect("::1", d.port) as new:
            roundtrip(new, os.urandom(5000))
            roundtrip(old, os.urandom(7000))
            assert d.status()["connections_by_path"] == {"kernel": 1, "user": 1}
        after = d.stats()
        assert after["user"]["bytes"] - before["user"]["bytes"] == 5000
        assert after["kernel"]["redirected_bytes"] - before["kernel"]["redirected_bytes"] == 7000
    wait_for(lambda: not d.status()["bpf"]["attached"], what="BPF to unload after the last close")


@pytest.mark.bpf
def test_restart_with_a_peer_that_never_reads_stays_bounded(
    echod_factory: Callable[..., Echod],
) -> None:
    """A user-path peer that never reads cannot be moved (its buffer never drains); flow
    control must still hold, and the switch must finish within its deadline."""
    d = echod_factory(mode="user")
    with connect("127.0.0.1", d.port) as hog:
        send_without_reading(hog, 1 << 40, seconds=3.0)  # fill until pushed back
        rss_before = d.stats()["process"]["rss_bytes"]
        began = time.monotonic()
        st = d.call("restart", {"mode": "kernel"})
        assert time.monotonic() - began < 10
        assert st["connections_by_path"] == {"kernel": 0, "user": 1}
        pushed, _ = send_without_reading(hog, 64 * 1024 * 1024, seconds=3.0)
        assert pushed < 16 * 1024 * 1024, "flow control was lost by the failed migration"
        assert d.stats()["process"]["rss_bytes"] - rss_before < 32 * 1024 * 1024


@pytest.mark.bpf
def test_stop_drains_a_kernel_path_connection_kept_across_a_switch(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"abc")
        d.call("restart", {"mode": "user"})
        roundtrip(sock, b"defg")
        began = time.monotonic()
        d.call("stop")
        assert time.monotonic() - began < 2.0, "stop waited out the grace period"
        assert sock.recv(1) == b""
