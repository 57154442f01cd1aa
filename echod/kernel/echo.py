"""Kernel echo: load bpf/echo.bpf.c, attach its verdict to the sockhash, add and remove sockets.

The verdict's doorbell ring (echo_bell) is read through doorbell.py; on_bell answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from echod.kernel import libbpf
from echod.kernel.doorbell import Doorbell
from echod.kernel.info import link_info, map_info, prog_info, program_figures
from echod.kernel.objects import LoadedObject

log = structlog.get_logger("echod.sockmap")

SO_COOKIE = 57  # asm-generic/socket.h; the socket module does not export it
PROGRAM = "echo_verdict"
SOCKETS_MAP = "echo_sockets"
ACTIVE_MAP = "echo_active"
BELL_MAP = "echo_bell"
COUNTERS_MAP = "echo_counters"
_COOKIE = struct.Struct("=Q")
BELL_GATHER = 0.005  # seconds between the first ring and its answer (KernelEcho.on_bell)


class EchoCounters(NamedTuple):
    """struct echo_counters (bpf/echo.h, where it is defined): every field a __u64, in order."""

    redirected_packets: int
    redirected_bytes: int
    passed_packets: int
    passed_bytes: int
    missed_packets: int
    missed_bytes: int
    empty_packets: int
    active_marks: int


COUNTER_FIELDS = EchoCounters._fields
COUNTERS_STRUCT = struct.Struct(f"={len(COUNTER_FIELDS)}Q")  # one CPU's struct echo_counters


def default_object() -> Path:
    """The compiled object that ships inside the echod package."""
    return Path(str(resources.files("echod") / "bpf" / "echo.bpf.o"))


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for sock: the sockhash key."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def read_queue_empty(
    sock: socket.socket, limit: int, chunk: int = 256 * 1024
) -> tuple[bytes, bool]:
    """Read a non-blocking sock until EAGAIN: then no skb at the head of its queue is partly read.

    Returns (what was read, True), or (what was read, False) on EOF or once more than limit
    bytes came in. Raises OSError when the socket fails. See SocketMaps.add for why.
    """
    data = bytearray()
    while len(data) <= limit:
        try:
            got = sock.recv(chunk)
        except (BlockingIOError, InterruptedError):
            return bytes(data), True
        if not got:
            break
        data += got
    return bytes(data), False


class SocketMaps:
    """The two maps a worker touches per connection: the sockhash and the activity set.

    The owner of the BPF object holds one (fds borrowed from the object); a worker process
    builds its own from fds it was sent (`owned=True`: it takes ownership and closes them).
    """

    def __init__(
        self, sockets_fd: int, active_fd: int, counters_fd: int, *, owned: bool = False
    ) -> None:
        self.sockets_fd = sockets_fd
        self.active_fd = active_fd
        self.counters_fd = counters_fd
        self._owned = owned
        self._ncpus = libbpf.possible_cpus() if counters_fd >= 0 else 1

    def fds(self) -> dict[str, int]:
        """The fds to hand another process, by name (the keyword arguments of SocketMaps)."""
        return {
            "sockets_fd": self.sockets_fd,
            "active_fd": self.active_fd,
            "counters_fd": self.counters_fd,
        }

    def add(self, sock: socket.socket) -> int:
        """Insert sock into the sockhash, then kick it so data queued before the insert is echoed.

        Returns the socket's cookie. The verdict only sees skbs that arrive after the psock
        exists. Setting SO_RCVLOWAT runs tcp_data_ready(), which is now the psock's hook, over
        what is already queued. Raises OSError(EOPNOTSUPP) when the peer has already gone (the
        socket left ESTABLISHED).

        User space must not have read part of the skb at the head of the receive queue: the
        verdict path takes that skb whole, so its read part would be echoed twice. A socket
        never read is fine; one that was read must go through read_queue_empty first.
        """
        cookie = socket_cookie(sock)
        libbpf.map_update(
            self.sockets_fd, _COOKIE.pack(cookie), _COOKIE.pack(sock.fileno()), libbpf.BPF_NOEXIST
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return cookie

    def remove(self, sock: socket.socket, cookie: int | None = None) -> None:
        """Delete sock from the sockhash (and the activity set); KeyError when not there.

        Removing frees the socket's psock with whatever is queued in it: call this only once
        everything received has been written (see connection.Connection.drained).
        """
        key = _COOKIE.pack(socket_cookie(sock) if cookie is None else cookie)
        try:
            libbpf.map_delete(self.sockets_fd, key)
        finally:
            # After the sockhash: a packet in between can no longer mark the socket again.
            with contextlib.suppress(KeyError):
                libbpf.map_delete(self.active_fd, key)

    def prune_active(self) -> int:
        """Delete activity-set keys of sockets no longer in the sockhash; returns how many.

        A worker that dies leaves its sockets' keys behind; a full set could mark no more.
        """
        pruned = 0
        for key in libbpf.map_keys(self.active_fd, 8):
            try:
                libbpf.map_lookup(self.sockets_fd, key, 8)
            except KeyError:
                with contextlib.suppress(KeyError):
                    libbpf.map_delete(self.active_fd, key)
                pruned += 1
        return pruned

    def active(self, limit: int) -> list[int]:
        """Cookies of sockets that received data since they were last cleared (at most limit)."""
        return [_COOKIE.unpack(k)[0] for k in libbpf.map_keys(self.active_fd, 8, limit)]

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        totals = libbpf.percpu_totals(self.counters_fd, COUNTERS_STRUCT, self._ncpus)
        return EchoCounters._make(totals)._asdict()

    def marks(self) -> int:
        """How many times a socket entered the activity set: it changed if this moved."""
        return self.counters()["active_marks"]

    def clear_active(self, cookie: int) -> None:
        """Forget that a socket was active; its next packet marks it again."""
        with contextlib.suppress(KeyError):
            libbpf.map_delete(self.active_fd, _COOKIE.pack(cookie))

    def sockets(self) -> int:
        """How many sockets are in the sockhash now (walks it: tests and diagnostics only)."""
        return len(libbpf.map_keys(self.sockets_fd, 8))

    def __enter__(self) -> SocketMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the fds if this object owns them; idempotent."""
        if self._owned:
            for fd in (self.sockets_fd, self.active_fd, self.counters_fd):
                if fd >= 0:
                    os.close(fd)
        self.sockets_fd = self.active_fd = self.counters_fd = -1


