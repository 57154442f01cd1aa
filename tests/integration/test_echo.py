"""Echo behaviour of a real daemon in both modes, mirroring the kernel's sockmap selftests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
from collections.abc import Callable

import pytest

from tests.integration.conftest import Echod
from tests.integration.echo_util import (
    burst_connect,
    connect,
    expect_eof,
    recv_exact,
    roundtrip,
    send_then_reset,
    wait_delivered,
    wait_for,
)
from tests.integration.traffic import assert_never_reader_bounded

SIZES = [1, 64, 1024, 16 * 1024, 64 * 1024, 1024 * 1024]
HOSTS = ["127.0.0.1", "::1"]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("size", SIZES)
def test_byte_exact_echo(daemon: Echod, host: str, size: int) -> None:
    with connect(host, daemon.port) as sock:
        roundtrip(sock, os.urandom(size))
        sock.shutdown(socket.SHUT_WR)
        expect_eof(sock)


@pytest.mark.parametrize("host", HOSTS)
def test_many_messages_per_connection(daemon: Echod, host: str) -> None:
    rng = random.Random(7)
    with connect(host, daemon.port) as sock:
        for _ in range(300):
            roundtrip(sock, os.urandom(rng.choice([1, 7, 64, 100, 1500, 4096, 20000])))


def test_echo_path_matches_mode(daemon: Echod) -> None:
    mode = daemon.status()["mode"]
    before = daemon.stats()
    with connect("127.0.0.1", daemon.port) as sock:
        roundtrip(sock, os.urandom(100_000))
    after = daemon.stats()
    user = after["user"]["bytes"] - before["user"]["bytes"]
    if mode == "kernel":
        assert user == 0, "kernel mode echoed in user space"
        assert after["kernel"]["redirected_bytes"] - before["kernel"]["redirected_bytes"] >= 100_000
    else:
        assert user == 100_000
        assert after["kernel"] is None


@pytest.mark.bpf
def test_kernel_packets_count_requests_not_the_fin(echod_factory: Callable[..., Echod]) -> None:
    """100 ping-pong messages are 100 redirected packets; the FIN's empty skb is counted apart."""
    daemon = echod_factory(mode="kernel")
    before = daemon.stats()
    with connect("127.0.0.1", daemon.port) as sock:
        for i in range(100):
            roundtrip(sock, b"hello%d" % (i % 10))
        sock.shutdown(socket.SHUT_WR)
        expect_eof(sock)
    wait_for(lambda: daemon.status()["connections"] == 0, what="the connection to close")
    after = daemon.stats()
    delta = {k: after["kernel"][k] - before["kernel"][k] for k in after["kernel"]}
    assert delta["redirected_packets"] == 100, delta
    assert delta["redirected_bytes"] == 600, delta
    assert delta["empty_packets"] >= 1, delta


@pytest.mark.parametrize("host", HOSTS)
def test_send_immediately_after_connect(daemon: Echod, host: str) -> None:
    assert burst_connect(host, daemon.port, 250) == 250


def test_data_queued_before_accept(daemon: Echod) -> None:
    """Freeze the daemon so bytes sit in the receive queue before the accept and the insert."""
    with contextlib.ExitStack() as stack:
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            socks = [stack.enter_context(connect("127.0.0.1", daemon.port)) for _ in range(20)]
            payloads = [os.urandom(3000) for _ in socks]
            for sock, payload in zip(socks, payloads, strict=True):
                sock.sendall(payload)
            for sock in socks:
                wait_delivered(sock)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        for sock, payload in zip(socks, payloads, strict=True):
            assert recv_exact(sock, len(payload)) == payload
            roundtrip(sock, os.urandom(500))  # and the connection keeps echoing afterwards


@pytest.mark.parametrize("how", ["close", "shut_wr"])
def test_peer_close_frees_connection(daemon: Echod, how: str) -> None:
    baseline = daemon.stats()
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect("127.0.0.1", daemon.port)) for _ in range(10)]
        for sock in socks:
            roundtrip(sock, os.urandom(2048))
        wait_for(lambda: daemon.status()["connections"] == 10, what="10 connections")
        if daemon.status()["mode"] == "kernel":
            assert daemon.stats()["kernel_sockets"] == 10
        for sock in socks:
            if how == "shut_wr":
                payload = os.urandom(50_000)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                assert recv_exact(sock, len(payload)) == payload
                expect_eof(sock)
            sock.close()
    wait_for(lambda: daemon.status()["connections"] == 0, what="connections to close")
    stats = daemon.stats()
    assert stats["kernel_sockets"] == 0
    assert stats["connections"]["closed"] - baseline["connections"]["closed"] == 10
    wait_for(
        lambda: daemon.stats()["process"]["open_fds"] <= baseline["process"]["open_fds"],
        what="fds to return to the baseline",
    )


