"""UDP echo's user path without a daemon: the token buckets (a clock of the test's own), the
guard, the socket loop, and the slot the kernel path plugs into (a fake module)."""

from __future__ import annotations

import asyncio
import socket
import sys
import types
from typing import Any

import pytest
import uvloop

from echod.config.schema import Config
from echod.kernel.errors import NotSupported
from echod.service import udp
from echod.service.udp import Guard, TokenBuckets, UdpService


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_a_burst_then_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(100, clock)
    assert sum(buckets.take("192.0.2.1") for _ in range(1000)) == 100  # one second's worth
    clock.now += 0.5
    assert sum(buckets.take("192.0.2.1") for _ in range(1000)) == 50
    clock.now += 10.0  # a long pause refills to the burst, never beyond
    assert sum(buckets.take("192.0.2.1") for _ in range(1000)) == 100


def test_each_source_has_its_own_bucket() -> None:
    buckets = TokenBuckets(2, Clock())
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert [buckets.take("b") for _ in range(3)] == [True, True, False]


def test_rate_zero_is_no_limit_and_keeps_nothing() -> None:
    buckets = TokenBuckets(0, Clock())
    assert all(buckets.take(f"10.0.0.{i % 250}") for i in range(10_000))
    assert len(buckets) == 0


def test_the_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, clock, capacity=3)
    for source in ("a", "b", "c"):
        assert buckets.take(source)
    assert not buckets.take("a")  # a is now the most recently seen
    for i in range(10_000):  # a spoofed flood of new sources
        buckets.take(f"spoofed-{i}")
        assert len(buckets) <= 3
    assert buckets.take("a")  # evicted meanwhile: it starts again with a full bucket


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, clock)
    assert buckets.take("a")
    clock.now -= 100.0
    assert not buckets.take("a")


def test_a_new_rate_starts_every_bucket_again() -> None:
    buckets = TokenBuckets(1, Clock())
    assert buckets.take("a")
    assert not buckets.take("a")
    buckets.set_rate(5)
    assert sum(buckets.take("a") for _ in range(10)) == 5


def _config(**changes: Any) -> Config:
    return Config(**{"port": 8888, "udp": True, **changes})


@pytest.mark.parametrize("port", [0, 7, 13, 17, 19, 37, 8888])
def test_the_guard_drops_ports_that_could_loop(port: int) -> None:
    assert Guard(_config()).verdict("127.0.0.1", port) == "loop"


def test_the_guard_passes_other_ports_and_follows_the_config() -> None:
    guard = Guard(_config(udp_drop_ports=[]))
    assert guard.verdict("127.0.0.1", 7) is None  # no guard ports listed
    assert guard.verdict("127.0.0.1", 0) == "loop"  # but 0 and the own port always
    assert guard.verdict("127.0.0.1", 8888) == "loop"
    guard.apply(_config(port=9999, udp_drop_ports=[5353]))
    assert guard.verdict("127.0.0.1", 5353) == "loop"
    assert guard.verdict("127.0.0.1", 9999) == "loop"
    assert guard.verdict("127.0.0.1", 8888) is None


def test_the_guard_applies_allow_with_v6_and_mapped_sources() -> None:
    guard = Guard(_config(allow=["10.0.0.0/8", "2001:db8::/32"]))
    assert guard.verdict("10.1.2.3", 40000) is None
    assert guard.verdict("::ffff:10.1.2.3", 40000) is None
    assert guard.verdict("2001:db8::1", 40000) is None
    assert guard.verdict("fe80::1%lo", 40000) == "allow"
    assert guard.verdict("127.0.0.1", 40000) == "allow"
    # The loop check comes first: a guard port inside allow is still dropped as a loop.
    assert guard.verdict("10.1.2.3", 19) == "loop"


def test_the_guard_limits_each_source() -> None:
    clock = Clock()
    guard = Guard(_config(udp_rate_per_source=3), clock)
    verdicts = [guard.verdict("192.0.2.7", 40000) for _ in range(5)]
    assert verdicts == [None, None, None, "rate", "rate"]
    assert guard.verdict("192.0.2.8", 40000) is None
    clock.now += 1.0
    assert guard.verdict("192.0.2.7", 40001) is None  # by address, whatever the port


# -- the loop's reader, on sockets of the test's own ----------------------------------------


class FakeSocket:
    """Datagrams to read, then EAGAIN; its sends fail with `send_error` when set."""

    def __init__(self, datagrams: list[tuple[bytes, tuple[str, int]]], send_error: Any = None):
        self.datagrams = list(datagrams)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.send_error = send_error

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int]]:
        if not self.datagrams:
            raise BlockingIOError
        data, source = self.datagrams.pop(0)
        buf[: len(data)] = data
        return len(data), source

    def sendto(self, data: memoryview, source: tuple[str, int]) -> int:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((bytes(data), source))
        return len(data)


