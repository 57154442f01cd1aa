"""The UDP echo's records and constants against bpf/udp.h (where they are defined), its keys, its
argument checks and devices_for: nothing here loads BPF."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from echod.kernel import libbpf, udp
from echod.kernel.errors import NotSupported
from tests.unit.test_layouts import c_size, c_struct

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "udp.h"


def defines() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"#define (UDP_\w+) (\d+)", HEADER.read_text())}


def test_counters_mirror_the_header() -> None:
    c = c_struct(HEADER, "udp_counters")
    assert tuple(n for n, _ in c) == udp.COUNTER_FIELDS == udp.UdpCounters._fields
    assert udp.COUNTER_FIELDS == (
        "echoed_packets",
        "echoed_bytes",
        "passed_packets",
        "dropped_loop",
        "dropped_allow",
        "dropped_rate",
    )
    assert {code for _, code in c} == {"Q"}  # what percpu_totals sums: __u64 only
    assert c_size(c) == udp.COUNTERS_STRUCT.size == 8 * len(udp.COUNTER_FIELDS)


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("udp_config", udp.CONFIG_LAYOUT),
        ("udp_addr", udp.ADDR_LAYOUT),
        ("udp_prefix", udp.PREFIX_LAYOUT),
        ("udp_bucket", udp.BUCKET_LAYOUT),
    ],
)
def test_records_mirror_the_header(name: str, layout: tuple[tuple[str, str], ...]) -> None:
    c = c_struct(HEADER, name)
    assert list(layout) == c
    assert struct.calcsize("=" + "".join(code for _, code in layout)) == c_size(c)


def test_constants_mirror_the_header() -> None:
    d = defines()
    assert (udp.CHECK_V4, udp.CHECK_V6) == (d["UDP_CHECK_V4"], d["UDP_CHECK_V6"])
    assert (udp.L2_NONE, udp.L2_ETHERNET) == (d["UDP_L2_NONE"], d["UDP_L2_ETHERNET"])
    assert udp.MAX_DROP_PORTS == d["UDP_MAX_DROP_PORTS"]
    assert udp.MAX_ALLOW == d["UDP_MAX_ALLOW"]
    assert udp.MAX_ADDRS == d["UDP_MAX_ADDRS"]
    assert udp.BURST_SECONDS == d["UDP_BURST_SECONDS"]
    assert udp.CONFIG_STRUCT.size == c_size(c_struct(HEADER, "udp_config"))


def test_every_map_and_the_program_are_in_the_source() -> None:
    source = (ROOT / "bpf" / "udp.bpf.c").read_text()
    for name in udp.MAPS:
        assert re.search(rf"\}} {name} SEC\(\"\.maps\"\);", source), name
        assert len(name) < 16  # BPF_OBJ_NAME_LEN, with its NUL
    assert f'SEC("tcx/ingress")\nint {udp.PROGRAM}(' in source


def test_packaged_object_exists() -> None:
    raw = udp.default_object().read_bytes()
    assert raw[:4] == b"\x7fELF"
    assert (b"tcx/ingress" in raw, udp.PROGRAM.encode() in raw) == (True, True)


def test_keys() -> None:
    assert udp.address_key("127.0.0.1") == ipaddress.IPv6Address("::ffff:127.0.0.1").packed
    assert udp.address_key("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1").packed
    key = udp.prefix_key("10.1.2.3/8")  # host bits are ignored
    assert struct.unpack_from("=I", key)[0] == 8 + 96
    assert key[4:] == ipaddress.IPv6Address("::ffff:10.0.0.0").packed
    key = udp.prefix_key("2001:db8::/32")
    assert struct.unpack_from("=I", key)[0] == 32
    assert key[4:] == ipaddress.IPv6Address("2001:db8::").packed
    assert len(udp.prefix_key("::1")) == struct.calcsize("=5I")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, [], 0, []), "port 0"),
        ((65536, [], 0, []), "port 65536"),
        ((7000, [], -1, []), "rate -1"),
        ((7000, [], 2**32, []), "rate"),
        ((7000, [70000], 0, []), "drop ports"),
        ((7000, list(range(1000, 1065)), 0, []), "udp_drop_ports: 65 entries, at most 64"),
    ],
)
def test_configure_refuses_bad_arguments_before_touching_a_map(
    args: tuple[Any, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        udp.UdpKernelEcho().configure(*args)  # never loaded: a map write would fail otherwise


def test_configure_refuses_a_bad_prefix() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        udp.UdpKernelEcho().configure(7000, [], 0, ["10.0.0.0/33"])


def snic(family: int, address: str, netmask: str | None) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address, netmask=netmask)


def test_devices_for(monkeypatch: pytest.MonkeyPatch) -> None:
    v4, v6 = socket.AF_INET, socket.AF_INET6
    addrs = {
        "lo": [snic(v4, "127.0.0.1", "255.0.0.0"), snic(v6, "::1", "ffff:" * 7 + "ffff")],
        "eth0": [
            snic(socket.AF_PACKET, "52:54:00:12:34:56", None),
            snic(v4, "10.0.0.5", "255.255.255.0"),
            snic(v6, "fe80::5054:ff:fe12:3456%eth0", "ffff:ffff:ffff:ffff::"),
        ],
        "eth1": [snic(v4, "10.9.0.5", "255.255.255.0")],
        "down0": [snic(v4, "10.7.0.1", "255.255.255.0")],
    }
    up = {"lo": True, "eth0": True, "eth1": True, "down0": False}
    index = {"lo": 1, "eth0": 2, "eth1": 3, "down0": 4}
    monkeypatch.setattr(udp.psutil, "net_if_addrs", lambda: addrs)
    monkeypatch.setattr(
        udp.psutil, "net_if_stats", lambda: {n: SimpleNamespace(isup=u) for n, u in up.items()}
    )
    monkeypatch.setattr(udp.socket, "if_nametoindex", index.__getitem__)
    assert udp.devices_for(["127.0.0.1", "::1"]) == [1]
    assert udp.devices_for(["127.3.2.1"]) == [1]  # lo's /8
    assert udp.devices_for(["10.0.0.5"]) == [2]
    assert udp.devices_for(["fe80::5054:ff:fe12:3456%eth0", "10.9.0.5"]) == [2, 3]
    assert udp.devices_for(["10.0.0.6", "10.7.0.1"]) == []  # nobody's; a down device's
    assert udp.devices_for(["0.0.0.0"]) == udp.devices_for(["::"]) == [1, 2, 3]
    assert udp.devices_for([]) == []


def test_devices_for_on_this_host() -> None:
    lo = socket.if_nametoindex("lo")
    assert udp.devices_for(["127.0.0.1"]) == [lo]
    assert lo in udp.devices_for(["0.0.0.0"])
    assert udp.device_l2(lo) == udp.L2_ETHERNET  # lo's packets carry a zero Ethernet header


def test_a_libbpf_without_tcx_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's libbpf 1.1 has no bpf_program__attach_tcx (nor the section "tcx/ingress")."""
    monkeypatch.setattr(libbpf.library(), "attach_tcx", None)
    with pytest.raises(NotSupported, match=r"no TCX \(libbpf 1.3 or later\)"):
        libbpf.attach_tcx(0, 1)
    with pytest.raises(NotSupported, match=r"no TCX"), udp.UdpKernelEcho():
        pass  # refused before anything is loaded
