"""Kernel echo: load bpf/echo.bpf.c, attach its verdict to the sockhash, add and remove sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from echod.kernel import libbpf

log = structlog.get_logger("echod.sockmap")

SO_COOKIE = 57  # asm-generic/socket.h; the socket module does not export it
PROGRAM = "echo_verdict"
SOCKETS_MAP = "echo_sockets"
ACTIVE_MAP = "echo_active"
BELL_MAP = "echo_bell"
COUNTERS_MAP = "echo_counters"
_COOKIE = struct.Struct("=Q")
# A BPF ring buffer's record (uapi/linux/bpf.h BPF_RINGBUF_*): a __u32 length whose two top bits
# say it is still being written (busy) or was dropped by its writer (discard), a __u32 of the
# kernel's, then the data; each record starts 8-byte aligned.
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
RINGBUF_HDR_SZ = 8
BELL_GATHER = 0.005  # seconds between the first ring and its answer (KernelEcho.on_bell)


class EchoCounters(NamedTuple):
    """struct echo_counters (bpf/echo.h, where it is defined): every field a __u64, in order."""

    redirected_packets: int
    redirected_bytes: int
    passed_packets: int
    passed_bytes: int
    missed_packets: int
    missed_bytes: int
    empty_packets: int
    active_marks: int


COUNTER_FIELDS = EchoCounters._fields
_COUNTERS = struct.Struct(f"={len(COUNTER_FIELDS)}Q")  # one CPU's struct echo_counters


def default_object() -> Path:
    """The compiled object that ships inside the echod package."""
    return Path(str(resources.files("echod") / "bpf" / "echo.bpf.o"))


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for sock: the sockhash key."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def read_queue_empty(
    sock: socket.socket, limit: int, chunk: int = 256 * 1024
) -> tuple[bytes, bool]:
    """Read a non-blocking sock until EAGAIN: then no skb at the head of its queue is partly read.

    Returns (what was read, True), or (what was read, False) on EOF or once more than limit
    bytes came in. Raises OSError when the socket fails. See KernelEcho.add for why.
    """
    data = bytearray()
    while len(data) <= limit:
        try:
            got = sock.recv(chunk)
        except (BlockingIOError, InterruptedError):
            return bytes(data), True
        if not got:
            break
        data += got
    return bytes(data), False


class SocketMaps:
    """The two maps a worker touches per connection: the sockhash and the activity set.

    The owner of the BPF object holds one (fds borrowed from the object); a worker process
    builds its own from fds it was sent (`owned=True`: it takes ownership and closes them).
    """

    def __init__(
        self, sockets_fd: int, active_fd: int, counters_fd: int, *, owned: bool = False
    ) -> None:
        self.sockets_fd = sockets_fd
        self.active_fd = active_fd
        self.counters_fd = counters_fd
        self._owned = owned
        self._ncpus = libbpf.possible_cpus() if counters_fd >= 0 else 1

    def fds(self) -> list[int]:
        """The fds to hand another process: sockhash, activity set, counters."""
        return [self.sockets_fd, self.active_fd, self.counters_fd]

    def add(self, sock: socket.socket) -> int:
        """Insert sock into the sockhash, then kick it so data queued before the insert is echoed.

        Returns the socket's cookie. The verdict only sees skbs that arrive after the psock
        exists. Setting SO_RCVLOWAT runs tcp_data_ready(), which is now the psock's hook, over
        what is already queued. Raises OSError(EOPNOTSUPP) when the peer has already gone (the
        socket left ESTABLISHED).

        User space must not have read part of the skb at the head of the receive queue: the
        verdict path takes that skb whole, so its read part would be echoed twice. A socket
        never read is fine; one that was read must go through read_queue_empty first.
        """
        cookie = socket_cookie(sock)
        libbpf.map_update(
            self.sockets_fd, _COOKIE.pack(cookie), _COOKIE.pack(sock.fileno()), libbpf.BPF_NOEXIST
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return cookie

    def remove(self, sock: socket.socket, cookie: int | None = None) -> None:
        """Delete sock from the sockhash (and the activity set); KeyError when not there.

        Removing frees the socket's psock with whatever is queued in it: call this only once
        everything received has been written (see connection.Connection.drained).
        """
        key = _COOKIE.pack(socket_cookie(sock) if cookie is None else cookie)
        try:
            libbpf.map_delete(self.sockets_fd, key)
        finally:
            # After the sockhash: a packet in between can no longer mark the socket again.
            with contextlib.suppress(KeyError):
                libbpf.map_delete(self.active_fd, key)

    def prune_active(self) -> int:
        """Delete activity-set keys of sockets no longer in the sockhash; returns how many.

        A worker that dies leaves its sockets' keys behind; a full set could mark no more.
        """
        pruned = 0
        for key in libbpf.map_keys(self.active_fd, 8):
            try:
                libbpf.map_lookup(self.sockets_fd, key, 8)
            except KeyError:
                with contextlib.suppress(KeyError):
                    libbpf.map_delete(self.active_fd, key)
                pruned += 1
        return pruned

    def active(self, limit: int) -> list[int]:
        """Cookies of sockets that received data since they were last cleared (at most limit)."""
        return [_COOKIE.unpack(k)[0] for k in libbpf.map_keys(self.active_fd, 8, limit)]

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        totals = libbpf.percpu_totals(self.counters_fd, _COUNTERS, self._ncpus)
        return EchoCounters._make(totals)._asdict()

    def marks(self) -> int:
        """How many times a socket entered the activity set: it changed if this moved."""
        return self.counters()["active_marks"]

    def clear_active(self, cookie: int) -> None:
        """Forget that a socket was active; its next packet marks it again."""
        with contextlib.suppress(KeyError):
            libbpf.map_delete(self.active_fd, _COOKIE.pack(cookie))

    def sockets(self) -> int:
        """How many sockets are in the sockhash now (walks it: tests and diagnostics only)."""
        return len(libbpf.map_keys(self.sockets_fd, 8))

    def __enter__(self) -> SocketMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the fds if this object owns them; idempotent."""
        if self._owned:
            for fd in (self.sockets_fd, self.active_fd, self.counters_fd):
                if fd >= 0:
                    os.close(fd)
        self.sockets_fd = self.active_fd = self.counters_fd = -1


