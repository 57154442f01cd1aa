"""`echoctl bench --udp` against UDP echo servers started here: a faithful one (asyncio, on
127.0.0.1 and ::1) and ones that duplicate, damage, drop, delay or swap datagrams, each
counting what it did; the bench must report exactly those counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from echoctl.bench import mmsg
from echoctl.benchcmd import bench
from tests.integration.bench_util import run_bench

Send = Callable[[bytes], None]


class Reflector(asyncio.DatagramProtocol):
    """RFC 862 echo; `misbehave(n, data, send)` may replace the echo of the n-th datagram."""

    def __init__(self, misbehave: Callable[[Reflector, int, bytes, Send], bool] | None) -> None:
        self.misbehave = misbehave
        self.received = 0
        self.did = 0  # how many datagrams it duplicated, damaged, dropped, delayed or swapped
        self.held: bytes | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 << 20)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.received += 1
        transport = self.transport

        def send(payload: bytes) -> None:
            transport.sendto(payload, addr)

        if self.misbehave is None or not self.misbehave(self, self.received, data, send):
            send(data)


@contextlib.contextmanager
def reflector(
    host: str, misbehave: Callable[[Reflector, int, bytes, Send], bool] | None = None
) -> Iterator[tuple[Reflector, int]]:
    """Run a Reflector on host:free port in a thread; yield it and its port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proto = Reflector(misbehave)
    opened = asyncio.run_coroutine_threadsafe(
        loop.create_datagram_endpoint(lambda: proto, local_addr=(host, 0)), loop
    )
    transport, _ = opened.result(timeout=10)
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))  # the close completes on the loop
        loop.close()


