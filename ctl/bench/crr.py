"""Connection churn (--pattern crr): connect, one request, read the echo, close; again.

This is netperf's TCP_CRR. Each of a worker's connection slots runs the cycle in turn: a round
connects every slot, sends one message on each, reads and checks every echo, and closes them.
The latency of a request is the whole cycle, from connect() to close(); the rate is cycles per
second. A failed cycle is counted and the slot goes on with the next round.

The client closes first, so its side of each connection waits in TIME_WAIT. On loopback Linux
reuses those ports for new outgoing connections (net.ipv4.tcp_tw_reuse, 2 by default); against
another host a long run may need that sysctl set to 1.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Protocol

from echoctl.bench.pingpong import PingPongHost, end_of_round, finish_recv, payloads
from echoctl.bench.stream import ShortRead


class CrrHost(PingPongHost, Protocol):
    """What churn needs from its worker, beyond ping-pong: where to connect."""

    nconns: int
    family: int
    sockaddr: tuple[Any, ...]


def run_crr(w: CrrHost) -> None:
    """Run connect-request-response-close cycles on `w.nconns` slots until the run ends."""
    cfg = w.cfg
    rounds = cfg.rounds_limit()
    now = time.monotonic_ns
    buf = bytearray(cfg.size)
    lat: list[int] = []
    table = payloads(w)
    slots = range(w.nconns)
    check_at = now()
    r = 0
    while r < rounds:
        payload = table[r % len(table)]
        r += 1
        opened: list[tuple[socket.socket, int]] = []
        for _ in slots:
            t0 = now()
            sock = socket.socket(w.family, socket.SOCK_STREAM)
            try:
                sock.settimeout(cfg.timeout)
                sock.connect(w.sockaddr)
                sock.sendall(payload)
            except OSError as exc:
                sock.close()
                w.count_failure(exc)
                continue
            opened.append((sock, t0))
        for sock, t0 in opened:
            try:
                with sock:
                    finish_recv(w, sock, buf, 0, payload)
            except (OSError, ShortRead) as exc:
                w.count_failure(exc)
                continue
            lat.append(now() - t0)
        check_at, going = end_of_round(w, lat, check_at)
        if not going:
            break
    w.stopped_ns = now()
    w.fold(lat, None)
