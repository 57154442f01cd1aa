"""The doorbell: the echo_bell ring through which the verdict (bpf/echo.bpf.c) asks the guard to
look at sockets. Maps the ring's pages and turns its records into socket cookies; the ring
itself is read by ring.RingReader, and KernelEcho.on_bell answers it on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence

from echod.kernel.info import map_info
from echod.kernel.ring import Mapping, RingReader

_COOKIE = struct.Struct("=Q")  # a record: one socket's cookie


class Doorbell:
    """The echo_bell ring: the cookies of sockets the verdict wants the guard to look at.

    A record written into an empty ring makes the ring's fd readable (epoll). drain() reads
    the records and moves the consumer position past them, emptying the ring, so that the
    next record wakes the reader again.
    """

    def __init__(self, fd: int, ring: RingReader, pages: Sequence[Mapping] = ()) -> None:
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
        size = map_info(ring_fd)["max_entries"]
        with contextlib.ExitStack() as undo:
            consumer = Mapping(ring_fd, page, writable=True)
            undo.callback(consumer.close)
            producer = Mapping(ring_fd, page + size, page)
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
