"""Clients that keep traffic in flight while the daemon changes under them; every byte checked."""

from __future__ import annotations

import os
import socket
import threading
import time

from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, recv_exact, roundtrip, send_without_reading

DURATION = 6.0


class PingPong(threading.Thread):
    """Ping-pong random messages until stopped; records any mismatch.

    With `churn`, each round is a new connection that sends right after connect, with
    messages of 1 to `size` bytes.
    """

    def __init__(self, port: int, size: int, churn: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.size, self.churn = port, size, churn
        self.stop_at = time.monotonic() + DURATION * 3
        self.halt = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def _going(self) -> bool:
        return not self.halt.is_set() and time.monotonic() < self.stop_at

    def run(self) -> None:
        try:
            while self._going():
                with connect("127.0.0.1", self.port) as sock:
                    while self._going():
                        size = 1 + self.rounds % self.size if self.churn else self.size
                        payload = os.urandom(size)
                        sock.sendall(payload)
                        if recv_exact(sock, len(payload)) != payload:
                            raise AssertionError(f"mismatch after {self.rounds} rounds")
                        self.rounds += 1
                        if self.churn:
                            break
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


def finish(clients: list[PingPong | Streamer]) -> None:
    """Stop the clients; each must end in time, with every byte it was sent echoed exactly."""
    for c in clients:
        c.halt.set()
    for c in clients:
        c.join(30)
        assert not c.is_alive(), "client hung"
        assert c.error is None, repr(c.error)


def assert_never_reader_bounded(daemon: Echod) -> None:
    """A peer that sends 256 MiB without reading: pushed back (user) or reset (kernel), while
    another connection is served and the daemon's memory stays bounded."""
    rss_before = daemon.stats()["process"]["rss_bytes"]
    aborted_before = daemon.stats()["connections"]["aborted_backlog"]
    with connect("127.0.0.1", daemon.port) as other:
        with connect("127.0.0.1", daemon.port) as hog:
            sent, outcome = send_without_reading(hog, 256 * 1024 * 1024, seconds=5.0)
        for _ in range(20):
            roundtrip(other, os.urandom(1000))
    stats = daemon.stats()
    assert stats["process"]["rss_bytes"] - rss_before < 32 * 1024 * 1024
    if daemon.status()["mode"] == "kernel":
        assert outcome == "reset", (sent, outcome)
        assert stats["connections"]["aborted_backlog"] == aborted_before + 1
        assert sent < 200 * 1024 * 1024
        assert "conn.backlog_exceeded" in daemon.log()
    else:
        assert outcome == "deadline", (sent, outcome)
        assert sent < 32 * 1024 * 1024
