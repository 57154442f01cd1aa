"""`python -m tests.userspeed` in brief: the C epoll server and echod side by side, every byte
checked, and the C server itself echoing exactly what it is sent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests import userspeed
from tests.cpaths import build
from tests.integration.echo_util import roundtrip

pytestmark = pytest.mark.bpf


def test_every_server_runs_every_load(tmp_path: Path) -> None:
    servers = ["user", "kernel-w1", userspeed.MINIMAL]
    table = userspeed.summary(userspeed.run(1, 0.3, servers, tmp_path))
    assert set(table) == {
        f"{name} {load}" for name in [userspeed.BASE, *servers] for load in userspeed.LOADS
    }
    for key, cell in table.items():
        assert cell["qps"] > 0, key
        assert cell["mismatches"] == 0, key
    assert "c-epoll" in userspeed.render(table, servers)


def test_the_c_server_echoes_exactly_and_finishes_after_fin(tmp_path: Path) -> None:
    """Large writes the client does not read at once, half-close, then the rest of the echo."""
    binary = build(tmp_path, "epollecho")
    with ExitStack() as stack:
        port = userspeed.start_server([str(binary)], "the C epoll server", stack)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            roundtrip(sock, b"x")
            data = os.urandom(4 << 20)  # above its 256 KiB high mark: reading stops a while
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := sock.recv(1 << 20):
                got += chunk
        assert bytes(got) == data


def test_the_c_server_stops_on_sigterm(tmp_path: Path) -> None:
    binary = build(tmp_path, "epollecho")
    argv = [str(binary), str(userspeed.free_port())]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