def _frozen(d: Echod) -> None:
    os.kill(d.proc.pid, signal.SIGSTOP)


def _thaw(d: Echod) -> None:
    os.kill(d.proc.pid, signal.SIGCONT)


def test_peer_half_closed_before_insert(daemon: Echod) -> None:
    """Sent and SHUT_WR before the daemon inserts it: served in user space, echo then EOF."""
    before = daemon.stats()
    with contextlib.ExitStack() as stack:
        _frozen(daemon)
        try:
            sock = stack.enter_context(connect("127.0.0.1", daemon.port))
            payload = os.urandom(10_000)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            wait_delivered(sock)
        finally:
            _thaw(daemon)
        assert recv_exact(sock, len(payload)) == payload
        expect_eof(sock)
    after = daemon.stats()
    if daemon.status()["mode"] == "kernel":
        assert after["connections"]["insert_failed"] > before["connections"]["insert_failed"]


@pytest.mark.parametrize("how", ["reset", "probe"])
def test_peer_gone_before_insert(daemon: Echod, how: str) -> None:
    """Reset, or connect-and-close at once (a readiness probe): no crash, accept loop goes on."""
    baseline = daemon.stats()["process"]["open_fds"]
    _frozen(daemon)
    try:
        for _ in range(50):
            if how == "reset":
                send_then_reset("127.0.0.1", daemon.port)
                continue
            with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
                sock.shutdown(socket.SHUT_WR)
                wait_delivered(sock)
    finally:
        _thaw(daemon)
    with connect("127.0.0.1", daemon.port) as sock:
        roundtrip(sock, os.urandom(4096))
    assert daemon.proc.poll() is None
    wait_for(lambda: daemon.status()["connections"] == 0, what="connections to close")
    wait_for(lambda: daemon.stats()["process"]["open_fds"] <= baseline, what="fds back to baseline")


def test_peer_that_never_reads(daemon: Echod) -> None:
    """A sender that never reads is pushed back (user) or reset at the backlog limit (kernel).

    The kernel's psock queue is not bounded by any socket buffer, so kernel mode watches each
    connection's unwritten echo and resets it past kernel_backlog_limit (32 MiB by default).
    """
    assert_never_reader_bounded(daemon)


def test_max_connections_refuses_and_counts(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user", args=["--max-connections", "5"])
    with contextlib.ExitStack() as stack:
        kept = [stack.enter_context(connect("127.0.0.1", d.port)) for _ in range(5)]
        for sock in kept:
            roundtrip(sock, b"ok")
        for _ in range(3):
            with connect("127.0.0.1", d.port) as extra:
                try:
                    assert extra.recv(1) == b""
                except ConnectionResetError:
                    pass
        stats = d.stats()
        assert stats["connections"]["refused"]["max_connections"] == 3
        for sock in kept:
            roundtrip(sock, b"still served")
    assert "conn.refused" in d.log()


def _sockhash_id(d: Echod) -> int:
    for map_id in d.status()["bpf"]["maps"]:
        out = subprocess.run(
            ["bpftool", "-j", "map", "show", "id", str(map_id)],
            capture_output=True,
            text=True,
            check=True,
        )
        if json.loads(out.stdout)["name"] == "echo_sockets":
            return int(map_id)
    raise AssertionError("no echo_sockets map")


@pytest.mark.bpf
def test_socket_removed_from_map_behind_our_back(echod_factory: Callable[..., Echod]) -> None:
    """Bytes that no longer meet the verdict (the socket left the map) are echoed in user space."""
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"in the kernel")
        map_id = _sockhash_id(d)
        dump = subprocess.run(
            ["bpftool", "-j", "map", "dump", "id", str(map_id)],
            capture_output=True,
            text=True,
            check=True,
        )
        for entry in json.loads(dump.stdout):
            subprocess.run(
                ["bpftool", "map", "delete", "id", str(map_id), "key", *entry["key"]], check=True
            )
        payload = os.urandom(5000)
        roundtrip(sock, payload)
        roundtrip(sock, b"and on")
    assert d.stats()["user"]["bytes"] >= len(payload)
