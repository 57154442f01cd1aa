"""The ring-buffer reader against a ring in process memory, written as the kernel writes one.

FakeRing does what kernel/bpf/ringbuf.c does: bpf_ringbuf_reserve writes a busy header and
moves the producer position, bpf_ringbuf_commit clears the busy bit (or sets the discard bit).
Each test runs with both kinds of accesses (libatomic's, and the plain ones of x86-64).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

import pytest

from echod.kernel.doorbell import Doorbell
from echod.kernel.ring import (
    RINGBUF_BUSY,
    RINGBUF_DISCARD,
    RINGBUF_HDR_SZ,
    Atomics,
    RingReader,
    atomics,
)

HEADER = struct.Struct("=II")  # the length with the busy and discard bits, the page offset


def _ops() -> list[Atomics]:
    ops = [Atomics(None)]
    try:
        ops.append(atomics())
    except OSError:
        pass  # no libatomic and not x86-64: nothing to compare with
    return ops


class FakeRing:
    """A BPF ring buffer's positions and data area in process memory."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.consumer = ctypes.c_uint64(0)
        self.producer = ctypes.c_uint64(0)
        self.data = ctypes.create_string_buffer(size)
        self.wrapped = 0  # records whose data ran past the end of the data area

    def reader(self, ops: Atomics) -> RingReader:
        addr = ctypes.addressof
        return RingReader(addr(self.consumer), addr(self.producer), addr(self.data), self.size, ops)

    def reserve(self, payload: bytes) -> int:
        """Write a busy record and publish it; returns its position (asserts room, as the kernel
        checks it)."""
        pos = self.producer.value
        total = (len(payload) + RINGBUF_HDR_SZ + 7) & ~7
        assert pos + total - self.consumer.value <= self.size - 1, "ring full"
        at = pos % self.size
        HEADER.pack_into(self.data, at, len(payload) | RINGBUF_BUSY, 0)
        start = (at + RINGBUF_HDR_SZ) % self.size
        first = min(len(payload), self.size - start)
        self.data[start : start + first] = payload[:first]
        if first < len(payload):
            self.data[0 : len(payload) - first] = payload[first:]
            self.wrapped += 1
        self.producer.value = pos + total
        return pos

    def commit(self, pos: int, *, discard: bool = False) -> None:
        at = pos % self.size
        length = HEADER.unpack_from(self.data, at)[0] & ~RINGBUF_BUSY
        HEADER.pack_into(self.data, at, length | (RINGBUF_DISCARD if discard else 0), 0)

    def output(self, payload: bytes) -> None:
        """bpf_ringbuf_output: reserve, copy, commit."""
        self.commit(self.reserve(payload))


@pytest.fixture(params=_ops(), ids=lambda ops: ops.name)
def ops(request: pytest.FixtureRequest) -> Atomics:
    ops: Atomics = request.param
    return ops


@pytest.fixture
def ring() -> FakeRing:
    return FakeRing()


def test_empty_ring_reads_nothing(ring: FakeRing, ops: Atomics) -> None:
    assert ring.reader(ops).consume() == []
    assert ring.consumer.value == 0


def test_records_come_in_order_and_the_consumer_passes_them(ring: FakeRing, ops: Atomics) -> None:
    reader = ring.reader(ops)
    for payload in (b"first", b"second record", b"3"):
        ring.output(payload)
    assert reader.consume() == [b"first", b"second record", b"3"]
    assert ring.consumer.value == ring.producer.value
    assert reader.consume() == []


def test_a_busy_record_stops_the_walk_until_it_is_committed(ring: FakeRing, ops: Atomics) -> None:
    reader = ring.reader(ops)
    ring.output(b"before")
    busy = ring.reserve(b"being written")
    ring.output(b"after")  # committed first: the kernel commits out of order
    assert reader.consume() == [b"before"]
    assert ring.consumer.value == busy  # the next commit finds the reader waiting on it
    assert reader.consume() == []
    ring.commit(busy)
    assert reader.consume() == [b"being written", b"after"]
    assert ring.consumer.value == ring.producer.value


