"""The UDP echo's kernel path (UdpKernelEcho, no daemon): datagrams turned around at TCX ingress
on lo and on a veth pair, what it leaves to the stack, what it drops, and that close leaves no
link, program or map. No socket listens on the echo port unless a test says so: an answer can
only come from the program."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from echod.kernel import libbpf
from echod.kernel.errors import NotSupported
from echod.kernel.udp import DEFAULT_DROP_PORTS, UdpKernelEcho, devices_for
from tests.integration.conftest import assert_unloaded, require_bpf
from tests.integration.netns_util import ip, veth_namespace

pytestmark = pytest.mark.bpf

LO = socket.if_nametoindex("lo")
REPLY_TIMEOUT = 2.0
QUIET = 0.5  # how long "no answer" waits


def bpftool(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "-j", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return json.loads(out or "[]")


def assert_gone(ids: dict[str, Any]) -> None:
    """None of the object's program, maps or links is left in the kernel."""
    assert_unloaded({ids["prog_id"]}, set(ids["map_ids"]))
    links = {ln["id"]: ln.get("prog_id") for ln in bpftool("link", "show")}
    assert not [i for i, p in links.items() if p == ids["prog_id"] or i in ids["link_ids"]]


@pytest.fixture
def echo() -> Iterator[UdpKernelEcho]:
    require_bpf()
    with UdpKernelEcho() as k:
        yield k
        ids = k.ids() if k.loaded else None
    if ids is not None:
        assert_gone(ids)


