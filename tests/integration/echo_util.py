"""Client-side helpers for the echo tests: every byte sent is checked when it comes back."""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import termios
import threading
import time

# Shared with tests/unit, which must not import from tests/integration; tests here take them
# from this module as before.
from tests.util import TIMEOUT, wait_for


def unacked(sock: socket.socket) -> int:
    """Bytes (and a FIN) sent on sock that the peer's kernel has not yet acknowledged."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return int.from_bytes(buf, "little", signed=True)


def wait_delivered(sock: socket.socket) -> None:
    """Wait until everything sent on sock, a FIN included, sits in the peer's kernel."""
    wait_for(lambda: unacked(sock) == 0, what="the peer's kernel to acknowledge what was sent")


def send_then_reset(host: str, port: int, data: bytes = b"gone") -> None:
    """Connect, send data, wait until the server's kernel holds it, then close with a reset
    (a zero linger sends the RST in the close): a peer gone before the server accepts it."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(data)
        wait_delivered(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def connect(host: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    """A connected client socket with a timeout."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes, or fail on EOF/timeout."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, payload: bytes) -> None:
    """Send payload (from a thread, so large ones cannot deadlock) and check the echo."""
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    got = recv_exact(sock, len(payload))
    sender.join(TIMEOUT)
    assert not sender.is_alive(), "the send did not finish"
    assert got == payload, "echo differs from what was sent"


def expect_eof(sock: socket.socket) -> None:
    """The daemon closes its side once it has echoed everything."""
    assert sock.recv(1) == b""


def send_without_reading(sock: socket.socket, limit: int, seconds: float) -> tuple[int, str]:
    """Send on a socket that never reads until `limit` bytes, a reset, or `seconds` pass.

    Returns (bytes sent, "limit" | "reset" | "deadline"); the socket is left open.
    """
    sock.setblocking(False)
    chunk = os.urandom(65536)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < limit:
        if time.monotonic() > deadline:
            return sent, "deadline"
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
        except (ConnectionResetError, BrokenPipeError):
            return sent, "reset"
    return sent, "limit"


def burst_connect(host: str, port: int, n: int, size: int = 64, timeout: float = TIMEOUT) -> int:
    """Open n connections that each send at once after connect; return how many got the echo."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, tuple[bytes, bytearray]] = {}
    for _ in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect((host, port))
        payload = os.urandom(size)
        sock.sendall(payload)  # in the same instant as the connect
        sock.setblocking(False)
        pending[sock] = (payload, bytearray())
        sel.register(sock, selectors.EVENT_READ)
    ok = 0
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                payload, got = pending[sock]
                chunk = sock.recv(65536)
                got += chunk
                if len(got) >= len(payload) or not chunk:
                    assert bytes(got) == payload, "echo differs (or EOF before the echo)"
                    ok += 1
                    sel.unregister(sock)
                    sock.close()
                    del pending[sock]
    finally:
        for sock in pending:
            sock.close()
        sel.close()
    return ok
