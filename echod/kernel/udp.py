"""UDP echo (RFC 862) in the kernel: load bpf/udp.bpf.c and attach its TCX ingress program to
devices through BPF links; set its port, guard ports, allow list, rate and addresses.

The program turns each datagram to echod's port around where it arrives (MACs, addresses and
ports swapped, no checksum work) and redirects it out of the same device: no socket sees it.
It leaves to the stack what it does not read whole (fragments, IPv4 options, IPv6 extension
headers), which echod's user-mode socket answers if it listens. Each link lasts as long as this
process holds its fd: a SIGKILL detaches everything. `bpftool link show` lists the links
(type tcx); Debian's bpftool 7.1 does not show them under `bpftool net`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import structlog

from echod.kernel import libbpf, udpcheck
from echod.kernel.errors import NotSupported
from echod.kernel.info import link_info, map_info, prog_info, program_figures
from echod.kernel.objects import LoadedObject

log = structlog.get_logger("echod.udp")

PROGRAM = "udp_echo"
CONFIG_MAP = "udp_config"
DROP_PORTS_MAP = "udp_drop_ports"
ALLOW_MAP = "udp_allow"
ADDRS_MAP = "udp_addrs"
DEVICES_MAP = "udp_devices"
BUCKETS_MAP = "udp_buckets"
COUNTERS_MAP = "udp_counters"
MAPS = (CONFIG_MAP, DROP_PORTS_MAP, ALLOW_MAP, ADDRS_MAP, DEVICES_MAP, BUCKETS_MAP, COUNTERS_MAP)
ATTACH = "tcx"
PROGRAM_TYPE = "sched_cls"  # what bpftool calls a TCX program's type
BPF_LINK_TYPE_TCX = 11  # enum bpf_link_type (uapi/linux/bpf.h, 6.6+)
# Other echo-like services that answer whatever reaches them: echo, daytime, qotd, chargen,
# time. Two of them answering each other would loop forever.
DEFAULT_DROP_PORTS = (7, 13, 17, 19, 37)

# bpf/udp.h, where they are defined (tests/unit/test_udp_layout.py checks them).
CHECK_V4 = 1
CHECK_V6 = 2
L2_NONE = 0
L2_ETHERNET = 1
MAX_DROP_PORTS = 64
MAX_ALLOW = 1024
MAX_ADDRS = 256
BURST_SECONDS = 1
CONFIG_LAYOUT = (("port", "I"), ("check_dest", "I"), ("rate", "I"), ("allow", "I"))
ADDR_LAYOUT = (("ip", "4I"),)
PREFIX_LAYOUT = (("prefixlen", "I"), ("ip", "4I"))
BUCKET_LAYOUT = (("tokens", "Q"), ("stamp_ns", "Q"))


class UdpCounters(NamedTuple):
    """struct udp_counters (bpf/udp.h, where it is defined): every field a __u64, in order."""

    echoed_packets: int
    echoed_bytes: int
    passed_packets: int
    dropped_loop: int
    dropped_allow: int
    dropped_rate: int


COUNTER_FIELDS = UdpCounters._fields
COUNTERS_STRUCT = struct.Struct(f"={len(COUNTER_FIELDS)}Q")  # one CPU's struct udp_counters
CONFIG_STRUCT = struct.Struct("=" + "".join(code for _, code in CONFIG_LAYOUT))
_U32 = struct.Struct("=I")
_ONE = _U32.pack(1)
_ZERO = _U32.pack(0)

# ARPHRD_* (linux/if_arp.h): how a device's packets begin at TC ingress.
_ETHERNET_TYPES = {1: "ether", 772: "loopback"}
_L3_TYPES = {65534: "none", 519: "rawip", 768: "ipip", 769: "ip6tnl", 776: "sit", 778: "gre"}
_SIOCGIFHWADDR = 0x8927


def default_object() -> Path:
    """The compiled UDP echo object that ships inside the echod package."""
    return Path(str(resources.files("echod") / "bpf" / "udp.bpf.o"))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.split("%", 1)[0])


def _mapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct udp_addr: the 16 bytes of an address, IPv4 as ::ffff:a.b.c.d."""
    return b"\0" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed


def address_key(host: str) -> bytes:
    """A udp_addrs (and udp_buckets) key."""
    return _mapped(_ip(host))


def prefix_key(cidr: str) -> bytes:
    """A udp_allow key: struct udp_prefix, an IPv4 prefix v4-mapped with its length + 96."""
    net = ipaddress.ip_network(cidr.split("%", 1)[0], strict=False)
    extra = 96 if net.version == 4 else 0
    return _U32.pack(net.prefixlen + extra) + _mapped(net.network_address)