def udp(port: int, *args: str, host: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    return run_bench("--udp", "--host", host, "--port", str(port), *args)


def clean(r: dict[str, Any]) -> bool:
    """Every datagram sent came back once, whole, in order."""
    bad = ("lost", "late", "duplicates", "mismatches", "reordered", "errors", "warmup_errors")
    return r["datagrams_sent"] == r["datagrams_echoed"] > 0 and not any(r[k] for k in bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ping_pong_every_datagram_back(host: str) -> None:
    with reflector(host) as (server, port):
        code, r = udp(port, "-c", "4", "-r", "300", "--workers", "2", host=host)
    assert code == 0, r
    assert clean(r), r
    assert r["datagrams_sent"] == 1200 == server.received
    assert (r["protocol"], r["pattern"], r["window"], r["connections_alive"]) == (
        "udp",
        "pingpong",
        1,
        4,
    )
    assert r["bytes_sent"] == r["bytes_received"] == 1200 * 64
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["io"] == "sendmmsg"


def test_flood_by_duration_and_the_text_report() -> None:
    with reflector("127.0.0.1") as (server, port):
        code, r = udp(port, "--pattern", "flood", "-c", "3", "-d", "1", "-s", "200")
        args = ["--udp", "--port", str(port), "--pattern", "flood", "-r", "100", "-s", "1472"]
        text = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert code == 0, r
    assert clean(r), r
    assert r["window"] == 32
    assert r["datagrams_per_s"] > 1000
    assert r["datagrams_sent"] == server.received - 10 * 100  # the text run's ten flows
    assert text.exit_code == 0, text.output
    for line in ("flood, UDP, 10 flows x 1472 B (32 datagrams in flight)", "lost", "reordered"):
        assert line in text.output


def test_rate_paces_and_corrects_latency() -> None:
    with reflector("::1") as (_, port):
        code, r = udp(port, "-q", "2000", "-c", "2", "-d", "1", host="::1")
    assert code == 0, r
    assert clean(r), r
    assert r["pattern"] == "rate"
    assert r["target_qps"] == 2000
    assert 1700 <= r["datagrams_sent"] <= 2300
    assert {"p50", "p99"} <= r["latency_raw_us"].keys()


def every(k: int, limit: int = 1 << 62) -> Callable[[int], bool]:
    return lambda n: n % k == 0 and n <= limit


def test_duplicates_are_counted_and_fail_the_run() -> None:
    def twice(s: Reflector, n: int, data: bytes, send: Send) -> bool:
        if every(100)(n):
            s.did += 1
            send(data)
            send(data)
            return True
        return False

    # One worker: both flows in one engine, which reads every flow until the last is done, and
    # the last duplicate (the 900th datagram of 998) comes well before that. With a worker per
    # flow, one that started ahead could end with the 900th and never read its duplicate.
    with reflector("127.0.0.1", twice) as (server, port):
        code, r = udp(port, "-c", "2", "-r", "499", "--workers", "1")
    assert code == 1
    assert server.did == 9
    assert r["duplicates"] == 9, r
    assert r["datagrams_echoed"] == r["datagrams_sent"] == 998
    assert r["mismatches"] == r["lost"] == r["late"] == 0


def test_a_damaged_byte_is_a_mismatch_and_fails_the_run() -> None:
    def damage(s: Reflector, n: int, data: bytes, send: Send) -> bool:
        if every(100)(n):
            s.did += 1
            send(data[:-1] + bytes([data[-1] ^ 0x40]))
            return True
        return False

    with reflector("127.0.0.1", damage) as (server, port):
        code, r = udp(port, "--pattern", "flood", "-c", "2", "-r", "1000")
    assert code == 1
    assert server.did == 20
    assert r["mismatches"] == 20
    assert r["datagrams_echoed"] == 2000 - 20
    assert r["lost"] == r["duplicates"] == r["late"] == 0


def test_drops_are_lost_and_fail_only_beyond_max_loss() -> None:
    def drop(s: Reflector, n: int, data: bytes, send: Send) -> bool:
        if every(50)(n):
            s.did += 1
            return True
        return False

    for max_loss, status in (("0.001", 1), ("0.05", 0)):
        with reflector("127.0.0.1", drop) as (server, port):
            args = ["--pattern", "flood", "-c", "2", "-r", "1000", "--udp-timeout", "0.5"]
            code, r = udp(port, *args, "--max-loss", max_loss)
        assert code == status, r
        assert server.did == 40
        assert r["lost"] == 40
        assert r["loss_fraction"] == 0.02
        assert r["datagrams_echoed"] == 2000 - 40
        assert r["mismatches"] == r["duplicates"] == r["late"] == 0


def test_late_echoes_are_lost_and_then_late() -> None:
    def delay(s: Reflector, n: int, data: bytes, send: Send) -> bool:
        if every(100, limit=1000)(n):
            s.did += 1
            asyncio.get_running_loop().call_later(1.2, send, data)
            return True
        return False

    with reflector("127.0.0.1", delay) as (server, port):
        args = ["--pattern", "flood", "-c", "2", "-d", "2.5", "--udp-timeout", "0.4"]
        code, r = udp(port, *args, "--max-loss", "0.05")
    assert code == 0, r
    assert server.did == 10
    assert r["lost"] == r["late"] == 10
    assert r["mismatches"] == r["duplicates"] == 0
    assert r["datagrams_echoed"] == r["datagrams_sent"] - 10


def test_swapped_echoes_are_reordered_and_pass() -> None:
    def swap(s: Reflector, n: int, data: bytes, send: Send) -> bool:
        if s.held is not None:
            send(data)
            send(s.held)
            s.held = None
            s.did += 1
            return True
        if every(10)(n):
            s.held = data
            return True
        return False

    with reflector("127.0.0.1", swap) as (server, port):
        code, r = udp(port, "--pattern", "flood", "-c", "1", "-r", "1001")
    assert code == 0, r
    assert server.did == 100
    assert r["reordered"] == 100
    assert r["datagrams_echoed"] == r["datagrams_sent"] == 1001
    assert r["lost"] == r["mismatches"] == r["duplicates"] == 0


def test_warmup_is_not_counted() -> None:
    with reflector("127.0.0.1") as (_, port):
        code, r = udp(port, "--pattern", "flood", "-c", "2", "-d", "0.5", "--warmup", "0.3")
    assert code == 0, r
    assert clean(r), r
    assert r["duration_s"] == pytest.approx(0.5, abs=0.2)


def test_plain_calls_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOCTL_BENCH_MMSG", "0")
    with reflector("127.0.0.1") as (server, port):
        code, r = udp(port, "--pattern", "flood", "-c", "2", "-r", "500")
    assert code == 0, r
    assert clean(r), r
    assert r["io"] == "sendmsg (ECHOCTL_BENCH_MMSG=0)"
    assert r["datagrams_sent"] == server.received == 1000


def test_nothing_listening_is_a_socket_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, r = udp(port, "-c", "2", "-r", "10", "--udp-timeout", "0.2")
    assert code == 1
    assert r["errors"] == 2
    assert r["connections_alive"] == 0
    assert "refused" in r["error_details"][0]["error"]


def test_mmsg_round_trip() -> None:
    assert mmsg.available() == ""


def test_ctrl_c_reports_what_was_measured() -> None:
    script = "from echoctl.benchcmd import bench; bench()"
    with reflector("127.0.0.1") as (server, port):
        args = ["--udp", "--port", str(port), "--pattern", "flood", "-c", "2", "-d", "30", "-j"]
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while server.received < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 130
    r = json.loads(out)
    assert r["interrupted"] == "SIGINT"
    assert r["datagrams_echoed"] > 0
    assert r["mismatches"] == r["duplicates"] == r["errors"] == 0
    assert r["datagrams_echoed"] + r["lost"] == r["datagrams_sent"]


def test_an_inherited_control_socket_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOD_CONTROL", "/nonexistent/control.sock")
    with reflector("127.0.0.1") as (_, port):
        code, r = udp(port, "-c", "1", "-r", "50")
    assert code == 0, r
    assert clean(r), r
    assert "server" not in r