class RingReader:
    """Reads a BPF_MAP_TYPE_RINGBUF ring with the ordering of libbpf's ringbuf_process_ring.

    Not through libbpf's ring_buffer__new/__consume: the pylibbpf wheel's static libbpf does not
    export them, and the system libbpf is not one we require.

    Why it is correct on any CPU, not only with x86-64's strong ordering (the kernel's side is
    kernel/bpf/ringbuf.c; the loads and stores are libbpf.Atomics):
    - The producer position is read with an acquire load. bpf_ringbuf_reserve writes a record's
      header (its length, busy) before it publishes the new position with a release store, so
      every header below the position read is that one or a later state of it.
    - Each header is read with an acquire load. bpf_ringbuf_commit clears the busy bit (setting
      discard for a dropped record) with an atomic exchange after the data was written: a header
      seen without the busy bit means the data it covers is visible. A busy header ends the
      walk: the kernel commits out of order, a reader consumes in order, so the records after it
      wait for the next consume(). The ring stays readable meanwhile (its poll compares the
      positions), and the busy record's commit wakes the reader (the consumer position is at
      that record).
    - The consumer position is written with a release store after the records it passes are
      copied out. The kernel reads it with an acquire load before it reuses the space, so it
      never overwrites a record still being read.
    """

    def __init__(
        self, consumer: int, producer: int, data: int, size: int, ops: libbpf.Atomics | None = None
    ) -> None:
        """The ring at these raw addresses: the consumer and producer positions (a __u64 each),
        and the data area of size bytes (a power of two)."""
        self._consumer = consumer
        self._producer = producer
        self._data = data
        self._size = size
        self._mask = size - 1
        self._ops = ops or libbpf.atomics()

    def consume(self) -> list[bytes]:
        """Every record committed since the last call, in order; discarded ones skipped."""
        ops, records = self._ops, list[bytes]()
        cons = ops.load_acquire_u64(self._consumer)
        while True:
            prod = ops.load_acquire_u64(self._producer)
            start, busy = cons, False
            while cons < prod:
                at = cons & self._mask
                header = ops.load_acquire_u32(self._data + at)
                if header & RINGBUF_BUSY:
                    busy = True
                    break
                length = header & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
                if not header & RINGBUF_DISCARD:
                    records.append(self._copy((at + RINGBUF_HDR_SZ) & self._mask, length))
                cons += (length + RINGBUF_HDR_SZ + 7) & ~7
            if cons != start:
                # Once per pass, where libbpf stores after each record (its callback may take
                # long): the release store still comes after every copy above.
                ops.store_release_u64(self._consumer, cons)
            if busy or cons == start:
                return records
            # As libbpf: the producer may have moved meanwhile; look again at once.

    def _copy(self, at: int, length: int) -> bytes:
        """length bytes of data from offset at, in two pieces when they wrap past the end."""
        first = min(length, self._size - at)
        data = libbpf.read_memory(self._data + at, first)
        if first < length:
            data += libbpf.read_memory(self._data, length - first)
        return data


