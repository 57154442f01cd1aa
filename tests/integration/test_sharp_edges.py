"""The kernel's known sockmap sharp edges (DESIGN.md), each as a test against a real daemon."""

from __future__ import annotations

import fcntl
import os
import socket
import termios
import threading
import time

from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, expect_eof, recv_exact, roundtrip


def test_slow_reader_gets_every_byte(daemon: Echod) -> None:
    """The echo socket's send buffer fills while the peer reads slowly: nothing is lost."""
    payload = os.urandom(8 * 1024 * 1024)
    with connect("127.0.0.1", daemon.port, timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            got += sock.recv(32 * 1024)
            if len(got) < 2 * 1024 * 1024:
                time.sleep(0.002)  # slow at first, so the send buffer is full for a while
        sender.join(10)
        assert bytes(got) == payload


def test_message_larger_than_rcvbuf(daemon: Echod) -> None:
    """strparser aborts messages over sk_rcvbuf; verdict-only has no such limit."""
    with connect("127.0.0.1", daemon.port, timeout=30) as sock:
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        roundtrip(sock, os.urandom(max(4 * rcvbuf, 16 * 1024 * 1024)))
        roundtrip(sock, b"and the connection still works")


def test_urgent_data_does_not_wedge_the_connection(daemon: Echod) -> None:
    """MSG_OOB has broken verdict-only sockmaps; the stream must go on, byte-exact."""
    with connect("127.0.0.1", daemon.port) as sock:
        sock.sendall(b"abc")
        assert recv_exact(sock, 3) == b"abc"
        sock.send(b"!", socket.MSG_OOB)
        sock.sendall(b"def")
        got = b""
        deadline = time.monotonic() + 5
        while not got.endswith(b"def") and time.monotonic() < deadline:
            got += sock.recv(100)
        # The kernel path echoes the urgent byte in band; user mode sets SO_OOBINLINE to match.
        assert got == b"!def", got
        for _ in range(10):
            roundtrip(sock, os.urandom(100))


def test_fionread_on_the_client_counts_the_echo(daemon: Echod) -> None:
    """FIONREAD misreports on sockhash sockets with sk_msg; the client's own view is exact."""
    with connect("127.0.0.1", daemon.port) as sock:
        sock.sendall(b"x" * 1000)
        deadline = time.monotonic() + 5
        avail = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, avail)
            if int.from_bytes(avail, "little") == 1000:
                break
            time.sleep(0.01)
        assert int.from_bytes(avail, "little") == 1000
        assert recv_exact(sock, 1000) == b"x" * 1000


def test_zero_length_and_fin_only_segments(daemon: Echod) -> None:
    """Empty writes and a bare FIN (empty skbs) neither hang nor corrupt the echo."""
    with connect("127.0.0.1", daemon.port) as sock:
        for _ in range(50):
            sock.send(b"")
        roundtrip(sock, b"after empty writes")
        sock.shutdown(socket.SHUT_WR)  # a FIN with no data
        expect_eof(sock)
