"""Same-host bypass: load bpf/bypass.bpf.c, attach it through BPF links, follow echod's port.

The sock_ops and cgroup_skb ingress programs are attached to a cgroup v2 directory (by default
the hierarchy's root), so they see every TCP connection of the processes below; the sk_msg
program is attached to the bypass sockhash. Every attachment is a BPF link: it lasts as long as
this process holds its fd, so a SIGKILL leaves nothing attached.

Only echod's connections are touched: the listeners map holds echod's listening addresses
(network namespace, address, port), and each of echod's listeners carries a mark in its socket
storage that the kernel copies into every connection it accepts (bypass_paths.mark_listener).

Turning the bypass off, or stopping, detaches the links at once: no new connection enters
the sockhash. The connections already in it keep their path until they close, and the
kernel frees the programs and maps with the last of them. Removing a socket from the sockhash
would drop what is queued on its receive side: the bytes echoed to a client that it has not
read yet.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from echod.kernel import libbpf
from echod.kernel.errors import NotSupported
from echod.kernel.info import link_info, map_info, prog_info, program_figures
from echod.kernel.objects import LoadedObject

log = structlog.get_logger("echod.bypass")

SOCKOPS_PROGRAM = "bypass_sockops"
MSG_PROGRAM = "bypass_msg"
INGRESS_PROGRAM = "bypass_ingress"
PROGRAMS = (SOCKOPS_PROGRAM, MSG_PROGRAM, INGRESS_PROGRAM)
SOCKETS_MAP = "bypass_sockets"
LISTENERS_MAP = "bypass_listeners"
PATHS_MAP = "bypass_paths"
LINKS_MAP = "bypass_links"
COUNTERS_MAP = "bypass_counters"
SO_NETNS_COOKIE = 71  # asm-generic/socket.h; the socket module does not export it

# bpf/bypass.h: BYPASS_SETTING_*, a listener's value (BYPASS_PATH_* and BYPASS_ROLE_*, a socket's
# path and role, are bypass_paths.py's).
SETTINGS = {"user": 1, "kernel": 2}


class BypassCounters(NamedTuple):
    """struct bypass_counters (bpf/bypass.h, where it is defined): every field a __u64."""

    server_sockets: int
    client_sockets: int
    insert_failures: int
    bypassed_conns: int
    tcp_conns: int
    ingress_msgs: int
    ingress_bytes: int
    short_msgs: int
    short_bytes: int
    tcp_msgs: int
    tcp_bytes: int
    redirect_failures: int
    deferred_conns: int
    late_bypassed_conns: int


COUNTER_FIELDS = BypassCounters._fields
COUNTERS_STRUCT = struct.Struct(f"={len(COUNTER_FIELDS)}Q")  # one CPU's struct bypass_counters
# The keys of bpf/bypass.h (its struct bypass_sock is bypass_paths.py's): each field's name and
# struct code, in order.
KEY_LAYOUT = (
    ("netns", "Q"),
    ("local_ip", "4I"),
    ("remote_ip", "4I"),
    ("local_port", "I"),
    ("remote_port", "I"),
)
LISTENER_LAYOUT = (("netns", "Q"), ("ip", "4I"), ("port", "I"), ("pad", "I"))


def _struct(layout: tuple[tuple[str, str], ...]) -> struct.Struct:
    return struct.Struct("=" + "".join(code for _, code in layout))


def _named(layout: tuple[tuple[str, str], ...], values: tuple[int, ...]) -> dict[str, Any]:
    """Values unpacked by _struct(layout), by field name (an array field as a tuple)."""
    named: dict[str, Any] = {}
    at = 0
    for name, code in layout:
        count = int(code[:-1] or 1)
        group = values[at : at + count]
        named[name] = group if code[:-1] else group[0]
        at += count
    return named


_SETTING = struct.Struct("=I")
KEY_STRUCT = _struct(KEY_LAYOUT)
LISTENER_STRUCT = _struct(LISTENER_LAYOUT)
ATTACH = "cgroup sock_ops + cgroup_skb ingress + sockhash sk_msg, through BPF links"
BPF_CGROUP_INET_INGRESS = 0


def netns_cookie() -> int:
    """The cookie of this process's network namespace (the listeners map's first field)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _words(host: str) -> tuple[int, int, int, int]:
    """An address as the four network-order words of bypass.h (IPv4 v4-mapped)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return struct.unpack("=4I", ip.packed)


def listener_key(netns: int, host: str, port: int) -> bytes:
    """A bypass_listeners key: echod listens on host:port (a wildcard host covers all)."""
    return LISTENER_STRUCT.pack(netns, *_words(host), port, 0)


def socket_key(netns: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """The bypass_sockets key of a connection's end (local and remote as that end sees them)."""
    return KEY_STRUCT.pack(netns, *_words(local[0]), *_words(remote[0]), local[1], remote[1])