class Doorbell:
    """The echo_bell ring: the cookies of sockets the verdict wants the guard to look at.

    A record written into an empty ring makes the ring's fd readable (epoll). drain() reads
    the records and moves the consumer position past them, emptying the ring, so that the
    next record wakes the reader again.
    """

    def __init__(self, fd: int, ring: RingReader, pages: Sequence[libbpf.Mapping] = ()) -> None:
        """Reads ring, which fd signals; borrows fd, and takes ownership of the mapped pages."""
        self.fd = fd
        self._ring = ring
        self._pages = list(pages)

    @classmethod
    def open(cls, ring_fd: int) -> Doorbell:
        """Map the echo_bell map; borrows ring_fd (the BPF object owns it).

        Page 0 of the map is the consumer position, the only page user space may write; page 1
        the producer position; then the data (which the kernel maps twice in a row, so that a
        record that wraps is contiguous; the reader copies such a record in two pieces instead,
        and maps it once).
        """
        page = os.sysconf("SC_PAGE_SIZE")
        size = libbpf.map_info(ring_fd)["max_entries"]
        with contextlib.ExitStack() as undo:
            consumer = libbpf.Mapping(ring_fd, page, writable=True)
            undo.callback(consumer.close)
            producer = libbpf.Mapping(ring_fd, page + size, page)
            undo.pop_all()
        ring = RingReader(consumer.addr, producer.addr, producer.addr + page, size)
        return cls(ring_fd, ring, (consumer, producer))

    def drain(self) -> list[int]:
        """The cookies rung since the last drain, and the ring emptied."""
        return [_COOKIE.unpack(r)[0] for r in self._ring.consume() if len(r) == _COOKIE.size]

    def close(self) -> None:
        """Unmap the ring's pages; idempotent."""
        for pages in self._pages:
            pages.close()
        self._pages = []
        self.fd = -1


def bpf_status(kernel: KernelEcho | None) -> dict[str, Any]:
    """`status`'s "bpf": the loaded object's programs and maps, or that none is attached."""
    if kernel is None:
        return {"attached": False, "programs": [], "maps": []}
    return kernel.describe()


