"""Same-host bypass: load bpf/bypass.bpf.c, attach it through BPF links, follow echod's port.

The sock_ops program is attached to a cgroup v2 directory (by default the hierarchy's root),
so it sees every TCP connection of the processes below; the sk_msg program is attached to the
bypass sockhash. Both attachments are BPF links: they last as long as this process holds
their fds, so a SIGKILL leaves nothing attached.

Turning the bypass off, or stopping, detaches both links at once: no new connection enters
the sockhash. The connections already in it keep their path until they close, and the
kernel frees the programs and maps with the last of them. Removing a socket from the sockhash
would drop what is queued on its receive side: the bytes echoed to a client that it has not
read yet.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from echod import libbpf
from echod.errors import NotSupported

log = structlog.get_logger("echod.bypass")

SOCKOPS_PROGRAM = "bypass_sockops"
MSG_PROGRAM = "bypass_msg"
SOCKETS_MAP = "bypass_sockets"
PORTS_MAP = "bypass_ports"
PATHS_MAP = "bypass_paths"
LINKS_MAP = "bypass_links"
COUNTERS_MAP = "bypass_counters"

# bpf/bypass.h: BYPASS_SETTING_*, BYPASS_PATH_*, BYPASS_ROLE_*.
SETTINGS = {"user": 1, "kernel": 2}
PATHS = {0: "undecided", 1: "tcp", 2: "ingress", 3: "short_circuit"}
PATH_INGRESS = 2
ROLES = {1: "server", 2: "client"}
# struct bypass_counters (bpf/bypass.h), each field a __u64.
COUNTER_FIELDS = (
    "server_sockets",
    "client_sockets",
    "insert_failures",
    "bypassed_conns",
    "tcp_conns",
    "ingress_msgs",
    "ingress_bytes",
    "short_msgs",
    "short_bytes",
    "tcp_msgs",
    "tcp_bytes",
    "redirect_failures",
)
_PORT = struct.Struct("=I")
_SOCK = struct.Struct("=II")  # struct bypass_sock: role, path
_KEY = struct.Struct("=Q4I4III")  # struct bypass_key: netns, local_ip, remote_ip, ports
ATTACH = "cgroup sock_ops + sockhash sk_msg, through BPF links"


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
    netns, *words = _KEY.unpack(raw)
    local = struct.pack("!4I", *[socket.ntohl(w) for w in words[0:4]])
    remote = struct.pack("!4I", *[socket.ntohl(w) for w in words[4:8]])
    return {
        "netns": netns,
        "local": socket.inet_ntop(socket.AF_INET6, local),
        "remote": socket.inet_ntop(socket.AF_INET6, remote),
        "local_port": words[8],
        "remote_port": words[9],
    }


class PathReaders:
    """Reads sockets' bypass paths from their storage (bypass_paths, keyed by socket fd).

    One reader per bypass object this service has seen: after the bypass is turned off, or
    off and on again, connections of the earlier object may still be waiting to be accepted,
    and their path is in that object's storage. The fds are closed at stop.
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # map id -> fd (owned)

    def add(self, fd: int) -> None:
        """Take ownership of a bypass_paths fd (closed at once if that map is known already)."""
        try:
            map_id = libbpf.map_info(fd)["id"]
        except OSError:
            os.close(fd)
            raise
        if map_id in self._fds:
            os.close(fd)
        else:
            self._fds[map_id] = fd

    def path(self, sock: socket.socket) -> str | None:
        """The socket's path ("ingress", "short_circuit", ...), None when it has none."""
        key = struct.pack("=i", sock.fileno())
        for fd in self._fds.values():
            try:
                raw = libbpf.map_lookup(fd, key, _SOCK.size)
            except (KeyError, OSError):
                continue
            return PATHS.get(_SOCK.unpack(raw)[1])
        return None

    def user_only(self, sock: socket.socket) -> bool:
        """Whether the connection's bytes arrive by redirect to its receive queue.

        Such bytes never pass the sk_skb verdict, and a kernel-path socket is not watched for
        them: the connection must be echoed in user space, whatever the mode.
        """
        return bool(self._fds) and self.path(sock) == PATHS[PATH_INGRESS]

    def close(self) -> None:
        """Close every fd; idempotent."""
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