def free_udp_port(besides: int = 0) -> int:
    """A UDP port free on both 127.0.0.1 and ::1 (and not `besides`)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            if port == besides:
                continue
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
                try:
                    s6.bind(("::1", port))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no UDP port free on both loopbacks")


def serve(echo: UdpKernelEcho, **kw: Any) -> int:
    """Configure a free port (keyword arguments override the defaults) and attach to lo."""
    port = kw.pop("port", None) or free_udp_port()
    args = {"drop_ports": DEFAULT_DROP_PORTS, "rate_per_source": 0, "allow": (), **kw}
    echo.configure(port, **args)
    echo.attach(LO)
    return port


def client(host: str, port: int = 0, timeout: float = REPLY_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.bind((host, port))
    return sock


def exchange(sock: socket.socket, payload: bytes, dest: tuple[str, int]) -> bytes | None:
    """Send one datagram; its answer from dest, or None when none came in time."""
    sock.sendto(payload, dest)
    try:
        data, addr = sock.recvfrom(1 << 17)
    except TimeoutError:
        return None
    assert addr[:2] == dest, f"an answer from {addr}, not from {dest}"
    return data


def moved(echo: UdpKernelEcho, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in echo.counters().items()}


def some_loopback() -> str:
    """A random 127/8 address other than 127.0.0.1: binding port 7 there collides with nobody."""
    return "127.{}.{}.{}".format(*random.choices(range(1, 255), k=3))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_datagrams_are_echoed_exactly(echo: UdpKernelEcho, host: str) -> None:
    """1 B and 1,472 B, and 65,000 B, which lo (MTU 65,536) carries in one packet."""
    port = serve(echo)
    before = echo.counters()
    sizes = (1, 1472, 65000)
    with client(host) as c:
        for size in sizes:
            payload = os.urandom(size)
            assert exchange(c, payload, (host, port)) == payload, f"{size} B"
    d = moved(echo, before)
    d.pop("passed_packets")  # also counts anyone's IPv6 with extension headers on lo
    assert d == {
        "echoed_packets": 3,
        "echoed_bytes": sum(sizes),
        "dropped_loop": 0,
        "dropped_allow": 0,
        "dropped_rate": 0,
    }


@pytest.mark.parametrize(
    ("host", "option", "value", "size"),
    [
        ("::1", "", b"", 65527),  # past lo's MTU (65,536) in IPv6 only: 2 fragments, counted once
        ("127.0.0.1", "IP_OPTIONS", b"\x01\x01\x01\x01", 100),  # four NOPs: ihl 6
        ("::1", "IPV6_HOPOPTS", b"\x00\x00\x01\x04\x00\x00\x00\x00", 100),  # PadN
    ],
)
def test_what_it_cannot_read_whole_goes_to_the_socket_untouched(
    echo: UdpKernelEcho, host: str, option: str, value: bytes, size: int
) -> None:
    """The socket gets it as sent; no answer comes (the socket does not answer)."""
    port = serve(echo)
    level = socket.IPPROTO_IPV6 if ":" in host else socket.IPPROTO_IP
    before = echo.counters()
    with client(host, port=port) as server, client(host, timeout=QUIET) as c:
        if option:
            c.setsockopt(level, getattr(socket, option), value)
        payload = os.urandom(size)
        assert exchange(c, payload, (host, port)) is None, "the program answered"
        data, addr = server.recvfrom(1 << 17)
        assert (data, addr[:2]) == (payload, c.getsockname()[:2])
    d = moved(echo, before)
    if option == "IPV6_HOPOPTS":  # its port is not read: anyone's such packet counts
        assert d.pop("passed_packets") >= 1
    else:
        assert d.pop("passed_packets") == 1
    assert not any(d.values()), d


def test_other_ports_and_addresses_pass_untouched(echo: UdpKernelEcho) -> None:
    """Another port; with hosts set, another address and the family none of them is of."""
    port = serve(echo, hosts=["127.0.0.2"])
    other = free_udp_port()
    before = echo.counters()
    for host, dport in (("127.0.0.1", other), ("127.0.0.1", port), ("::1", port)):
        with client(host, port=dport) as server, client(host, timeout=QUIET) as c:
            payload = os.urandom(100)
            assert exchange(c, payload, (host, dport)) is None, f"[{host}]:{dport} answered"
            data, addr = server.recvfrom(1 << 17)
            assert (data, addr[:2]) == (payload, c.getsockname()[:2])
    d = moved(echo, before)
    d.pop("passed_packets")
    assert not any(d.values()), d
    with client("127.0.0.1") as c:
        assert exchange(c, b"to echod's address", ("127.0.0.2", port)) == b"to echod's address"


@pytest.mark.parametrize("source", ["port 7", "echod's port", "port 0", "a configured port"])
def test_guard_ports_are_dropped(echo: UdpKernelEcho, source: str) -> None:
    port = free_udp_port()
    extra = free_udp_port(besides=port)
    serve(echo, port=port, drop_ports=[*DEFAULT_DROP_PORTS, extra])
    before = echo.counters()
    if source == "port 0":  # only a raw socket can send from port 0
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
            raw.sendto(struct.pack("!HHHH", 0, port, 9, 0) + b"x", ("127.0.0.1", 0))
    else:
        sport = {"port 7": 7, "echod's port": port, "a configured port": extra}[source]
        with client(some_loopback(), port=sport, timeout=QUIET) as c:
            assert exchange(c, b"loop?", ("127.0.0.1", port)) is None
    time.sleep(0.1)  # the raw send is not waited for
    d = moved(echo, before)
    assert (d["dropped_loop"], d["echoed_packets"]) == (1, 0)
    if source == "a configured port":  # configured again, live, without it: answered
        echo.configure(port, DEFAULT_DROP_PORTS, 0, [])
        with client(some_loopback(), port=extra) as c:
            assert exchange(c, b"now answered", ("127.0.0.1", port)) == b"now answered"


def test_allow_list(echo: UdpKernelEcho) -> None:
    port = serve(echo, allow=["10.0.0.0/8", "fd00::/8"])
    before = echo.counters()
    for host in ("127.0.0.1", "::1"):
        with client(host, timeout=QUIET) as c:
            assert exchange(c, b"not allowed", (host, port)) is None
    assert moved(echo, before)["dropped_allow"] == 2
    echo.configure(port, DEFAULT_DROP_PORTS, 0, ["127.0.0.2/32", "::1/128"])
    before = echo.counters()
    for src, dst in (("127.0.0.2", "127.0.0.1"), ("::1", "::1"), ("127.0.0.1", "127.0.0.1")):
        with client(src, timeout=REPLY_TIMEOUT if src != "127.0.0.1" else QUIET) as c:
            got = exchange(c, b"allowed?", (dst, port))
            assert got == (None if src == "127.0.0.1" else b"allowed?"), src
    d = moved(echo, before)
    assert (d["echoed_packets"], d["dropped_allow"]) == (2, 1)


def test_rate_per_source(echo: UdpKernelEcho) -> None:
    """100/s with a burst of one second's worth: 1,000 sent at once get about 100 answers."""
    rate, sent = 100, 1000
    port = serve(echo, rate_per_source=rate)
    before = echo.counters()
    got = 0
    with client("127.0.0.1", timeout=QUIET) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        start = time.monotonic()
        for i in range(sent):
            c.sendto(b"%04d" % i, ("127.0.0.1", port))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 10
        while got < sent and time.monotonic() < deadline:
            try:
                c.recv(64)
            except TimeoutError:
                break
            got += 1
    d = moved(echo, before)
    assert d["echoed_packets"] == got
    assert d["dropped_rate"] == sent - got
    assert rate <= got <= rate + rate * elapsed + 2, (got, elapsed)


