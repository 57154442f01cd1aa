"""UDP echo (`--udp`) of a real daemon: nc, socat and Python clients on both loopbacks, the
guard (loop ports, allow, the rate per source), workers, stop, and the reply shapes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from echod.control import replies
from tests.integration.conftest import HOSTS, Echod, Factory, free_port
from tests.integration.echo_util import wait_for
from tests.integration.test_reply_shapes import conforms

ECHOCTL = str(Path(sys.executable).parent / "echoctl")
QUIET = 0.5  # seconds without a datagram after which no more is expected
SIZES = [1, 1472, 65000]
NOT_SERVING = {"path": None, "listen": [], "fallback_reason": None, "kernel": None}


def udp_port() -> int:
    """A port free for TCP and UDP on both loopbacks."""
    for _ in range(50):
        port = free_port()
        try:
            for host in HOSTS:
                with socket.socket(family(host), socket.SOCK_DGRAM) as s:
                    if ":" in host:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free for TCP and UDP on both loopbacks")


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def client(host: str, source: tuple[str, int] | None = None) -> socket.socket:
    sock = socket.socket(family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if source is not None:
        sock.bind(source)
    return sock


def exchange(sock: socket.socket, host: str, port: int, payload: bytes) -> bytes | None:
    """Send one datagram; its reply, or None when none comes within QUIET seconds."""
    sock.settimeout(QUIET)
    sock.sendto(payload, (host, port))
    try:
        data, source = sock.recvfrom(1 << 17)
    except TimeoutError:
        return None
    assert source[:2] == (host, port)
    return data


def start(factory: Factory, *args: str, mode: str = "user") -> Echod:
    return factory(mode=mode, args=["--udp", *args], port=udp_port())


def user(d: Echod) -> dict[str, int]:
    figures = d.stats()["udp"]
    assert figures is not None
    counts: dict[str, int] = figures["user"]
    return counts


def udp_sockets(pids: list[int], port: int) -> list[Any]:
    """The UDP sockets of these processes bound to port."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found += [
                c
                for c in psutil.Process(pid).net_connections(kind="udp")
                if c.laddr and c.laddr.port == port
            ]
    return found


@pytest.mark.parametrize("mode", ["user", pytest.param("kernel", marks=pytest.mark.bpf)])
def test_nc_and_socat_get_their_line_back(echod_factory: Factory, mode: str) -> None:
    d = start(echod_factory, mode=mode)
    assert d.status()["udp"]["path"] == mode
    for host in HOSTS:
        r = subprocess.run(
            ["nc", "-u", "-w1", host, str(d.port)],
            input=b"hi\n",
            capture_output=True,
            timeout=15,
            check=False,
        )
        assert r.stdout == b"hi\n", (host, r)
        address = f"UDP6:[{host}]:{d.port}" if ":" in host else f"UDP4:{host}:{d.port}"
        r = subprocess.run(
            ["socat", "-t", "2", "-", address],
            input=b"hello socat\n",
            capture_output=True,
            timeout=15,
            check=False,
        )
        assert r.stdout == b"hello socat\n", (host, r)
    figures = d.stats()["udp"]
    assert figures is not None
    assert (figures[mode] or {}).get("echoed_packets") == 4, figures


@pytest.mark.parametrize("host", HOSTS)
def test_every_size_comes_back_exactly(echod_factory: Factory, host: str) -> None:
    d = start(echod_factory)
    sent = 0
    with client(host) as sock:
        for size in SIZES:
            payload = os.urandom(size)
            assert exchange(sock, host, d.port, payload) == payload, size
            sent += size
        assert exchange(sock, host, d.port, b"") == b""  # RFC 862: an empty one too
    counts = user(d)
    assert (counts["echoed_packets"], counts["echoed_bytes"]) == (len(SIZES) + 1, sent)
    assert counts["dropped_loop"] + counts["dropped_allow"] + counts["dropped_rate"] == 0


def _bind_guard_port(host: str) -> socket.socket:
    """A client bound to a guard port of host (7, or another default one if 7 is taken)."""
    for port in (7, 19, 13, 17, 37):
        sock = client(host)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return sock
    raise AssertionError(f"every guard port of {host} is taken")