def device_l2(ifindex: int) -> int:
    """UDP_L2_* of a device: whether its packets begin with an Ethernet header at TC ingress."""
    name = socket.if_indextoname(ifindex)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # for the ioctl only
        req = struct.pack("16s16x", name.encode())
        kind = struct.unpack_from("=H", fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, req), 16)[0]
    if kind in _ETHERNET_TYPES:
        return L2_ETHERNET
    if kind in _L3_TYPES:
        return L2_NONE
    raise NotSupported(errno.EOPNOTSUPP, f"device {name}: link type {kind} is not supported")


def devices_for(hosts: Sequence[str]) -> list[int]:
    """The ifindexes of the up devices that carry these addresses, sorted.

    127.x.y.z and ::1 are lo's; a wildcard (0.0.0.0, ::) means every up device. An address
    that no up device carries adds none. Local clients of a non-loopback address reach it
    through lo, not through the device that carries it.
    """
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    found: set[int] = set()
    for host in hosts:
        ip = _ip(host)
        for name, st in stats.items():
            if st.isup and (ip.is_unspecified or _carries(addrs.get(name, []), ip)):
                with contextlib.suppress(OSError):  # gone meanwhile
                    found.add(socket.if_nametoindex(name))
    return sorted(found)


def _carries(addrs: list[Any], ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    for a in addrs:
        if a.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        mine = _ip(a.address)
        if mine == ip:
            return True
        if ip.is_loopback and mine.is_loopback and a.netmask:  # 127.0.0.1/8 carries 127.x
            if ip in ipaddress.ip_network(f"{mine}/{_ip(a.netmask)}", strict=False):
                return True
    return False


class UdpKernelEcho(LoadedObject):
    """Open → load as a context manager; attach() links the program to devices; close() (or
    exit) detaches every link and frees the program and maps.

    A `private` copy is a check's (`echoctl check`): it logs its steps at debug level and
    leaves BPF run-time statistics alone.
    """

    def __init__(self, path: str | Path | None = None, *, private: bool = False) -> None:
        super().__init__(str(path or default_object()))
        self.private = private
        self.log: Any = log.bind(private=True) if private else log
        if private:
            self.log.info = self.log.debug  # its comings and goings are the check's, not news
        self.prog_fd = -1
        self._program = 0  # the struct bpf_program pointer that attach_tcx takes
        self._fds: dict[str, int] = {}
        self._links: dict[int, libbpf.Link] = {}
        self._entries: dict[str, set[bytes]] = {
            DROP_PORTS_MAP: set(),
            ALLOW_MAP: set(),
            ADDRS_MAP: set(),
        }
        self._ncpus = 1
        self.stats_enabled = False

    def _open(self) -> None:
        lib = libbpf.library()
        if lib.attach_tcx is None:  # nor does it know the section "tcx/ingress"
            raise NotSupported(errno.ENOSYS, f"{lib.path} has no TCX (libbpf 1.3 or later)")
        obj = self._load()
        self._program = libbpf.check_ptr(
            obj.lib.cdll.bpf_object__find_program_by_name(obj.ptr, PROGRAM.encode()),
            f"bpf_object__find_program_by_name({PROGRAM})",
        )
        self.prog_fd = obj.program_fd(PROGRAM)
        self._fds = {name: obj.map_fd(name) for name in MAPS}
        self._ncpus = libbpf.possible_cpus()
        if not self.private:
            try:
                # Run-time accounting is a diagnostic: lacking it must not cost the echo.
                self._stack.enter_context(libbpf.enable_stats())
                self.stats_enabled = True
            except OSError as exc:
                log.warning("bpf.stats_unavailable", error=str(exc))
        self.log.info("udp.loaded", object=self.path, **self.ids())

    def configure(
        self,
        port: int,
        drop_ports: Sequence[int],
        rate_per_source: int,
        allow: Sequence[str],
        *,
        hosts: Sequence[str] = (),
    ) -> None:
        """Echo datagrams to `port`; may be called again while attached.

        drop_ports: source ports never answered (port 0 and `port` never are either);
        rate_per_source: datagrams per second per source address, 0 for no limit (a source's
        burst is BURST_SECONDS of it); allow: CIDR prefixes a source must match, empty for
        everyone; hosts: echod's addresses, the only destinations answered. Empty hosts
        answer any address; otherwise 0.0.0.0 answers any IPv4 address and :: any IPv6 one,
        and a family none of the hosts is of is not answered.

        New entries go in before the config and stale ones out after it: while this runs, a
        datagram meets the old rules, the new ones or their union.
        """
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not in 1-65535")
        if not 0 <= rate_per_source <= 0xFFFFFFFF:
            raise ValueError(f"rate {rate_per_source} is not in 0-4294967295")
        if any(not 0 <= p <= 0xFFFF for p in drop_ports):
            raise ValueError(f"drop ports {list(drop_ports)} are not all in 0-65535")
        wanted = {
            DROP_PORTS_MAP: {_U32.pack(p) for p in drop_ports},
            ALLOW_MAP: {prefix_key(cidr) for cidr in allow},
            ADDRS_MAP: {address_key(h) for h in hosts if not _ip(h).is_unspecified},
        }
        ips = [_ip(h) for h in hosts]
        check = 0
        for family, bit in ((4, CHECK_V4), (6, CHECK_V6)) if ips else ():
            if not any(ip.version == family and ip.is_unspecified for ip in ips):
                check |= bit
        limits = {DROP_PORTS_MAP: MAX_DROP_PORTS, ALLOW_MAP: MAX_ALLOW, ADDRS_MAP: MAX_ADDRS}
        for name, limit in limits.items():
            if len(wanted[name]) > limit:
                raise ValueError(f"{name}: {len(wanted[name])} entries, at most {limit}")
        for name, keys in wanted.items():
            for key in keys - self._entries[name]:
                libbpf.map_update(self._fds[name], key, _ONE)
                self._entries[name].add(key)
        config = CONFIG_STRUCT.pack(port, check, rate_per_source, int(bool(allow)))
        libbpf.map_update(self._fds[CONFIG_MAP], _ZERO, config)
        for name, keys in wanted.items():
            for key in self._entries[name] - keys:
                with contextlib.suppress(KeyError):
                    libbpf.map_delete(self._fds[name], key)
                self._entries[name].discard(key)
        self.log.info(
            "udp.configured",
            port=port,
            drop_ports=sorted(drop_ports),
            rate_per_source=rate_per_source,
            allow=list(allow),
            hosts=list(hosts),
        )

    def attach(self, ifindex: int) -> None:
        """Link the program to the ingress of a device (TCX); a device already linked is left
        as it is. Raises NotSupported on a kernel without TCX (before 6.6)."""
        if ifindex in self._links:
            return
        name = socket.if_indextoname(ifindex)
        key = _U32.pack(ifindex)
        libbpf.map_update(self._fds[DEVICES_MAP], key, _U32.pack(device_l2(ifindex)))
        try:
            link = libbpf.attach_tcx(self._program, ifindex)
        except OSError as exc:
            with contextlib.suppress(KeyError):
                libbpf.map_delete(self._fds[DEVICES_MAP], key)
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                why = f"cannot attach to {name} through TCX (Linux 6.6 or later): {exc.strerror}"
                raise NotSupported(exc.errno, why) from exc
            raise
        self._links[ifindex] = link
        self.log.info(
            "udp.attached", device=name, ifindex=ifindex, link_id=link_info(link.fd)["id"]
        )

    def detach_all(self) -> None:
        """Close every link: no device runs the program any more. Idempotent."""
        for ifindex, link in sorted(self._links.items()):
            link.close()
            with contextlib.suppress(KeyError, OSError):
                libbpf.map_delete(self._fds[DEVICES_MAP], _U32.pack(ifindex))
            self.log.info("udp.detached", ifindex=ifindex)
        self._links.clear()

    @property
    def ifindexes(self) -> list[int]:
        """The devices the program is linked to."""
        return sorted(self._links)

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        totals = libbpf.percpu_totals(self._fds[COUNTERS_MAP], COUNTERS_STRUCT, self._ncpus)
        return UdpCounters._make(totals)._asdict()

    def self_check(self, hosts: Sequence[str]) -> str | None:
        """The cases of echod.kernel.udpcheck on this attached object; None, or what failed.

        It is left configured for the check's private port: configure() it for real next.
        """
        return udpcheck.run(self, hosts)

    def programs(self) -> list[dict[str, Any]]:
        """Per-program figures, as KernelEcho.programs()."""
        return [program_figures(self.prog_fd, PROGRAM_TYPE)]

    def ids(self) -> dict[str, Any]:
        """Kernel ids of our program, maps and links (what `bpftool` lists)."""
        assert self._obj is not None, "not loaded"
        return {
            "prog_id": prog_info(self.prog_fd)["id"],
            "map_ids": [map_info(self._fds[name])["id"] for name in MAPS],
            "link_ids": [link_info(self._links[i].fd)["id"] for i in self.ifindexes],
        }

    def describe(self) -> dict[str, Any]:
        """What `status` can show while this object is loaded."""
        ids = self.ids()
        return {
            "attached": bool(self._links),
            "attach": ATTACH,
            "ifindexes": self.ifindexes,
            "programs": [{"id": ids["prog_id"], "name": PROGRAM, "type": PROGRAM_TYPE}],
            "maps": ids["map_ids"],
            "link_ids": ids["link_ids"],
            "stats_enabled": self.stats_enabled,
        }

    def close(self) -> None:
        """Detach every link, stop stats, free the program and maps; idempotent."""
        if self._obj is not None:
            self.detach_all()
            self._stack.close()
            self._obj = None
            self.prog_fd = -1
            self._program = 0
            self._fds = {}
            for entries in self._entries.values():
                entries.clear()
            self.log.info("udp.closed")