class Bypass(libbpf.LoadedObject):
    """Open → load → link, as a context manager; close() undoes exactly the steps done."""

    def __init__(self, cgroup: str | None = None, path: str | Path | None = None) -> None:
        super().__init__(str(path or default_object()))
        self.cgroup = cgroup
        self._links: list[libbpf.FdHolder] = []
        self.ports_fd = self.counters_fd = self.sockets_fd = -1
        self.paths_fd = -1
        self.watching: dict[int, str] = {}  # port -> the mode it follows
        self._ncpus = 1

    def _open(self) -> None:
        self.cgroup = self.cgroup or cgroup2_root()
        cgroup_fd = open_cgroup(self.cgroup)
        self._stack.callback(os.close, cgroup_fd)
        obj = self._load()
        self._ncpus = libbpf.possible_cpus()
        self.sockets_fd = obj.map_fd(SOCKETS_MAP)
        self.ports_fd = obj.map_fd(PORTS_MAP)
        self.counters_fd = obj.map_fd(COUNTERS_MAP)
        self.paths_fd = obj.map_fd(PATHS_MAP)
        # sk_msg first: a socket sock_ops inserts must find its program already there.
        for prog, target, kind, what in (
            (MSG_PROGRAM, self.sockets_fd, libbpf.BPF_SK_MSG_VERDICT, "the bypass sockhash"),
            (SOCKOPS_PROGRAM, cgroup_fd, libbpf.BPF_CGROUP_SOCK_OPS, f"cgroup {self.cgroup}"),
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

    def follow(self, port: int, mode: str) -> None:
        """Watch port's connections, in mode's way (short circuit in kernel mode); only it."""
        for old in [p for p in self.watching if p != port]:
            with contextlib.suppress(KeyError):
                libbpf.map_delete(self.ports_fd, _PORT.pack(old))
            del self.watching[old]
        if self.watching.get(port) != mode:
            libbpf.map_update(self.ports_fd, _PORT.pack(port), _PORT.pack(SETTINGS[mode]))
            self.watching[port] = mode
            log.info("bypass.following", port=port, path=self.path_name(mode))

    @staticmethod
    def path_name(mode: str) -> str:
        """What a connection of a mode takes: the ingress path or the short circuit."""
        return "short_circuit" if mode == "kernel" else "ingress"

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        totals = libbpf.percpu_totals(self.counters_fd, len(COUNTER_FIELDS), self._ncpus)
        return dict(zip(COUNTER_FIELDS, totals, strict=True))

    def programs(self) -> list[dict[str, Any]]:
        """Per-program figures, as KernelEcho.programs()."""
        obj = self._obj
        assert obj is not None, "not loaded"
        return [
            libbpf.program_figures(obj.program_fd(name), kind)
            for name, kind in ((SOCKOPS_PROGRAM, "sock_ops"), (MSG_PROGRAM, "sk_msg"))
        ]

    def ids(self) -> dict[str, Any]:
        """Kernel ids of our programs, maps and links."""
        assert self._obj is not None, "not loaded"
        names = (SOCKETS_MAP, PORTS_MAP, PATHS_MAP, LINKS_MAP, COUNTERS_MAP)
        return {
            "prog_ids": [
                libbpf.prog_info(self._obj.program_fd(p))["id"]
                for p in (SOCKOPS_PROGRAM, MSG_PROGRAM)
            ],
            "map_ids": [libbpf.map_info(self._obj.map_fd(m))["id"] for m in names],
            "link_ids": [libbpf.link_info(link.fd)["id"] for link in self._links],
        }

    def describe(self) -> dict[str, Any]:
        """What `status` shows under "bypass" while attached."""
        port, mode = next(iter(self.watching.items()), (None, None))
        return {
            "enabled": True,
            "attach": ATTACH,
            "cgroup": self.cgroup,
            "port": port,
            "path": self.path_name(mode) if mode else None,
            **self.ids(),
        }

    def close(self) -> None:
        """Detach both links and let go of the object; idempotent.

        Sockets still in the sockhash keep it (and their path) until they close.
        """
        if self._obj is not None:
            for port in list(self.watching):  # no new server end is given a path
                with contextlib.suppress(KeyError, OSError):
                    libbpf.map_delete(self.ports_fd, _PORT.pack(port))
            self.watching.clear()
            self._stack.close()
            self._obj = None
            self._links.clear()
            self.ports_fd = self.counters_fd = self.sockets_fd = self.paths_fd = -1
            log.info("bypass.detached", cgroup=self.cgroup)


def bypass_status(bypass: Bypass | None, requested: bool) -> dict[str, Any]:
    """`status`'s "bypass": where it is attached, or that it is off."""
    if bypass is None or not bypass.loaded:
        return {"enabled": False, "requested": requested}
    return {**bypass.describe(), "requested": requested}