def in_cgroup(cgroup: str, proc: str = "/proc/self/cgroup") -> bool:
    """Whether this process is in the cgroup v2 directory `cgroup` or below it."""
    try:
        with open(proc) as f:
            rel = next((ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")), None)
        root = cgroup2_root()
    except (OSError, NotSupported):
        return False
    if rel is None:
        return False
    mine = os.path.normpath(root + rel)
    return mine == os.path.normpath(cgroup) or mine.startswith(os.path.normpath(cgroup) + "/")


def default_object() -> Path:
    """The compiled bypass object that ships inside the echod package."""
    return Path(str(resources.files("echod") / "bpf" / "bypass.bpf.o"))


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified in hybrid)."""
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return fields[1].replace("\\040", " ")
    except OSError as exc:
        raise NotSupported(exc.errno or errno.ENOENT, f"cannot read {mounts}") from exc
    raise NotSupported(errno.ENOENT, "no cgroup v2 hierarchy is mounted (the bypass needs one)")


def open_cgroup(path: str) -> int:
    """A read-only fd of a cgroup v2 directory: all the sock_ops attach needs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise NotSupported(exc.errno or errno.ENOENT, "cannot open the cgroup", path) from exc
    if not Path(path, "cgroup.controllers").exists():  # only a cgroup v2 directory has it
        os.close(fd)
        raise NotSupported(errno.ENOTDIR, "not a cgroup v2 directory", path)
    return fd


def decode_key(raw: bytes) -> dict[str, Any]:
    """A bypass_sockets key as addresses and ports (tests and diagnostics)."""
    key = _named(KEY_LAYOUT, KEY_STRUCT.unpack(raw))
    local = struct.pack("!4I", *[socket.ntohl(w) for w in key["local_ip"]])
    remote = struct.pack("!4I", *[socket.ntohl(w) for w in key["remote_ip"]])
    return {
        "netns": key["netns"],
        "local": socket.inet_ntop(socket.AF_INET6, local),
        "remote": socket.inet_ntop(socket.AF_INET6, remote),
        "local_port": key["local_port"],
        "remote_port": key["remote_port"],
    }


class Bypass(LoadedObject):
    """Open → load → link, as a context manager; close() undoes exactly the steps done."""

    def __init__(self, cgroup: str | None = None, path: str | Path | None = None) -> None:
        super().__init__(str(path or default_object()))
        self.cgroup = cgroup
        self._links: list[libbpf.FdHolder] = []
        self.listeners_fd = self.counters_fd = self.sockets_fd = -1
        self.paths_fd = -1
        self.netns = 0
        self.watching: dict[bytes, str] = {}  # listeners key -> the mode it follows
        self.endpoints: list[tuple[str, int]] = []  # what the keys name: (host, port)
        self._ncpus = 1

    def _open(self) -> None:
        self.cgroup = self.cgroup or cgroup2_root()
        cgroup_fd = open_cgroup(self.cgroup)
        self._stack.callback(os.close, cgroup_fd)
        obj = self._load()
        self._ncpus = libbpf.possible_cpus()
        self.netns = netns_cookie()
        self.sockets_fd = obj.map_fd(SOCKETS_MAP)
        self.listeners_fd = obj.map_fd(LISTENERS_MAP)
        self.counters_fd = obj.map_fd(COUNTERS_MAP)
        self.paths_fd = obj.map_fd(PATHS_MAP)
        # sk_msg and ingress first: a socket sock_ops inserts must find them already there.
        cgroup = f"cgroup {self.cgroup}"
        for prog, target, kind, what in (
            (MSG_PROGRAM, self.sockets_fd, libbpf.BPF_SK_MSG_VERDICT, "the bypass sockhash"),
            (INGRESS_PROGRAM, cgroup_fd, BPF_CGROUP_INET_INGRESS, cgroup),
            (SOCKOPS_PROGRAM, cgroup_fd, libbpf.BPF_CGROUP_SOCK_OPS, cgroup),
        ):
            try:
                link = libbpf.link_create(obj.program_fd(prog), target, kind)
            except OSError as exc:
                why = f"cannot attach {prog} to {what}: {exc.strerror}"
                raise type(exc)(exc.errno, why) from exc
            self._links.append(link)
            self._stack.callback(link.close)
        log.info("bypass.attached", cgroup=self.cgroup, **self.ids())

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def follow(self, endpoints: list[tuple[str, int]], mode: str) -> None:
        """Watch the connections to these listening addresses, in mode's way; only them.

        Each endpoint is (host, port) as echod binds it; a wildcard host covers every local
        address of its family.
        """
        keys = {listener_key(self.netns, host, port): (host, port) for host, port in endpoints}
        for old in [k for k in self.watching if k not in keys]:
            with contextlib.suppress(KeyError):
                libbpf.map_delete(self.listeners_fd, old)
            del self.watching[old]
        changed = False
        for key in keys:
            if self.watching.get(key) != mode:
                libbpf.map_update(self.listeners_fd, key, _SETTING.pack(SETTINGS[mode]))
                self.watching[key] = mode
                changed = True
        self.endpoints = list(keys.values())
        if changed:
            log.info("bypass.following", listen=self.endpoints, path=self.path_name(mode))

    def watch(self, endpoints: list[tuple[str, int]], mode: str) -> None:
        """Watch these listening addresses too, leaving the followed ones (the self-check's)."""
        for host, port in endpoints:
            key = listener_key(self.netns, host, port)
            libbpf.map_update(self.listeners_fd, key, _SETTING.pack(SETTINGS[mode]))

    def unfollow(self, endpoints: list[tuple[str, int]]) -> None:
        """Stop watching these listening addresses (the self-check's private listener)."""
        for host, port in endpoints:
            key = listener_key(self.netns, host, port)
            if key not in self.watching:
                with contextlib.suppress(KeyError, OSError):
                    libbpf.map_delete(self.listeners_fd, key)

    @staticmethod
    def path_name(mode: str) -> str:
        """What a connection of a mode takes: the ingress path or the short circuit."""
        return "short_circuit" if mode == "kernel" else "ingress"

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        totals = libbpf.percpu_totals(self.counters_fd, COUNTERS_STRUCT, self._ncpus)
        return BypassCounters._make(totals)._asdict()

    def programs(self) -> list[dict[str, Any]]:
        """Per-program figures, as KernelEcho.programs()."""
        obj = self._obj
        assert obj is not None, "not loaded"
        kinds = (
            (SOCKOPS_PROGRAM, "sock_ops"),
            (MSG_PROGRAM, "sk_msg"),
            (INGRESS_PROGRAM, "cgroup_skb"),
        )
        return [program_figures(obj.program_fd(name), kind) for name, kind in kinds]

    def ids(self) -> dict[str, Any]:
        """Kernel ids of our programs, maps and links."""
        assert self._obj is not None, "not loaded"
        names = (SOCKETS_MAP, LISTENERS_MAP, PATHS_MAP, LINKS_MAP, COUNTERS_MAP)
        return {
            "prog_ids": [prog_info(self._obj.program_fd(p))["id"] for p in PROGRAMS],
            "map_ids": [map_info(self._obj.map_fd(m))["id"] for m in names],
            "link_ids": [link_info(link.fd)["id"] for link in self._links],
        }

    def describe(self) -> dict[str, Any]:
        """What `status` shows under "bypass" while attached."""
        mode = next(iter(self.watching.values()), None)
        return {
            "enabled": True,
            "attach": ATTACH,
            "cgroup": self.cgroup,
            "port": self.endpoints[0][1] if self.endpoints else None,
            "listen": [_endpoint(host, port) for host, port in self.endpoints],
            "path": self.path_name(mode) if mode else None,
            **self.ids(),
        }

    def close(self) -> None:
        """Detach both links and let go of the object; idempotent.

        Sockets still in the sockhash keep it (and their path) until they close.
        """
        if self._obj is not None:
            for key in list(self.watching):  # no new server end is given a path
                with contextlib.suppress(KeyError, OSError):
                    libbpf.map_delete(self.listeners_fd, key)
            self.watching.clear()
            self.endpoints = []
            self._stack.close()
            self._obj = None
            self._links.clear()
            self.listeners_fd = self.counters_fd = self.sockets_fd = self.paths_fd = -1
            log.info("bypass.detached", cgroup=self.cgroup)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bypass_status(bypass: Bypass | None, requested: bool) -> dict[str, Any]:
    """`status`'s "bypass": where it is attached, or that it is off."""
    if bypass is None or not bypass.loaded:
        return {"enabled": False, "requested": requested}
    return {**bypass.describe(), "requested": requested}
