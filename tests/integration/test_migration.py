"""Live mode switches (`restart --mode`) with traffic in flight: no byte lost, none doubled."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import Echod
from tests.integration.echo_util import (
    connect,
    roundtrip,
    send_without_reading,
    wait_for,
)
from tests.integration.traffic import DURATION, PingPong, Streamer, finish
from tests.util import log_events


@pytest.mark.bpf
def test_restart_switches_modes_under_traffic(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user")
    clients: list[PingPong | Streamer] = [PingPong(d.port, s) for s in (1, 64, 1500, 30000)]
    clients.append(Streamer(d.port))
    for c in clients:
        c.start()
    wait_for(lambda: d.status()["connections"] == len(clients), what="the clients to connect")
    sequence = ["kernel", "user", "kernel", "user", "kernel"]
    seen = []
    for mode in sequence:
        st = d.call("restart", {"mode": mode})
        assert st["mode"] == mode
        assert st["connections"] == len(clients), "a connection was dropped by the switch"
        seen.append((st["connections_by_path"], st["migration"]))
        time.sleep(DURATION / len(sequence))  # traffic runs on each path for a while
    finish(clients)
    assert all(c.rounds > 10 for c in clients if isinstance(c, PingPong))
    n = len(clients)
    # user -> kernel moves every connection into the map; kernel -> user leaves them there
    # (they keep the kernel path until they close), so later switches move nothing.
    assert seen[0] == ({"kernel": n, "user": 0}, {"moved": n, "stayed": 0})
    assert seen[1] == ({"kernel": n, "user": 0}, {"moved": 0, "stayed": n})
    assert seen[2] == ({"kernel": n, "user": 0}, {"moved": 0, "stayed": 0})
    stats = d.stats()
    assert stats["user"]["bytes"] > 0
    assert stats["kernel"]["redirected_bytes"] > 0


@pytest.mark.bpf
def test_new_connections_follow_the_mode_and_old_ones_keep_their_path(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as old:
        roundtrip(old, b"abc")
        st = d.call("restart", {"mode": "user"})
        assert st["migration"] == {"moved": 0, "stayed": 1}
        assert st["bpf"]["attached"], "BPF unloaded under a kernel-path connection"
        before = d.stats()
        with connect("::1", d.port) as new:
            roundtrip(new, os.urandom(5000))
            roundtrip(old, os.urandom(7000))
            assert d.status()["connections_by_path"] == {"kernel": 1, "user": 1}
        after = d.stats()
        assert after["user"]["bytes"] - before["user"]["bytes"] == 5000
        assert after["kernel"]["redirected_bytes"] - before["kernel"]["redirected_bytes"] == 7000
    wait_for(lambda: not d.status()["bpf"]["attached"], what="BPF to unload after the last close")


@pytest.mark.bpf
def test_restart_with_a_peer_that_never_reads_stays_bounded(
    echod_factory: Callable[..., Echod],
) -> None:
    """A user-path peer that never reads cannot be moved (its buffer never drains); flow
    control must still hold, and the switch must finish within its deadline."""
    d = echod_factory(mode="user")
    with connect("127.0.0.1", d.port) as hog:
        send_without_reading(hog, 1 << 40, seconds=3.0)  # fill until pushed back
        rss_before = d.stats()["process"]["rss_bytes"]
        began = time.monotonic()
        st = d.call("restart", {"mode": "kernel"})
        assert time.monotonic() - began < 10
        assert st["connections_by_path"] == {"kernel": 0, "user": 1}
        pushed, _ = send_without_reading(hog, 64 * 1024 * 1024, seconds=3.0)
        assert pushed < 16 * 1024 * 1024, "flow control was lost by the failed migration"
        assert d.stats()["process"]["rss_bytes"] - rss_before < 32 * 1024 * 1024


@pytest.mark.bpf
def test_stop_drains_a_kernel_path_connection_kept_across_a_switch(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"abc")
        d.call("restart", {"mode": "user"})
        roundtrip(sock, b"defg")
        d.call("stop")
        assert sock.recv(1) == b""
    events = log_events(d.log())
    assert "service.stopped" in events
    # Drained at once: waiting out the grace period ends in conn.drain_timeout.
    assert "conn.drain_timeout" not in events, "stop waited out the grace period"
