"""Moving connections between modes: user path → kernel path, live, nothing lost or repeated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog

from echod.kernel.echo import SocketMaps, read_queue_empty
from echod.service.connection import DRAIN_POLL, RECV_SIZE, Connection

log = structlog.get_logger("echod.migrate")

MIGRATE_TIMEOUT = 5.0
# A move to the kernel reads the receive queue empty first; past this much it gives up.
SETTLE_LIMIT = 16 * 1024 * 1024


async def migrate_to_kernel(conns: Iterable[Connection], maps: SocketMaps) -> int:
    """Move every user-path connection at once, under one deadline; returns how many moved."""
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    movers = [to_kernel(c, maps, deadline) for c in list(conns) if c.transport]
    return sum(await asyncio.gather(*movers))


async def to_kernel(conn: Connection, maps: SocketMaps, deadline: float) -> bool:
    """Move a user-path connection to the kernel: flush, detach the transport, insert."""
    tr = conn.transport
    if tr is None or conn.closed or tr.is_closing():
        return False
    conn.set_migrating(True)
    try:
        while tr.get_write_buffer_size() and not conn.closed:
            if time.monotonic() >= deadline:
                return False  # the peer is not reading: it stays on the user path
            await asyncio.sleep(DRAIN_POLL)
        if conn.closed:
            return False
        try:
            conn.leave_transport()
        except OSError as exc:
            log.warning("conn.migrate_failed", peer=conn.peer, error=str(exc))
            return False
    finally:
        conn.set_migrating(False)
    if not await _settle(conn, deadline):
        conn.host.spawn(conn.host.serve_user(conn))
        return False
    try:
        cookie = maps.add(conn.sock)
    except OSError as exc:
        log.info("conn.migrate_failed", peer=conn.peer, error=str(exc))
        conn.host.spawn(conn.host.serve_user(conn))
        return False
    conn.host.map_in(conn, cookie)
    return True


async def _settle(conn: Connection, deadline: float) -> bool:
    """Empty the receive queue and write it back, so the kernel path starts on a fresh skb.

    uvloop reads at most its buffer's size, so the skb at the head of the receive queue may
    be partly read. The verdict path (tcp_read_skb) hands the whole head skb to the verdict
    without regard to how much of it user space has read: inserting such a socket echoes the
    read part a second time and moves copied_seq past rcv_nxt, which stalls the connection.
    Once a read finds the queue empty, the next byte to arrive starts a new skb. What is read
    here is written back before the insert, so the kernel's redirects follow it in order.
    False (the connection stays on the user path, unsent bytes first) on EOF, an error, or
    a peer that does not read before the deadline.
    """
    try:
        data, emptied = read_queue_empty(conn.sock, SETTLE_LIMIT, RECV_SIZE)
    except OSError:
        return False
    if data:
        conn.echo_later(data)
    if not emptied:
        return False  # EOF (the user path reads it again), or a peer that outpaces us
    while True:
        try:
            if conn.send_out():
                return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(DRAIN_POLL)
