"""reuseport.steer_by_source on real sockets: one source address, one socket of the group."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from echod.kernel.reuseport import program, steer_by_source
from tests.integration.conftest import free_port


def _group(family: socket.AddressFamily, host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.setblocking(False)
        socks.append(s)
    return socks


def _received(socks: list[socket.socket]) -> list[set[str]]:
    """The source addresses each socket of the group got datagrams from."""
    time.sleep(0.2)
    out: list[set[str]] = []
    for s in socks:
        seen = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                seen.add(s.recvfrom(16)[1][0])
        out.append(seen)
    return out


@pytest.mark.parametrize(
    ("family", "server", "sources"),
    [
        (socket.AF_INET, "127.0.0.1", ["127.0.0.2", "127.0.0.3"]),
        (socket.AF_INET6, "::1", ["::1"]),
    ],
)
def test_every_datagram_of_one_address_reaches_one_socket(
    family: socket.AddressFamily, server: str, sources: list[str]
) -> None:
    port = free_port()
    socks = _group(family, server, port, 2)
    clients = []
    try:
        steer_by_source(socks[0], 2)
        for source in sources:
            for _ in range(16):  # 16 source ports per address: the default hash would spread them
                c = socket.socket(family, socket.SOCK_DGRAM)
                clients.append(c)
                c.bind((source, 0))
                c.sendto(b"x", (server, port))
        seen = _received(socks)
    finally:
        for s in socks + clients:
            s.close()
    for source in sources:
        assert sum(source in got for got in seen) == 1, (source, seen)
    if len(sources) == 2:  # .2 and .3: even and odd, so both sockets of the group get one
        assert all(seen), seen


def test_the_program_reads_the_source_word_of_each_family() -> None:
    v4, v6 = program(socket.AF_INET, 3), program(socket.AF_INET6, 3)
    assert v4[0][3] == (-0x100000 + 12) & 0xFFFFFFFF
    assert v6[0][3] == (-0x100000 + 20) & 0xFFFFFFFF
    assert v4[1] == (0x94, 0, 0, 3)
    with pytest.raises(ValueError, match="address family"):
        program(socket.AF_UNIX, 2)
    with pytest.raises(ValueError, match="at least 1"):
        program(socket.AF_INET, 0)
