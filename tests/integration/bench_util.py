"""Helpers shared by the `echoctl bench` and `compare` tests: the bench runner, fake servers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from click.testing import CliRunner

from echoctl.benchcmd import bench
from tests.integration.conftest import Echod


def run_bench(*args: str) -> tuple[int, dict[str, Any]]:
    """Invoke `bench --json ...`; return the exit code and the parsed object."""
    result = CliRunner().invoke(bench, [*args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def target(d: Echod) -> list[str]:
    return ["--host", d.host, "--port", str(d.port), "--control", d.control]


Serve = Callable[[socket.socket, int], None]


class FakeServer:
    """A loopback server that runs `serve(conn, index)` in a thread per accepted connection."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
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
            t = threading.Thread(target=self._run, args=(conn, len(self.conns) - 1), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            self.serve(conn, index)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            conn.close()
        for t in [self.accepting, *self.threads]:
            t.join(timeout=5)


def echo(conn: socket.socket, index: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@contextlib.contextmanager
def fake_server(serve: Serve) -> Iterator[FakeServer]:
    server = FakeServer(serve)
    try:
        yield server
    finally:
        server.close()
