"""A BPF ring buffer read from user space: its pages mapped shared, the ordered accesses to its
positions and headers, and the reader that walks its records (the doorbell's, see doorbell.py).

Raw memory access, which Python has no words for: acquire loads and release stores (Atomics),
plain copies (read_memory) and shared mappings of an fd's pages (Mapping). With libbpf.py and
info.py, one of the few modules that import ctypes or mmap (only echod/kernel may).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import platform
from typing import Any

from echod.kernel import libbpf
from echod.kernel.errors import NotSupported

# GCC's __atomic memory orders (the C11 ones).
_ACQUIRE = 2
_RELEASE = 3

# A BPF ring buffer's record (uapi/linux/bpf.h BPF_RINGBUF_*): a __u32 length whose two top bits
# say it is still being written (busy) or was dropped by its writer (discard), a __u32 of the
# kernel's, then the data; each record starts 8-byte aligned.
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
RINGBUF_HDR_SZ = 8


class Atomics:
    """Acquire loads and release stores of aligned words at raw addresses (a ring's positions).

    With libatomic (GCC's runtime library), each is __atomic_load_N or __atomic_store_N with
    that memory order: what libbpf's C compiles to (LDAR/STLR on arm64, plain MOVs on x86-64).
    Without it (`plain`), ordinary accesses: right on x86-64 alone, where (TSO) every aligned
    load is an acquire and every store a release, and each access is a separate step of the
    interpreter, which no compiler moves past another. atomics() picks.
    """

    def __init__(self, lib: ctypes.CDLL | None) -> None:
        self.name = "plain" if lib is None else "libatomic"
        self._load4: Any = None
        self._load8: Any = None
        self._store8: Any = None
        if lib is not None:  # getattr: inside a class, "__atomic..." would be name-mangled
            u32, u64, vp, i = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
            self._load4 = _declare(getattr(lib, "__atomic_load_4"), u32, [vp, i])
            self._load8 = _declare(getattr(lib, "__atomic_load_8"), u64, [vp, i])
            self._store8 = _declare(getattr(lib, "__atomic_store_8"), None, [vp, u64, i])

    def load_acquire_u32(self, addr: int) -> int:
        if self._load4 is None:
            return int(ctypes.c_uint32.from_address(addr).value)
        return int(self._load4(addr, _ACQUIRE))

    def load_acquire_u64(self, addr: int) -> int:
        if self._load8 is None:
            return int(ctypes.c_uint64.from_address(addr).value)
        return int(self._load8(addr, _ACQUIRE))

    def store_release_u64(self, addr: int, value: int) -> None:
        if self._store8 is None:
            ctypes.c_uint64.from_address(addr).value = value
        else:
            self._store8(addr, value, _RELEASE)


def _declare(fn: Any, restype: Any, argtypes: list[Any]) -> Any:
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_atomics: Atomics | None = None


def atomics() -> Atomics:
    """libatomic's when it loads; else plain accesses, on x86-64 only (NotSupported elsewhere)."""
    global _atomics
    if _atomics is None:
        try:
            _atomics = Atomics(ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1"))
        except (OSError, AttributeError) as exc:
            if platform.machine() != "x86_64":
                raise NotSupported(errno.ENOENT, f"no libatomic for acquire loads: {exc}") from exc
            _atomics = Atomics(None)
    return _atomics


def read_memory(addr: int, length: int) -> bytes:
    """A copy of length bytes at addr (plain loads: order them with Atomics around the call)."""
    return ctypes.string_at(addr, length)


class Mapping:
    """Pages of an fd mapped shared (MAP_SHARED); close() unmaps them once, idempotently.

    `addr` is the raw address, for Atomics and read_memory: a BPF ring buffer's producer and
    data pages may only be mapped read-only, which Python's mmap cannot give an address of.
    """

    def __init__(self, fd: int, length: int, offset: int = 0, *, writable: bool = False) -> None:
        """Maps length bytes of fd from offset; fd may be closed afterwards."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        libc = libbpf.library().libc
        addr = libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
        if not addr or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
            raise libbpf.error(0, "mmap")
        self.addr: int = addr
        self.length = length

    def close(self) -> None:
        """Unmap the pages once."""
        addr, self.addr = self.addr, 0
        if addr and libbpf.library().libc.munmap(addr, self.length) != 0:
            raise libbpf.error(0, "munmap")


class RingReader:
    """Reads a BPF_MAP_TYPE_RINGBUF ring with the ordering of libbpf's ringbuf_process_ring.

    Not through libbpf's ring_buffer__new/__consume: the pylibbpf wheel's static libbpf does not
    export them, and the system libbpf is not one we require.

    Why it is correct on any CPU, not only with x86-64's strong ordering (the kernel's side is
    kernel/bpf/ringbuf.c; the loads and stores are Atomics):
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
        self, consumer: int, producer: int, data: int, size: int, ops: Atomics | None = None
    ) -> None:
        """The ring at these raw addresses: the consumer and producer positions (a __u64 each),
        and the data area of size bytes (a power of two)."""
        self._consumer = consumer
        self._producer = producer
        self._data = data
        self._size = size
        self._mask = size - 1
        self._ops = ops or atomics()

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
        data = read_memory(self._data + at, first)
        if first < length:
            data += read_memory(self._data, length - first)
        return data
