"""Many concurrent connections: every one echoes byte-exact, then all sit idle while measured.

    python -m tests.manyconns --connections 100000 --clients 6 --workers 6 --mode kernel

A private daemon serves on 127.0.0.1. Each client process opens its share of connections
from its own source address (127.0.1.1, 127.0.1.2, ...: one process holds fewer fds than the
20,000 a process may have here, and one source address has fewer ephemeral ports than the
connections), sends a message unique to each connection and checks every byte of the echo.
Then every connection sits idle for --idle seconds while the daemon's processes are measured:
CPU time used (all of them together) and RSS grown per connection since before the first
connect. Last, every connection echoes once more and closes.

Traffic stays on loopback, and every loop is bounded by a deadline. Exit status 1 when any
connection failed or echoed a wrong byte. `make manyconns` runs the 100,000-connection form;
tests/integration/test_manyconns.py a small one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import selectors
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil

from tests.integration.conftest import Echod, assert_clean_exit, spawn

DEADLINE = 120.0  # seconds for any one phase of a client
SETTLE = 2.0  # seconds between the last echo and the idle measurement


@dataclass
class Options:
    """One run's shape."""

    connections: int = 100_000
    clients: int = 6
    workers: int = 6
    mode: str = "kernel"
    idle: float = 10.0


def _message(client: int, index: int, round_: int) -> bytes:
    return f"{client:02d}:{index:06d}:{round_}:".encode().ljust(24, b".")


def _echo_all(socks: list[socket.socket], client: int, round_: int) -> int:
    """Send one message on every socket, then read every echo; returns how many were wrong."""
    bad = 0
    for i, sock in enumerate(socks):
        try:
            sock.sendall(_message(client, i, round_))
        except OSError:
            bad += 1  # reset or closed by the daemon: counted, and read as EOF below
    sel = selectors.DefaultSelector()
    want: dict[int, bytearray] = {}
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
        want[i] = bytearray()
    deadline = time.monotonic() + DEADLINE
    while want and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            i = key.data
            got = want[i]
            try:
                chunk = socks[i].recv(64)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            expected = _message(client, i, round_)
            if not chunk:
                bad += 1
            else:
                got += chunk
                if len(got) < len(expected) and expected.startswith(got):
                    continue
                bad += bytes(got) != expected
            sel.unregister(socks[i])
            del want[i]
    sel.close()
    for sock in socks:
        sock.setblocking(True)
    return bad + len(want)


def _client(client: int, port: int, count: int, pipe: Pipe) -> None:
    """One client process: connect, echo, report, wait for the word, echo again, close."""
    source = f"127.0.1.{client + 1}"
    socks: list[socket.socket] = []
    failed = 0
    began = time.monotonic()
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            try:
                sock.bind((source, 0))
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                failed += 1
                continue
            socks.append(sock)
        connected = time.monotonic() - began
        pipe.send(
            {
                "connected": len(socks),
                "failed": failed,
                "bad": _echo_all(socks, client, 1),
                "seconds": connected,
            }
        )
        pipe.recv()  # the parent has measured the idle phase
        pipe.send({"bad": _echo_all(socks, client, 2)})
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def _daemon_processes(d: Echod) -> list[psutil.Process]:
    top = psutil.Process(d.proc.pid)
    return [top, *top.children()]


def _cpu_s(procs: list[psutil.Process]) -> float:
    """CPU seconds the processes ran, every thread, from schedstat (exact, not clock ticks)."""
    total = 0
    for p in procs:
        for task in Path(f"/proc/{p.pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs)


def run(opt: Options, workdir: Path) -> dict[str, Any]:
    """One run against a private daemon; the daemon must exit cleanly afterwards."""
    args = ["--log-level", "info", "--workers", str(opt.workers)]
    args += ["--max-connections", str(opt.connections + 1000)]
    d = spawn(workdir, opt.mode, args=args)
    ctx = mp.get_context("spawn")
    pipes: list[Pipe] = []
    procs: list[Any] = []
    try:
        daemon = _daemon_processes(d)
        rss_before = _rss(daemon)
        share = [opt.connections // opt.clients] * opt.clients
        share[0] += opt.connections - sum(share)
        began = time.monotonic()
        for c in range(opt.clients):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_client, args=(c, d.port, share[c], theirs), daemon=True)
            p.start()
            pipes.append(ours)
            procs.append(p)
        first = [pipe.recv() if pipe.poll(DEADLINE * 2) else None for pipe in pipes]
        if any(r is None for r in first):
            raise RuntimeError("a client did not report in time")
        connect_s = time.monotonic() - began
        connected = sum(r["connected"] for r in first)
        st = d.status()
        daemon = _daemon_processes(d)
        rss_after = _rss(daemon)
        # The guard's follow-up looks at the sockets that just echoed take a moment: idle
        # starts after them.
        time.sleep(SETTLE)
        cpu0, t0 = _cpu_s(daemon), time.monotonic()
        time.sleep(opt.idle)  # the measurement itself: nothing else happens meanwhile
        cpu1, t1 = _cpu_s(daemon), time.monotonic()
        for pipe in pipes:
            pipe.send("go")
        second = [pipe.recv() if pipe.poll(DEADLINE * 2) else {"bad": -1} for pipe in pipes]
        result = {
            "mode": opt.mode,
            "workers": opt.workers,
            "connections": connected,
            "failed": sum(r["failed"] for r in first),
            "bad_echoes": sum(r["bad"] for r in first) + sum(abs(r["bad"]) for r in second),
            "daemon_connections": st["connections"],
            "per_worker": [w["connections"] for w in st["workers"]],
            "connect_s": round(connect_s, 1),
            "rss_per_connection_b": round((rss_after - rss_before) / max(connected, 1)),
            "rss_total_mib": round(rss_after / 2**20, 1),
            "idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "idle_s": round(t1 - t0, 1),
        }
    except BaseException:
        print(d.log()[-3000:], file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.join(DEADLINE)
            if p.is_alive():
                p.kill()
        assert_clean_exit(d)
    if result["bad_echoes"] or result["failed"]:
        print(d.log()[-3000:], file=sys.stderr)
    return result


def ok(result: dict[str, Any], expected: int) -> bool:
    """Whether every connection was made and echoed exactly, twice."""
    return result["connections"] == expected and not result["failed"] and not result["bad_echoes"]


def main(argv: list[str] | None = None) -> int:
    """The `make manyconns` entry point."""
    p = argparse.ArgumentParser(
        prog="python -m tests.manyconns", description=__doc__.split("\n")[0]
    )
    p.add_argument("--connections", type=int, default=Options.connections)
    p.add_argument("--clients", type=int, default=Options.clients)
    p.add_argument("--workers", type=int, default=Options.workers)
    p.add_argument("--mode", choices=("kernel", "user"), default=Options.mode)
    p.add_argument("--idle", type=float, default=Options.idle, help="seconds measured idle")
    a = p.parse_args(argv)
    opt = Options(a.connections, a.clients, a.workers, a.mode, a.idle)
    with tempfile.TemporaryDirectory(prefix="echod-many-") as tmp:
        result = run(opt, Path(tmp))
    print(json.dumps(result), flush=True)
    return 0 if ok(result, opt.connections) else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("tests.manyconns needs root (BPF, and the daemon's fd limit)")
    sys.exit(main())
