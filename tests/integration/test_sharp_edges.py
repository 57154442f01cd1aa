"""The kernel's known sockmap sharp edges (DESIGN.md), each as a test against a real daemon."""

from __future__ import annotations

import fcntl
import os
import socket
import termios
import threading
import time

import pytest

from echod.kernel.echo import KernelEcho
from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, expect_eof, recv_exact, roundtrip, wait_for


def fionread(sock: socket.socket) -> int:
    """Bytes FIONREAD says are ready to read on sock."""
    avail = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, avail)
    return int.from_bytes(avail, "little")


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
        assert not sender.is_alive(), "the send did not finish"
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


@pytest.mark.bpf
def test_fionread_on_a_sockhash_socket_counts_only_what_user_space_can_read() -> None:
    """FIONREAD has misreported on sockhash sockets: while the verdict redirects, it must not
    count the bytes it took; once the socket leaves the map, it counts what arrives."""
    with KernelEcho() as kernel, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            server, _ = listener.accept()
            with server:
                kernel.maps.add(server)
                client.sendall(b"x" * 1000)
                wait_for(lambda: fionread(client) == 1000, what="the client to count the echo")
                assert recv_exact(client, 1000) == b"x" * 1000
                assert kernel.counters()["redirected_bytes"] == 1000
                assert fionread(server) == 0, "FIONREAD counts bytes the verdict redirected"
                server.setblocking(False)
                with pytest.raises(BlockingIOError):
                    server.recv(1)
                kernel.maps.remove(server)
                client.sendall(b"y" * 500)
                wait_for(lambda: fionread(server) == 500, what="FIONREAD to count 500 bytes")
                server.setblocking(True)
                assert recv_exact(server, 500) == b"y" * 500


def test_fin_only_segment(daemon: Echod) -> None:
    """A bare FIN is an empty skb for the verdict: it neither hangs nor corrupts the echo."""
    before = daemon.stats()
    with connect("127.0.0.1", daemon.port) as sock:
        roundtrip(sock, b"before the FIN")
        sock.shutdown(socket.SHUT_WR)  # a FIN with no data
        expect_eof(sock)
    if daemon.status()["mode"] == "kernel":
        wait_for(lambda: daemon.status()["connections"] == 0, what="the connection to close")
        after = daemon.stats()["kernel"]
        assert after["empty_packets"] > before["kernel"]["empty_packets"], "no empty skb seen"