def test_attach_is_idempotent_and_close_leaves_nothing() -> None:
    require_bpf()
    with UdpKernelEcho() as k:
        port = serve(k)
        k.attach(LO)
        desc = k.describe()
        ids = k.ids()
        assert (desc["attach"], desc["ifindexes"], k.ifindexes) == ("tcx", [LO], [LO])
        assert desc["programs"] == [{"id": ids["prog_id"], "name": "udp_echo", "type": "sched_cls"}]
        assert (len(desc["link_ids"]), desc["maps"]) == (1, ids["map_ids"])
        links = [ln for ln in bpftool("link", "show") if ln["id"] in desc["link_ids"]]
        assert [ln["prog_id"] for ln in links] == [ids["prog_id"]]
        assert links[0]["type"] in (11, "tcx")  # bpftool 7.1 knows the number only
        assert k.programs()[0]["id"] == ids["prog_id"]
        k.detach_all()
        assert (k.ifindexes, k.describe()["attached"]) == ([], False)
        with client("127.0.0.1", timeout=QUIET) as c:
            assert exchange(c, b"detached", ("127.0.0.1", port)) is None
        k.attach(LO)
        ids = k.ids()
    k.close()  # idempotent
    assert_gone(ids)


def test_a_kernel_without_tcx_is_not_supported(
    echo: UdpKernelEcho, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(program: int, ifindex: int) -> libbpf.Link:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(libbpf, "attach_tcx", refuse)
    with pytest.raises(NotSupported, match="TCX \\(Linux 6.6 or later\\)"):
        echo.attach(LO)
    assert (echo.ifindexes, echo.describe()["attached"]) == ([], False)


def test_loads_and_echoes_with_cap_bpf_and_cap_net_admin_alone() -> None:
    """What the unit grants; bpf_enable_stats, which needs CAP_SYS_ADMIN, is only logged."""
    require_bpf()
    port = free_udp_port()
    code = (
        "import socket\nfrom echod.kernel.udp import UdpKernelEcho\n"
        "with UdpKernelEcho() as k, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:\n"
        f"    k.configure({port}, [7], 0, [])\n    k.attach({LO})\n    c.settimeout(2)\n"
        f"    c.sendto(b'capped', ('127.0.0.1', {port}))\n    print(c.recv(64).decode())\n"
    )
    argv = ["setpriv", "--bounding-set=-all,+bpf,+net_admin", sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert (out.returncode, "capped" in out.stdout.splitlines()) == (0, True), out.stderr


# Run in the namespace: the client, with checksum offload off on its device (so the datagrams
# it sends carry whole checksums), and a capture of the answers, whose checksums it computes.
NS_CLIENT = r"""
import array, fcntl, json, os, socket, struct, sys
host4, host6, port, dev = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for cmd in (0x17, 0x15):  # ETHTOOL_STXCSUM, ETHTOOL_SRXCSUM: off
    with socket.socket() as s:
        value = array.array("I", [cmd, 0])
        fcntl.ioctl(s, 0x8946, struct.pack("16sP", dev.encode(), value.buffer_info()[0]))
def fold(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
def datagram(frame):  # (checksums valid, source port) of a whole UDP datagram, or None
    ip = frame[14:]
    if frame[12:14] == b"\x08\x00" and ip[9] == 17:
        if struct.unpack("!H", ip[6:8])[0] & 0x3FFF:  # MF or an offset: a fragment
            return None
        ihl = (ip[0] & 15) * 4
        udp = ip[ihl : struct.unpack("!H", ip[2:4])[0]]
        pseudo = ip[12:20] + struct.pack("!xBH", 17, len(udp))
        return fold(ip[:ihl]) == 0xFFFF and fold(pseudo + udp) == 0xFFFF, udp[:2]
    if frame[12:14] == b"\x86\xdd" and ip[6] == 17:
        udp = ip[40 : 40 + struct.unpack("!H", ip[4:6])[0]]
        return fold(ip[8:40] + struct.pack("!I3xB", len(udp), 17) + udp) == 0xFFFF, udp[:2]
    return None
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
cap.bind((dev, 0))
cap.setblocking(False)
results = []
cases = ((host4, 1), (host4, 1472), (host6, 1), (host6, 1452), (host4, 65000), (host6, 65000))
for host, size in cases:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0 if size < 65000 else 0.5)
        payload = os.urandom(size)
        s.sendto(payload, (host, port))
        try:
            answer = s.recv(1 << 17)
        except TimeoutError:
            answer = None
    sums = []
    for _ in range(10000):
        try:
            frame, addr = cap.recvfrom(1 << 17)
        except BlockingIOError:
            break
        got = datagram(frame) if addr[2] != socket.PACKET_OUTGOING else None
        if got and got[1] == struct.pack("!H", port):
            sums.append(got[0])
    results.append({"host": host, "size": size, "echoed": answer == payload, "sums": sums})
print(json.dumps(results))
"""


def test_veth_client_in_a_namespace(echo: UdpKernelEcho) -> None:
    """A second host: echoed on the host's veth end with checksums that verify in software;
    65,000 B datagrams, fragmented at MTU 1,500, are left to the stack (no socket: no answer)."""
    with veth_namespace() as (ns, host4, ns4):
        [ifindex] = devices_for([host4])
        veth = socket.if_indextoname(ifindex)
        net = f"fd00:e:{os.getpid() % 65536:x}"
        host6 = f"{net}::1"
        ip("addr", "add", f"{host6}/64", "dev", veth, "nodad")
        ip("-n", ns, "addr", "add", f"{net}::2/64", "dev", "eth0", "nodad")
        port = free_udp_port()
        echo.configure(port, DEFAULT_DROP_PORTS, 0, [], hosts=[host4, host6])
        echo.attach(ifindex)
        assert devices_for([host6]) == [ifindex]
        before = echo.counters()
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", NS_CLIENT]
        out = subprocess.run(
            [*argv, host4, host6, str(port), "eth0"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        results = json.loads(out.stdout)
        d = moved(echo, before)
    whole = [r for r in results if r["size"] < 65000]
    assert [(r["echoed"], r["sums"]) for r in whole] == [(True, [True])] * 4, results
    assert [(r["echoed"], r["sums"]) for r in results[4:]] == [(False, [])] * 2, results
    assert (d["echoed_packets"], d["echoed_bytes"]) == (4, 1 + 1472 + 1 + 1452)
    assert d["passed_packets"] == 2, d  # one per fragmented datagram