def _service(**changes: Any) -> UdpService:
    svc = UdpService(serves=True, owns_kernel=True)
    svc.enabled = True
    svc.guard = Guard(_config(**changes))
    return svc


def test_each_datagram_goes_back_whole_to_its_source_and_is_counted() -> None:
    svc = _service()
    big = bytes(range(256)) * 255 + b"x" * 255  # 65,535 bytes: the largest payload
    sock = FakeSocket([(b"", ("127.0.0.1", 40000)), (b"hi\n", ("::1", 40001)), (big, ("a", 1))])
    svc._on_readable(sock)
    assert sock.sent == [(b"", ("127.0.0.1", 40000)), (b"hi\n", ("::1", 40001)), (big, ("a", 1))]
    assert svc.user_counts()["echoed_packets"] == 3
    assert svc.user_counts()["echoed_bytes"] == 3 + len(big)


def test_a_full_send_buffer_drops_and_counts() -> None:
    svc = _service()
    sock = FakeSocket([(b"a", ("127.0.0.1", 40000))] * 3, send_error=BlockingIOError())
    svc._on_readable(sock)
    counts = svc.user_counts()
    assert (counts["send_errors"], counts["echoed_packets"]) == (3, 0)
    assert not sock.datagrams  # every one read: nothing waits for the buffer


def test_one_wake_up_reads_a_bounded_batch() -> None:
    svc = _service(udp_rate_per_source=0)
    sock = FakeSocket([(b"a", ("127.0.0.1", 40000))] * (udp.RECV_BATCH + 10))
    svc._on_readable(sock)
    assert len(sock.sent) == udp.RECV_BATCH
    assert len(sock.datagrams) == 10  # the loop calls again: the socket is still readable


def test_drops_are_counted_by_reason() -> None:
    svc = _service(allow=["127.0.0.0/8"], udp_rate_per_source=1)
    sock = FakeSocket(
        [
            (b"a", ("127.0.0.1", 7)),
            (b"a", ("127.0.0.1", 8888)),
            (b"a", ("192.0.2.1", 40000)),
            (b"a", ("127.0.0.1", 40000)),
            (b"a", ("127.0.0.1", 40000)),
        ]
    )
    svc._on_readable(sock)
    counts = svc.user_counts()
    assert (counts["dropped_loop"], counts["dropped_allow"], counts["dropped_rate"]) == (2, 1, 1)
    assert counts["echoed_packets"] == 1


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_real_sockets_echo_and_stop_closes_them() -> None:
    async def run() -> None:
        port = _free_udp_port()
        svc = UdpService(serves=True, owns_kernel=True)
        svc.start(_config(hosts=["127.0.0.1"], port=port), "user")
        assert svc.status()["listen"] == [f"127.0.0.1:{port}"]
        assert svc.status()["path"] == "user"
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            client.connect(("127.0.0.1", port))
            await loop.sock_sendall(client, b"ping")
            async with asyncio.timeout(5):
                assert await loop.sock_recv(client, 100) == b"ping"
        svc.stop()
        assert svc.sockets == []
        assert svc.status()["path"] is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))  # the port is free again

    uvloop.run(run())


def test_udp_off_opens_nothing_and_reports_nil() -> None:
    async def run() -> None:
        svc = UdpService(serves=True, owns_kernel=True)
        svc.start(Config(udp=False), "kernel")
        assert svc.sockets == []
        assert svc.kernel is None
        assert svc.figures() is None
        assert svc.status() == {
            "enabled": False,
            "path": None,
            "listen": [],
            "fallback_reason": None,
            "kernel": None,
        }

    uvloop.run(run())


# -- the kernel path's slot -------------------------------------------------------------------


def test_without_a_kernel_path_kernel_mode_falls_back_to_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "KERNEL_MODULE", "echod.kernel.no_such_udp_path")
    with pytest.raises(NotSupported, match="no UDP kernel path in this build"):
        udp.kernel_module()
    svc = UdpService(serves=False, owns_kernel=True)
    svc.start(_config(), "kernel")
    st = svc.status()
    assert st["path"] == "user"
    assert st["fallback_reason"] == (
        "UDP kernel path unavailable: no UDP kernel path in this build"
    )
    svc.follow(_config(), "user")  # a switch to user mode: nothing to explain any more
    assert svc.status()["fallback_reason"] is None


