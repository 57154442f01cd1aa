"""Plain ping-pong: one message of one size in flight per connection, on blocking sockets.

At full speed a round sends one message on every connection, then reads every echo. Paced
(-q), requests go out on a fixed schedule (schedule.RateSchedule) and latency is measured
from when each was due. Every echo is compared with what was sent. Pipelined and random-size
ping-pong run as byte-checked streams instead (stream.py).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

from echoctl.bench.schedule import RateSchedule
from echoctl.bench.stream import Host, ShortRead, Stalled

PAYLOADS_PER_CONN = 4  # rotated each round; a power of two so rotation is a mask
FOLD_AT = 8192  # latencies kept in a plain list before they are folded into the histogram


class PingPongHost(Host, Protocol):
    """What ping-pong needs from its worker, beyond what the stream engine needs."""

    rate: float
    start_ns: int


def stalled_if_timed_out(exc: BaseException) -> BaseException:
    """A receive that timed out (SO_RCVTIMEO, the stall timeout) is a stalled connection."""
    return Stalled() if isinstance(exc, BlockingIOError) else exc


def end_of_round(w: PingPongHost, lat: list[int], check_at: int) -> tuple[int, bool]:
    """Fold a long latency list, and do the clock's duties when due; return (next check, go on)."""
    if len(lat) >= FOLD_AT:
        w.fold(lat, None)
    t = time.monotonic_ns()
    if t < check_at:
        return check_at, True
    return w.next_check(t), w.duties(t, lat, None)


def payloads(w: PingPongHost) -> list[bytes]:
    """Return one connection's payloads: random, and consecutive ones always differ."""
    size = w.cfg.size
    first = os.urandom(1)[0]
    # Random bytes alone may repeat (one byte in 256 at -s 1); a distinct first byte per
    # payload makes every round's echo tell the previous round's apart.
    return [bytes([(first + k) & 0xFF]) + os.urandom(size - 1) for k in range(PAYLOADS_PER_CONN)]


def finish_recv(
    w: PingPongHost, sock: socket.socket, buf: bytearray, got: int, expect: bytes
) -> None:
    """Complete a short first read, then compare; raises on EOF or socket errors."""
    size = len(expect)
    view = memoryview(buf)
    while got < size:
        if got < 0:
            got = 0
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ShortRead()
        got += n
    if buf != expect:
        w.count_mismatch()


def careful_recv(
    w: PingPongHost, i: int, buf: bytearray, expect: bytes, dead: set[int]
) -> int | None:
    """Receive one echo on connection i outside the hot loop; return the time or None."""
    try:
        finish_recv(w, w.socks[i], buf, 0, expect)
    except (OSError, ShortRead) as exc:
        w.count_failure(stalled_if_timed_out(exc))
        dead.add(i)
        return None
    return time.monotonic_ns()


def drop(w: PingPongHost, dead: set[int], *parallel: list[Any]) -> None:
    """Close and forget the connections that failed, with their entries in `parallel`."""
    for i in sorted(dead, reverse=True):
        w.socks.pop(i).close()
        for items in parallel:
            items.pop(i)


def run_pingpong(w: PingPongHost) -> None:
    """Ping-pong at full speed: a round sends on every connection, then reads every echo."""
    size = w.cfg.size
    rounds = w.cfg.rounds_limit()
    now = time.monotonic_ns
    buf = bytearray(size)
    lat: list[int] = []
    mask = PAYLOADS_PER_CONN - 1
    mine = [payloads(w) for _ in w.socks]
    r = 0
    while w.socks and r < rounds:
        socks = w.socks
        # sendall: a blocking send may still return short when SO_SNDTIMEO expires mid-way.
        sends = [s.sendall for s in socks]
        recvs = [s.recv_into for s in socks]
        table = [[p[k] for p in mine] for k in range(PAYLOADS_PER_CONN)]
        idx = range(len(socks))
        t_send = [0] * len(socks)
        check_at = now()
        dead: set[int] = set()
        while r < rounds:
            cur = table[r & mask]
            r += 1
            i = 0
            try:
                for i in idx:
                    t_send[i] = now()
                    sends[i](cur[i])
            except OSError as exc:
                w.count_failure(exc)
                dead.add(i)
                for j in range(i):
                    t = careful_recv(w, j, buf, cur[j], dead)
                    if t is not None:
                        lat.append(t - t_send[j])
                break
            try:
                for i in idx:
                    n = recvs[i](buf)
                    if n != size or buf != cur[i]:
                        finish_recv(w, socks[i], buf, n, cur[i])
                    lat.append(now() - t_send[i])
            except (OSError, ShortRead) as exc:
                w.count_failure(stalled_if_timed_out(exc))
                dead.add(i)
                for j in range(i + 1, len(socks)):
                    t = careful_recv(w, j, buf, cur[j], dead)
                    if t is not None:
                        lat.append(t - t_send[j])
                break
            check_at, going = end_of_round(w, lat, check_at)
            if not going:
                r = rounds
        if dead:
            drop(w, dead, mine)
            w.fold(lat, None)
            if not w.duties(now(), lat, None):
                break
    w.stopped_ns = now()
    w.fold(lat, None)


def run_paced(w: PingPongHost) -> None:
    """Ping-pong on a fixed schedule (-q): sends what is due, up to one per connection."""
    sched = RateSchedule(w.rate)
    sched.start(w.start_ns)
    size = w.cfg.size
    now = time.monotonic_ns
    buf = bytearray(size)
    lat: list[int] = []
    raw: list[int] = []
    mask = PAYLOADS_PER_CONN - 1
    mine = [payloads(w) for _ in w.socks]
    turn = [0] * len(w.socks)  # requests sent so far on each connection: its rotation
    limit = w.cfg.rounds_limit() * len(w.socks)
    n = 0
    check_at = 0
    while w.socks and n < limit:
        t = now()
        if t >= check_at:
            check_at = w.next_check(t)
            if not w.duties(t, lat, raw):
                break
        k = len(w.socks)
        due = min(sched.due(t) - n, k, limit - n)
        if due <= 0:
            sched.wait_until(min(sched.intended(n), check_at))
            continue
        sent: list[tuple[int, bytes, int, int]] = []
        dead: set[int] = set()
        for j in range(due):
            c = (n + j) % k
            # Chosen per request: a batch may wrap round to a connection it already served.
            payload = mine[c][turn[c] & mask]
            turn[c] += 1
            t_send = now()
            try:
                w.socks[c].sendall(payload)
            except OSError as exc:
                w.count_failure(exc)
                dead.add(c)
                continue
            sent.append((c, payload, sched.intended(n + j), t_send))
        for c, payload, intended, t_send in sent:
            done = careful_recv(w, c, buf, payload, dead)
            if done is not None:
                lat.append(done - intended)
                raw.append(done - t_send)
        n += due
        if len(lat) >= FOLD_AT:
            w.fold(lat, raw)
        if dead:
            drop(w, dead, mine, turn)
    w.stopped_ns = now()
    w.fold(lat, raw)
