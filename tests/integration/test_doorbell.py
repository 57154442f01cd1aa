"""The doorbell against the real kernel: the verdict's echo_bell ring read through Doorbell."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod.kernel.echo import KernelEcho
from tests.integration.conftest import require_bpf
from tests.integration.echo_util import recv_exact

RING_RECORDS = 16384 // 16 - 1  # ECHO_BELL_BYTES of 16-byte records, less the one kept free


@pytest.fixture
def kernel() -> Iterator[KernelEcho]:
    require_bpf()
    with KernelEcho() as k:
        yield k


@pytest.fixture
def conn(kernel: KernelEcho) -> Iterator[tuple[socket.socket, int]]:
    """A client and the cookie of its server end, which is in the sockhash."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        client = socket.create_connection(ls.getsockname(), timeout=5)
        server, _ = ls.accept()
    with client, server:
        cookie = kernel.maps.add(server)
        yield client, cookie
        kernel.maps.remove(server)


def readable(fd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def ring_once(kernel: KernelEcho, client: socket.socket, cookie: int) -> None:
    """Make the verdict ring for the socket: forget it was active, then send it a byte.

    The echo comes back only after the verdict ran, so the record is in the ring by then.
    """
    kernel.maps.clear_active(cookie)
    client.sendall(b"r")
    assert recv_exact(client, 1) == b"r"


def test_the_first_packet_rings_and_drain_empties_the_ring(
    kernel: KernelEcho, conn: tuple[socket.socket, int]
) -> None:
    client, cookie = conn
    assert kernel.bell is not None
    assert not readable(kernel.bell.fd)
    client.sendall(b"hello")
    assert recv_exact(client, 5) == b"hello"
    assert readable(kernel.bell.fd, timeout=5)
    assert kernel.bell.drain() == [cookie]
    assert not readable(kernel.bell.fd)
    client.sendall(b"again")  # still in the activity set: no second ring
    assert recv_exact(client, 5) == b"again"
    assert kernel.bell.drain() == []
    assert kernel.counters()["active_marks"] == 1


def test_the_ring_wraps_many_times(kernel: KernelEcho, conn: tuple[socket.socket, int]) -> None:
    """Each ring is read once, whole, while the positions go round the ring several times."""
    client, cookie = conn
    assert kernel.bell is not None
    rounds = 4 * RING_RECORDS
    for i in range(rounds):
        ring_once(kernel, client, cookie)
        assert kernel.bell.drain() == [cookie], f"round {i}"
    assert kernel.counters()["active_marks"] == rounds


def test_a_full_ring_drops_rings_that_active_marks_still_counts(
    kernel: KernelEcho, conn: tuple[socket.socket, int]
) -> None:
    """The overflow the guard detects: marks counted beyond the records drained."""
    client, cookie = conn
    assert kernel.bell is not None
    for _ in range(RING_RECORDS + 50):
        ring_once(kernel, client, cookie)
    assert kernel.bell.drain() == [cookie] * RING_RECORDS
    assert kernel.counters()["active_marks"] == RING_RECORDS + 50
    ring_once(kernel, client, cookie)  # drained: there is room again
    assert kernel.bell.drain() == [cookie]


def test_on_bell_answers_with_the_cookies(
    kernel: KernelEcho, conn: tuple[socket.socket, int]
) -> None:
    client, cookie = conn

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[list[int]] = asyncio.Queue()
        kernel.on_bell(loop, answers.put_nowait, gather=0.01)
        got = []
        for _ in range(3):
            await loop.run_in_executor(None, ring_once, kernel, client, cookie)
            got.append(await asyncio.wait_for(answers.get(), 5))
        return got

    assert asyncio.run(main()) == [[cookie]] * 3


def bpf_mappings() -> int:
    """How many of this process's mappings are of BPF maps."""
    return sum(
        "anon_inode:bpf-map" in line for line in Path("/proc/self/maps").read_text().split("\n")
    )


def test_close_unmaps_the_ring() -> None:
    require_bpf()
    before = bpf_mappings()
    with KernelEcho() as kernel:
        assert bpf_mappings() == before + 2  # the consumer page; the producer page and data
        bell = kernel.bell
        assert bell is not None
    assert bpf_mappings() == before
    assert bell.fd == -1
    bell.close()  # idempotent