class FakeKernel:
    """What echod.kernel.udp.UdpKernelEcho will offer, recorded."""

    instances: list[FakeKernel] = []

    def __init__(self, path: str | None = None) -> None:
        self.configured: list[tuple[Any, ...]] = []
        self.counts = {"echoed_packets": 2, "echoed_bytes": 2, "passed_packets": 0}  # the check's
        self.ifindexes: list[int] = []
        self.closed = False
        FakeKernel.instances.append(self)

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def configure(self, port: int, drop_ports: Any, rate: int, allow: Any, hosts: Any = ()) -> None:
        self.configured.append((port, list(drop_ports), rate, list(allow)))
        self.hosts = list(hosts)

    def attach(self, ifindex: int) -> None:
        self.ifindexes.append(ifindex)

    def self_check(self, hosts: Any) -> str | None:
        return None

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def programs(self) -> list[dict[str, Any]]:
        return [{"id": 9, "name": "udp_echo"}]

    def describe(self) -> dict[str, Any]:
        return {"ifindexes": self.ifindexes}


def test_a_kernel_path_plugs_in_follows_the_mode_and_the_live_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("echod.kernel.fake_udp")
    module.UdpKernelEcho = FakeKernel
    module.devices_for = lambda hosts: [1] if list(hosts) == ["127.0.0.1"] else []
    monkeypatch.setitem(sys.modules, "echod.kernel.fake_udp", module)
    monkeypatch.setattr(udp, "KERNEL_MODULE", "echod.kernel.fake_udp")
    FakeKernel.instances.clear()
    svc = UdpService(serves=False, owns_kernel=True)
    config = _config(hosts=["127.0.0.1"], udp_rate_per_source=10, allow=["127.0.0.0/8"])
    svc.start(config, "kernel")
    kernel = FakeKernel.instances[-1]
    kernel.counts = {"echoed_packets": 7, "echoed_bytes": 52, "passed_packets": 1}
    assert kernel.configured == [(8888, [7, 13, 17, 19, 37], 10, ["127.0.0.0/8"])]
    assert kernel.ifindexes == [1]
    st = svc.status()
    assert (st["path"], st["fallback_reason"], st["kernel"]) == ("kernel", None, {"ifindexes": [1]})
    # Counted from when it began to serve: the self-check's 2 datagrams are left out.
    assert svc.figures() == {
        "user": None,
        "kernel": {"echoed_packets": 5, "echoed_bytes": 50, "passed_packets": 1},
    }
    assert svc.counters() == {"udp_kernel_echoed_packets": 5, "udp_kernel_echoed_bytes": 50}
    svc.apply(config.replace(udp_rate_per_source=20, udp_drop_ports=[19]))
    assert kernel.configured[-1] == (8888, [19], 20, ["127.0.0.0/8"])
    svc.follow(config, "user")  # restart --mode user: detached and freed
    assert kernel.closed
    assert svc.kernel is None
    assert svc.status()["path"] == "user"
    svc.follow(config, "kernel")  # and back
    assert svc.status()["path"] == "kernel"
    svc.stop()
    assert FakeKernel.instances[-1].closed
    assert svc.status()["path"] is None


class Refusing(FakeKernel):
    def attach(self, ifindex: int) -> None:
        raise NotSupported(95, "TCX is missing")


class FailingCheck(FakeKernel):
    def self_check(self, hosts: Any) -> str | None:
        return "1 B to 127.0.0.1: no echo within 0.5 s"


@pytest.mark.parametrize(
    ("kernel", "reason"),
    [
        (Refusing, "TCX is missing"),
        (FailingCheck, "it failed its self-check: 1 B to 127.0.0.1: no echo within 0.5 s"),
    ],
    ids=["attach", "self-check"],
)
def test_a_kernel_path_that_fails_is_freed_and_explained(
    monkeypatch: pytest.MonkeyPatch, kernel: type[FakeKernel], reason: str
) -> None:
    module = types.ModuleType("echod.kernel.fake_udp")
    module.UdpKernelEcho = kernel
    module.devices_for = lambda hosts: [1]
    monkeypatch.setitem(sys.modules, "echod.kernel.fake_udp", module)
    monkeypatch.setattr(udp, "KERNEL_MODULE", "echod.kernel.fake_udp")
    FakeKernel.instances.clear()
    svc = UdpService(serves=False, owns_kernel=True)
    svc.start(_config(), "kernel")
    assert FakeKernel.instances[-1].closed
    assert svc.status()["path"] == "user"
    assert svc.status()["fallback_reason"] == f"UDP kernel path unavailable: {reason}"