def bpf_status(kernel: KernelEcho | None) -> dict[str, Any]:
    """`status`'s "bpf": the loaded object's programs and maps, or that none is attached."""
    if kernel is None:
        return {"attached": False, "programs": [], "maps": []}
    return kernel.describe()


class KernelEcho(LoadedObject):
    """Open → load → attach as a context manager; exit undoes exactly the steps that were done."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(str(path or default_object()))
        self.prog_fd = self.sockets_fd = self.counters_fd = -1
        self.maps = SocketMaps(-1, -1, -1)
        self.bell: Doorbell | None = None
        self.stats_enabled = False
        self.attach = ""  # "bpf_link", or "prog_attach" on a kernel without sockmap links
        self.link_fd = -1

    def _open(self) -> None:
        obj = self._load()
        self.prog_fd = obj.program_fd(PROGRAM)
        self.sockets_fd = obj.map_fd(SOCKETS_MAP)
        self.counters_fd = obj.map_fd(COUNTERS_MAP)
        self.maps = SocketMaps(self.sockets_fd, obj.map_fd(ACTIVE_MAP), self.counters_fd)
        self.bell = Doorbell.open(obj.map_fd(BELL_MAP))
        self._stack.callback(self.bell.close)
        self._attach()
        try:
            # Run-time accounting is a diagnostic: lacking it must not cost kernel mode.
            self._stack.enter_context(libbpf.enable_stats())
            self.stats_enabled = True
        except OSError as exc:
            log.warning("bpf.stats_unavailable", error=str(exc))
        log.info("bpf.attached", object=self.path, **self.ids())

    def _attach(self) -> None:
        """The verdict on the sockhash: through a BPF link where the kernel has one (6.10+)."""
        kind = libbpf.BPF_SK_SKB_STREAM_VERDICT
        try:
            link = libbpf.link_create(self.prog_fd, self.sockets_fd, kind)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            log.info("bpf.no_sockmap_link", error=str(exc))  # before 6.10: attach to the map
            libbpf.prog_attach(self.prog_fd, self.sockets_fd, kind)
            self._stack.callback(libbpf.prog_detach, self.prog_fd, self.sockets_fd, kind)
            self.attach = "prog_attach"
            return
        self._stack.callback(link.close)
        self.link_fd = link.fd
        self.attach = "bpf_link"

    def close(self) -> None:
        """Detach, stop stats, free programs and maps; idempotent."""
        if self._obj is not None:
            self._stack.close()
            self._obj = None
            self.prog_fd = self.sockets_fd = self.counters_fd = self.link_fd = -1
            self.maps = SocketMaps(-1, -1, -1)
            log.info("bpf.detached")

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over every possible CPU."""
        return self.maps.counters()

    def programs(self) -> list[dict[str, Any]]:
        """Per-program figures: id, name, run_cnt, run_time_ns, ns_per_run."""
        return [program_figures(self.prog_fd, "sk_skb")]

    def on_bell(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[list[int]], None],
        gather: float = BELL_GATHER,
    ) -> None:
        """Call callback(cookies) on loop when the verdict rings the bell, until close().

        The first ring is answered `gather` seconds later, with every cookie rung meanwhile:
        when connections come and go by the thousand a second, the bell wakes the daemon a
        bounded number of times, not once per connection.
        """
        bell = self.bell
        assert bell is not None, "not loaded"
        pending: list[asyncio.TimerHandle] = []

        def answer() -> None:
            pending.clear()
            if bell.fd >= 0:
                callback(bell.drain())
                loop.add_reader(bell.fd, rung)

        def rung() -> None:
            loop.remove_reader(bell.fd)
            pending.append(loop.call_later(gather, answer))

        def stop() -> None:
            for handle in pending:
                handle.cancel()
            loop.remove_reader(bell.fd)

        loop.add_reader(bell.fd, rung)
        self._stack.callback(stop)  # before the ring is unmapped

    def describe(self) -> dict[str, Any]:
        """What `status` shows under "bpf" while this object is loaded."""
        ids = self.ids()
        return {
            "attached": True,
            "programs": [{"id": ids["prog_id"], "name": PROGRAM, "type": "sk_skb"}],
            "maps": ids["map_ids"],
            "attach": self.attach,
            "link_id": link_info(self.link_fd)["id"] if self.link_fd >= 0 else None,
            "stats_enabled": self.stats_enabled,
        }

    def ids(self) -> dict[str, Any]:
        """Kernel ids of our program and maps (what `bpftool prog show` lists)."""
        assert self.bell is not None, "not loaded"
        fds = (self.sockets_fd, self.maps.active_fd, self.bell.fd, self.counters_fd)
        return {
            "prog_id": prog_info(self.prog_fd)["id"],
            "map_ids": [map_info(fd)["id"] for fd in fds],
        }
