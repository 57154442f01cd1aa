"""The KernelEcho API against the real kernel: insert, kick, remove, counters, refusals."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from echod import libbpf
from echod.sockmap import KernelEcho, read_queue_empty
from tests.integration.conftest import assert_unloaded, loaded_bpf_ids, require_bpf
from tests.integration.echo_util import recv_exact, roundtrip


@pytest.fixture
def kernel() -> Iterator[KernelEcho]:
    require_bpf()
    with KernelEcho() as k:
        yield k


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    yield ls
    ls.close()


def pair(ls: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(ls.getsockname(), timeout=5)
    server, _ = ls.accept()
    return client, server


def test_data_queued_before_insert_is_echoed(kernel: KernelEcho, listener: socket.socket) -> None:
    """The early-data race: bytes in the receive queue before the insert are kicked through."""
    for _ in range(20):
        client = socket.create_connection(listener.getsockname(), timeout=5)
        payload = os.urandom(1000)
        client.sendall(payload)
        time.sleep(0.005)  # let them land in the receive queue first
        server, _ = listener.accept()
        kernel.add(server)
        assert recv_exact(client, len(payload)) == payload
        kernel.remove(server)
        server.close()
        client.close()


def test_counters_and_sockets(kernel: KernelEcho, listener: socket.socket) -> None:
    client, server = pair(listener)
    kernel.add(server)
    assert kernel.sockets() == 1
    client.sendall(b"x" * 5000)
    assert recv_exact(client, 5000) == b"x" * 5000
    c = kernel.counters()
    assert c["redirected_bytes"] == 5000
    assert c["redirected_packets"] >= 1
    assert c["passed_bytes"] == 0
    kernel.remove(server)
    assert kernel.sockets() == 0
    with pytest.raises(KeyError):
        kernel.remove(server)
    client.close()
    server.close()


def test_insert_after_reading_the_queue_empty_is_exact(
    kernel: KernelEcho, listener: socket.socket
) -> None:
    """The move to the kernel reads the receive queue until EAGAIN before the insert: the
    verdict then starts on a fresh skb and nothing user space read is echoed twice."""
    client, server = pair(listener)
    payload = os.urandom(300_000)
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    server.settimeout(5)
    head = recv_exact(server, 1000)  # part of the head skb, as an event loop's read leaves it
    server.setblocking(False)
    rest, emptied = read_queue_empty(server, 1 << 30)
    assert emptied
    server.setblocking(True)
    server.sendall(head + rest)
    kernel.add(server)
    sender.join(10)
    assert recv_exact(client, len(payload)) == payload
    roundtrip(client, b"and nothing more")
    kernel.remove(server)
    client.close()
    server.close()


def test_insert_after_peer_left_is_eopnotsupp(kernel: KernelEcho, listener: socket.socket) -> None:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.sendall(b"bye")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    time.sleep(0.05)
    server, _ = listener.accept()
    with pytest.raises(OSError, match="not supported") as info:
        kernel.add(server)
    assert info.value.errno == 95  # EOPNOTSUPP
    server.close()


def test_close_unloads_everything() -> None:
    require_bpf()
    k = KernelEcho().__enter__()
    ids = k.ids()
    progs, maps = loaded_bpf_ids()
    assert ids["prog_id"] in progs
    assert set(ids["map_ids"]) <= maps
    k.close()
    k.close()  # idempotent
    assert_unloaded({ids["prog_id"]}, set(ids["map_ids"]))


def test_failed_load_rolls_back(tmp_path: object) -> None:
    require_bpf()
    before = loaded_bpf_ids(ours=True)
    with pytest.raises(FileNotFoundError), KernelEcho("/nonexistent/echo.bpf.o"):
        pass
    after = loaded_bpf_ids(ours=True)
    assert_unloaded(after[0] - before[0], after[1] - before[1])


def test_library_is_the_wheel_or_env() -> None:
    lib = libbpf.library()
    assert os.path.exists(lib.path) or lib.path.startswith("libbpf")