def test_a_discarded_record_is_skipped_but_consumed(ring: FakeRing, ops: Atomics) -> None:
    reader = ring.reader(ops)
    ring.output(b"kept")
    dropped = ring.reserve(b"dropped")
    ring.commit(dropped, discard=True)
    ring.output(b"also kept")
    assert reader.consume() == [b"kept", b"also kept"]
    assert ring.consumer.value == ring.producer.value


def test_a_discarded_busy_record_is_read_once_committed(ring: FakeRing, ops: Atomics) -> None:
    reader = ring.reader(ops)
    pos = ring.reserve(b"x" * 8)
    assert reader.consume() == []
    ring.commit(pos, discard=True)
    assert reader.consume() == []
    assert ring.consumer.value == ring.producer.value


def test_records_wrap_around_the_end_of_the_ring(ring: FakeRing, ops: Atomics) -> None:
    """Positions grow past the size many times; records whose data crosses the end come whole."""
    reader = ring.reader(ops)
    expected: list[bytes] = []
    got: list[bytes] = []
    for i in range(2000):
        payload = (b"%05d" % i) * (1 + i % 4)  # 5 to 20 bytes: every alignment at the end
        ring.output(payload)
        expected.append(payload)
        if i % 7 == 6:
            got += reader.consume()
    got += reader.consume()
    assert got == expected
    assert ring.producer.value > 10 * ring.size
    assert ring.wrapped > 0
    assert ring.consumer.value == ring.producer.value


def test_a_full_ring_read_whole(ring: FakeRing, ops: Atomics) -> None:
    reader = ring.reader(ops)
    cookies = [struct.pack("=Q", n) for n in range((ring.size - 1) // 16)]
    for c in cookies:
        ring.output(c)
    with pytest.raises(AssertionError, match="ring full"):
        ring.output(b"one more cookie!")
    assert reader.consume() == cookies


@pytest.fixture
def borrowed_fd() -> Iterator[int]:
    """An fd for a Doorbell to borrow (what signals the ring does not matter here)."""
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


def test_drain_returns_the_cookies(ring: FakeRing, ops: Atomics, borrowed_fd: int) -> None:
    bell = Doorbell(borrowed_fd, ring.reader(ops))
    for cookie in (1, 2**64 - 1, 0x1234_5678_9ABC):
        ring.output(struct.pack("=Q", cookie))
    ring.output(b"not a cookie")  # a record of another length is not ours: ignored
    assert bell.drain() == [1, 2**64 - 1, 0x1234_5678_9ABC]
    assert bell.drain() == []
    bell.close()
    bell.close()
    assert bell.fd == -1


class Recording(Atomics):
    """Plain accesses that also note, in order, which ordered access touched which word."""

    def __init__(self, ring: FakeRing) -> None:
        super().__init__(None)
        self.names = {
            ctypes.addressof(ring.consumer): "consumer",
            ctypes.addressof(ring.producer): "producer",
        }
        self.data = ctypes.addressof(ring.data)
        self.log: list[str] = []

    def _name(self, addr: int) -> str:
        return self.names.get(addr, f"header@{addr - self.data}")

    def load_acquire_u32(self, addr: int) -> int:
        self.log.append("acquire " + self._name(addr))
        return super().load_acquire_u32(addr)

    def load_acquire_u64(self, addr: int) -> int:
        self.log.append("acquire " + self._name(addr))
        return super().load_acquire_u64(addr)

    def store_release_u64(self, addr: int, value: int) -> None:
        self.log.append(f"release {self._name(addr)}={value}")
        super().store_release_u64(addr, value)


def test_positions_and_headers_are_read_and_written_in_libbpfs_order(ring: FakeRing) -> None:
    """Acquire the producer position, then each header; release the consumer position last."""
    ops = Recording(ring)
    ring.output(b"a" * 8)
    ring.output(b"b" * 8)
    assert ring.reader(ops).consume() == [b"a" * 8, b"b" * 8]
    assert ops.log == [
        "acquire consumer",
        "acquire producer",
        "acquire header@0",
        "acquire header@16",
        "release consumer=32",
        "acquire producer",  # the producer may have moved meanwhile: one more look
    ]