def test_loop_ports_get_no_reply(echod_factory: Factory) -> None:
    d = start(echod_factory)
    for host in HOSTS:
        with _bind_guard_port(host) as sock:
            assert exchange(sock, host, d.port, b"loop?") is None, sock.getsockname()
    # echod's own port, from another loopback address.
    with client("127.0.0.1", ("127.0.0.2", d.port)) as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"loop?") is None
    wait_for(lambda: user(d)["dropped_loop"] == 3, what="3 datagrams dropped as loops")
    with client("127.0.0.1") as sock:  # others are still answered
        assert exchange(sock, "127.0.0.1", d.port, b"fine") == b"fine"
    assert user(d)["echoed_packets"] == 1


def test_allow_list_excluding_the_client_drops(echod_factory: Factory) -> None:
    d = start(echod_factory, "--allow", "10.0.0.0/8,2001:db8::/32")
    for host in HOSTS:
        with client(host) as sock:
            assert exchange(sock, host, d.port, b"let me in") is None
    wait_for(lambda: user(d)["dropped_allow"] == 2, what="2 datagrams dropped by allow")
    assert user(d)["echoed_packets"] == 0


@pytest.mark.parametrize(("workers", "ports"), [(1, 1), (2, 16)])
def test_one_source_is_held_to_its_rate(echod_factory: Factory, workers: int, ports: int) -> None:
    """With workers, one address sending from many ports still gets its rate, not a rate per
    worker: SO_REUSEPORT steers every datagram of one address to one worker (reuseport.py)."""
    rate, count, chunk = 100, 1000, 50
    d = start(echod_factory, "--udp-rate-per-source", str(rate), "--workers", str(workers))
    replies_ = 0
    socks = [client("127.0.0.1") for _ in range(ports)]
    try:
        for sock in socks:
            sock.setblocking(False)
        began = time.monotonic()
        for n in range(count // chunk):  # paced, so that no socket buffer overflows
            for i in range(chunk):
                socks[(n * chunk + i) % ports].sendto(b"r" * 16, ("127.0.0.1", d.port))
            time.sleep(0.02)
            for sock in socks:
                with contextlib.suppress(BlockingIOError):
                    for _ in range(count):
                        sock.recv(64)
                        replies_ += 1
        time.sleep(QUIET)
        for sock in socks:
            with contextlib.suppress(BlockingIOError):
                for _ in range(count):
                    sock.recv(64)
                    replies_ += 1
        elapsed = time.monotonic() - began
    finally:
        for sock in socks:
            sock.close()
    # A burst of one second's worth, then the rate; one datagram of slack for the clock.
    assert rate <= replies_ <= rate + rate * elapsed + 1, (replies_, elapsed)
    wait_for(
        lambda: user(d)["echoed_packets"] + user(d)["dropped_rate"] == count,
        what="every datagram echoed or dropped for its rate",
    )
    assert user(d)["echoed_packets"] == replies_


def test_both_workers_echo_and_their_counts_add_up(echod_factory: Factory) -> None:
    d = start(echod_factory, "--workers", "2")
    wait_for(
        lambda: [w["state"] for w in d.status()["workers"]] == ["serving", "serving"],
        what="2 serving workers",
    )
    st = d.status()
    assert st["udp"]["listen"] == [f"127.0.0.1:{d.port}", f"[::1]:{d.port}"]
    pids = [w["pid"] for w in st["workers"]]
    assert len(udp_sockets(pids, d.port)) == 4  # each worker its own, on both loopbacks
    assert udp_sockets([d.proc.pid], d.port) == []  # none in the supervisor
    # Freeze worker 0: the source addresses steered to worker 1 (by address, reuseport.py)
    # are answered at once, the others once worker 0 runs again.
    socks = [client("127.0.0.1", (f"127.0.0.{i + 1}", 0)) for i in range(32)]
    try:
        os.kill(pids[0], signal.SIGSTOP)
        try:
            for i, sock in enumerate(socks):
                sock.sendto(b"%d" % i, ("127.0.0.1", d.port))
            time.sleep(QUIET)
            at_once = set()
            for i, sock in enumerate(socks):
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    assert sock.recv(64) == b"%d" % i
                    at_once.add(i)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        later = set()
        for i, sock in enumerate(socks):
            if i not in at_once:
                sock.settimeout(10.0)
                assert sock.recv(64) == b"%d" % i
                later.add(i)
    finally:
        for sock in socks:
            sock.close()
    assert at_once, "worker 1 echoed nothing"
    assert later, "worker 0 echoed nothing"
    assert user(d)["echoed_packets"] == 32
    d.call("stop")
    assert udp_sockets(pids, d.port) == []


def test_stop_closes_every_udp_socket_and_start_opens_them_again(
    echod_factory: Factory,
) -> None:
    d = start(echod_factory)
    assert len(udp_sockets([d.proc.pid], d.port)) == 2
    assert d.call("stop")["udp"] == {"enabled": True, **NOT_SERVING}
    assert udp_sockets([d.proc.pid], d.port) == []
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"anyone?") is None
    proc = psutil.Process(d.proc.pid)
    stopped = proc.num_fds()
    for _ in range(3):  # stop and start again leave nothing behind
        d.call("start")
        assert len(udp_sockets([d.proc.pid], d.port)) == 2
        with client("::1") as sock:
            assert exchange(sock, "::1", d.port, b"back") == b"back"
        d.call("stop")
    wait_for(lambda: proc.num_fds() <= stopped, what=f"at most {stopped} fds once stopped")
    d.stop()
    out = subprocess.run(
        ["ss", "-Huan", f"sport = :{d.port}"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_status_and_stats_shapes(echod_factory: Factory) -> None:
    d = start(echod_factory)
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"shape") == b"shape"
    status, stats = d.status(), d.stats()
    conforms(status["udp"], replies.UdpStatus, "status.udp")
    assert status["udp"]["enabled"] is True
    assert status["udp"]["path"] == "user"
    assert status["udp"]["listen"] == [f"127.0.0.1:{d.port}", f"[::1]:{d.port}"]
    assert status["udp"]["fallback_reason"] is None
    conforms(stats["udp"], replies.UdpFigures, "stats.udp")
    conforms(stats["udp"]["user"], replies.UdpCounts, "stats.udp.user")
    assert stats["udp"]["kernel"] is None
    assert stats["udp"]["user"]["echoed_packets"] == 1
    # echoctl shows a row for it in status and stats.
    for command, row in (("status", "udp "), ("stats", "udp (user) ")):
        out = subprocess.run(
            [ECHOCTL, "--control", d.control, command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        assert any(line.startswith(row) for line in out.splitlines()), out


def test_udp_off_answers_no_datagram(echod_factory: Factory) -> None:
    d = echod_factory(mode="user", port=udp_port())
    assert d.status()["udp"] == {"enabled": False, **NOT_SERVING}
    assert d.stats()["udp"] is None
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"hello?") is None


def test_metrics_have_the_udp_families(echod_factory: Factory) -> None:
    port = free_port()
    d = start(echod_factory, "--metrics", f"127.0.0.1:{port}")
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"m" * 10) == b"m" * 10

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text: str = r.read().decode()
        return text

    wait_for(lambda: 'echod_udp_datagrams_total{path="user"} 1.0' in scrape(), what="a sample")
    text = scrape()
    assert "echod_udp_enabled 1.0" in text
    assert 'echod_udp_path{path="user"} 1.0' in text
    assert 'echod_udp_bytes_total{path="user"} 10.0' in text
    assert 'echod_udp_dropped_total{path="user",reason="loop"} 0.0' in text


def test_reload_applies_the_rate_and_guard_ports_live_and_udp_needs_a_restart(
    echod_factory: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "echod.toml"
    config.write_text("udp = true\nudp_rate_per_source = 1\n")
    d = echod_factory(mode="user", args=["--config", str(config)], port=udp_port())
    with client("127.0.0.1") as sock:
        answers = [exchange(sock, "127.0.0.1", d.port, b"%d" % i) for i in range(3)]
    assert answers == [b"0", None, None]
    config.write_text("udp = false\nudp_rate_per_source = 0\nudp_drop_ports = []\n")
    result = d.call("reload")
    assert set(result["applied"]) == {"udp_rate_per_source", "udp_drop_ports"}
    assert result["needs_restart"] == ["udp"]
    assert d.status()["udp"]["enabled"] is True  # until the daemon is restarted
    with client("127.0.0.1") as sock:
        answers = [exchange(sock, "127.0.0.1", d.port, b"%d" % i) for i in range(3)]
    assert answers == [b"0", b"1", b"2"]
    with _bind_guard_port("127.0.0.1") as sock:  # no guard ports listed any more
        assert exchange(sock, "127.0.0.1", d.port, b"seven") == b"seven"