class KernelEcho(libbpf.LoadedObject):
    """Open → load → attach as a context manager; exit undoes exactly the steps that were done."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(str(path or default_object()))
        self.prog_fd = self.sockets_fd = self.counters_fd = -1
        self.maps = SocketMaps(-1, -1, -1)
        self.bell: Doorbell | None = None
        self.stats_enabled = False
        self.attach = ""  # "bpf_link", or "prog_attach" on a kernel without sockmap links
        self.link_fd = -1

    def _open(self) -> None:
        obj = self._load()
        self.prog_fd = obj.program_fd(PROGRAM)
        self.sockets_fd = obj.map_fd(SOCKETS_MAP)
        self.counters_fd = obj.map_fd(COUNTERS_MAP)
        self.maps = SocketMaps(self.sockets_fd, obj.map_fd(ACTIVE_MAP), self.counters_fd)
        self.bell = Doorbell.open(obj.map_fd(BELL_MAP))
        self._stack.callback(self.bell.close)
        self._attach()
        try:
            # Run-time accounting is a diagnostic: lacking it must not cost kernel mode.
            self._stack.enter_context(libbpf.enable_stats())
            self.stats_enabled = True
        except OSError as exc:
            log.warning("bpf.stats_unavailable", error=str(exc))
        log.info("bpf.attached", object=self.path, **self.ids())

    def _attach(self) -> None:
        """The verdict on the sockhash: through a BPF link where the kernel has one (6.10+)."""
        kind = libbpf.BPF_SK_SKB_STREAM_VERDICT
        try:
            link = libbpf.link_create(self.prog_fd, self.sockets_fd, kind)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            log.info("bpf.no_sockmap_link", error=str(exc))  # before 6.10: attach to the map
            libbpf.prog_attach(self.prog_fd, self.sockets_fd, kind)
            self._stack.callback(libbpf.prog_detach, self.prog_fd, self.sockets_fd, kind)
            self.attach = "prog_attach"
            return
        self._stack.callback(link.close)
        self.link_fd = link.fd
        self.attach = "bpf_link"

    def close(self) -> None:
        """Detach, stop stats, free programs and maps; idempotent."""
        if self._obj is not None:
            self._stack.close()
            self._obj = None
            self.prog_fd = self.sockets_fd = self.counters_fd = self.link_fd = -1
            self.maps = SocketMaps(-1, -1, -1)
            log.info("bpf.detached")

    def add(self, sock: socket.socket) -> int:
        """SocketMaps.add on this object's maps; returns the cookie."""
        return self.maps.add(sock)

    def remove(self, sock: socket.socket) -> None:
        """SocketMaps.remove on this object's maps."""
        self.maps.remove(sock)

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        return self.maps.counters()

    def sockets(self) -> int:
        """How many sockets are in the sockhash now (walks it)."""
        return self.maps.sockets()

    def programs(self) -> list[dict[str, Any]]:
        """Per-program figures: id, name, run_cnt, run_time_ns, ns_per_run."""
        return [libbpf.program_figures(self.prog_fd, "sk_skb")]

    def on_bell(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[list[int]], None],
        gather: float = BELL_GATHER,
    ) -> None:
        """Call callback(cookies) on loop when the verdict rings the bell, until close().

        The first ring is answered `gather` seconds later, with every cookie rung meanwhile:
        when connections come and go by the thousand a second, the bell wakes the daemon a
        bounded number of times, not once per connection.
        """
        bell = self.bell
        assert bell is not None, "not loaded"
        pending: list[asyncio.TimerHandle] = []

        def answer() -> None:
            pending.clear()
            if bell.fd >= 0:
                callback(bell.drain())
                loop.add_reader(bell.fd, rung)

        def rung() -> None:
            loop.remove_reader(bell.fd)
            pending.append(loop.call_later(gather, answer))

        def stop() -> None:
            for handle in pending:
                handle.cancel()
            loop.remove_reader(bell.fd)

        loop.add_reader(bell.fd, rung)
        self._stack.callback(stop)  # before the ring is unmapped

    def describe(self) -> dict[str, Any]:
        """What `status` shows under "bpf" while this object is loaded."""
        ids = self.ids()
        return {
            "attached": True,
            "programs": [{"id": ids["prog_id"], "name": PROGRAM, "type": "sk_skb"}],
            "maps": ids["map_ids"],
            "attach": self.attach,
            "link_id": libbpf.link_info(self.link_fd)["id"] if self.link_fd >= 0 else None,
            "stats_enabled": self.stats_enabled,
        }

    def ids(self) -> dict[str, Any]:
        """Kernel ids of our program and maps (what `bpftool prog show` lists)."""
        assert self.bell is not None, "not loaded"
        fds = (self.sockets_fd, self.maps.active_fd, self.bell.fd, self.counters_fd)
        return {
            "prog_id": libbpf.prog_info(self.prog_fd)["id"],
            "map_ids": [libbpf.map_info(fd)["id"] for fd in fds],
        }
