"""The KernelEcho API against the real kernel: insert, kick, remove, counters, refusals."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import socket
import struct
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod.kernel import libbpf
from echod.kernel.echo import KernelEcho, read_queue_empty
from tests.integration.conftest import assert_unloaded, loaded_bpf_ids, require_bpf
from tests.integration.echo_util import recv_exact, roundtrip, wait_for

TCP_ESTABLISHED = 1


def queued(sock: socket.socket) -> int:
    """Bytes waiting in sock's receive queue (FIONREAD)."""
    avail = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, avail)
    return int.from_bytes(avail, "little")


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (the first byte of struct tcp_info)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@pytest.fixture
def kernel() -> Iterator[KernelEcho]:
    require_bpf()
    with KernelEcho() as k:
        yield k


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        yield ls


def pair(ls: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(ls.getsockname(), timeout=5)
    server, _ = ls.accept()
    return client, server


def test_data_queued_before_insert_is_echoed(kernel: KernelEcho, listener: socket.socket) -> None:
    """The early-data race: bytes in the receive queue before the insert are kicked through."""
    for _ in range(20):
        client, server = pair(listener)
        with client, server:
            payload = os.urandom(1000)
            client.sendall(payload)
            wait_for(lambda s=server: queued(s) == 1000, what="the bytes to be queued")
            kernel.maps.add(server)
            assert recv_exact(client, len(payload)) == payload
            kernel.maps.remove(server)


def test_counters_and_sockets(kernel: KernelEcho, listener: socket.socket) -> None:
    client, server = pair(listener)
    with client, server:
        kernel.maps.add(server)
        assert kernel.maps.sockets() == 1
        client.sendall(b"x" * 5000)
        assert recv_exact(client, 5000) == b"x" * 5000
        c = kernel.counters()
        assert c["redirected_bytes"] == 5000
        assert c["redirected_packets"] >= 1
        assert c["passed_bytes"] == 0
        kernel.maps.remove(server)
        assert kernel.maps.sockets() == 0
        with pytest.raises(KeyError):
            kernel.maps.remove(server)


def test_insert_after_reading_the_queue_empty_is_exact(
    kernel: KernelEcho, listener: socket.socket
) -> None:
    """The move to the kernel reads the receive queue until EAGAIN before the insert: the
    verdict then starts on a fresh skb and nothing user space read is echoed twice."""
    client, server = pair(listener)
    with client, server:
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
        kernel.maps.add(server)
        assert recv_exact(client, len(payload)) == payload
        sender.join(10)
        assert not sender.is_alive(), "the client's send did not finish"
        roundtrip(client, b"and nothing more")
        kernel.maps.remove(server)


def test_insert_after_peer_left_is_eopnotsupp(kernel: KernelEcho, listener: socket.socket) -> None:
    client, server = pair(listener)
    with server:
        with client:
            client.sendall(b"bye")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: tcp_state(server) != TCP_ESTABLISHED, what="the reset to arrive")
        with pytest.raises(OSError, match="not supported") as info:
            kernel.maps.add(server)
        assert info.value.errno == errno.EOPNOTSUPP


def test_close_unloads_everything() -> None:
    require_bpf()
    with KernelEcho() as k:
        ids = k.ids()
        progs, maps = loaded_bpf_ids()
        assert ids["prog_id"] in progs
        assert set(ids["map_ids"]) <= maps
        k.close()
        k.close()  # idempotent
    assert_unloaded({ids["prog_id"]}, set(ids["map_ids"]))


def test_failed_attach_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attach fails after the object is loaded: the loaded program and maps are all freed."""
    require_bpf()
    seen: list[tuple[set[int], set[int]]] = []

    def refuse(*args: object) -> None:
        seen.append(loaded_bpf_ids(ours=True))
        raise OSError(errno.EPERM, "refused by the test")

    before = loaded_bpf_ids(ours=True)
    monkeypatch.setattr(libbpf, "link_create", refuse)
    with pytest.raises(OSError, match="refused by the test"), KernelEcho():
        pass
    assert len(seen) == 1, "attach was never reached"
    progs, maps = seen[0][0] - before[0], seen[0][1] - before[1]
    assert progs, "no program of ours was loaded when attach ran"
    assert maps, "no map of ours was loaded when attach ran"
    assert_unloaded(progs, maps)


def test_verdict_attaches_through_a_link_or_to_the_map(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    """A BPF link where the kernel has sockmap links (6.10+); prog_attach where it has not."""
    require_bpf()
    with KernelEcho() as kernel:
        assert kernel.attach == "bpf_link"
        assert kernel.describe()["link_id"] > 0
    monkeypatch.setattr(
        libbpf, "link_create", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no"))
    )
    with KernelEcho() as kernel:
        assert kernel.attach == "prog_attach"
        assert kernel.describe()["link_id"] is None
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        with client, server:
            kernel.maps.add(server)
            client.sendall(b"through the map attach")
            assert recv_exact(client, 22) == b"through the map attach"
            kernel.maps.remove(server)


def test_missing_object_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError), KernelEcho("/nonexistent/echo.bpf.o"):
        pass


def test_library_is_the_wheel_or_env() -> None:
    """$ECHOD_LIBBPF when set, else the pylibbpf wheel's extension, never the system libbpf."""
    path = libbpf.library().path
    env = os.environ.get("ECHOD_LIBBPF")
    if env:
        assert path == env
        return
    spec = importlib.util.find_spec("pylibbpf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the pylibbpf wheel is not installed")
    wheel_dirs = {Path(p).resolve() for p in spec.submodule_search_locations}
    assert Path(path).resolve().parent in wheel_dirs, path
    assert Path(path).name.startswith("pylibbpf"), path
