"""UDP echo (RFC 862): the user path's sockets, the guard every datagram meets, the kernel slot.

Each datagram is sent back to its source, whole, unless the guard drops it: a source port that
would make a loop (echod's own port, 0, `udp_drop_ports`: echo, chargen and the like answer
anything, CVE-1999-0103), a source outside `allow`, or one over its `udp_rate_per_source`
(a token bucket per source address, in a table of bounded size, so a flood of spoofed sources
costs no more memory than SOURCE_LIMIT buckets). A full send buffer drops the echo, as UDP may:
nothing is queued in user space.

One `UdpService` per Lifecycle plays the parts that process has: a process that serves opens
the sockets (each worker its own, with SO_REUSEPORT, as for TCP); the owner of BPF (the single
process, or the supervisor) attaches the kernel path while the mode is kernel. That path is
echod.kernel.udp, built apart from this module: `kernel_module()` is where it plugs in, and
when it is missing or the kernel lacks what it needs, UDP stays on the user path and
`fallback_reason` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from types import ModuleType
from typing import Any

import structlog

from echod.config.schema import Config
from echod.control.replies import UdpCounts, UdpFigures, UdpStatus
from echod.kernel.errors import NotSupported
from echod.kernel.reuseport import steer_by_source
from echod.service.admission import allowed, bind_datagram, listen_address, networks
from echod.service.lifecycle import resolve_listen

log = structlog.get_logger("echod.udp")

SOURCE_LIMIT = 65536  # source addresses whose buckets are kept (least recently seen go first)
RECV_BATCH = 64  # datagrams read per wake-up of one socket, as ACCEPT_BATCH for TCP
DATAGRAM_MAX = 65535  # the largest UDP payload (IPv6's 65,527 included)
DROP_REASONS = ("loop", "allow", "rate")
COUNTERS = ("echoed_packets", "echoed_bytes", *(f"dropped_{r}" for r in DROP_REASONS))
KERNEL_MODULE = "echod.kernel.udp"


class TokenBuckets:
    """A token bucket per source address: `rate` tokens a second, at most `rate` held (one
    second's burst). At most `capacity` buckets are kept; a new source evicts the one seen
    least recently, which then starts again with a full bucket."""

    def __init__(
        self, rate: int, clock: Callable[[], float] = time.monotonic, capacity: int = SOURCE_LIMIT
    ) -> None:
        self.rate = rate  # 0: no limit
        self.capacity = capacity
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def set_rate(self, rate: int) -> None:
        """A new rate (a reload); the buckets start again full."""
        if rate != self.rate:
            self.rate = rate
            self._buckets.clear()

    def take(self, source: str) -> bool:
        """Whether source may have one more datagram now (and if so, it has had it)."""
        if self.rate == 0:
            return True
        now = self._clock()
        held = self._buckets.get(source)
        if held is None:
            if len(self._buckets) >= self.capacity:
                self._buckets.popitem(last=False)
            tokens = float(self.rate)
        else:
            tokens, then = held
            tokens = min(float(self.rate), tokens + max(now - then, 0.0) * self.rate)
            self._buckets.move_to_end(source)
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, now)
            return True
        self._buckets[source] = (tokens, now)
        return False


class Guard:
    """Which datagrams are never echoed, in order: loop (source port), allow, rate."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = TokenBuckets(config.udp_rate_per_source, clock)
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take new settings: the port, udp_drop_ports, allow, udp_rate_per_source."""
        self.blocked = frozenset({0, config.port, *config.udp_drop_ports})
        self.allow = networks(config.allow)
        self.buckets.set_rate(config.udp_rate_per_source)

    def verdict(self, host: str, port: int) -> str | None:
        """Why a datagram from host:port is dropped (one of DROP_REASONS), or None."""
        if port in self.blocked:
            return "loop"
        if self.allow and not allowed(self.allow, host):
            return "allow"
        if not self.buckets.take(host):
            return "rate"
        return None


def kernel_module() -> ModuleType:
    """The UDP kernel path's module; NotSupported when this build has none."""
    try:
        return importlib.import_module(KERNEL_MODULE)
    except ImportError as exc:
        if exc.name != KERNEL_MODULE:
            raise  # the module is there but broken: a bug to see, not a fallback
        raise NotSupported(errno.EOPNOTSUPP, "no UDP kernel path in this build") from None


class UdpService:
    """UDP echo for one Lifecycle: its sockets (`serves`) and the kernel path (`owns_kernel`)."""

    def __init__(self, *, serves: bool, owns_kernel: bool) -> None:
        self.serves = serves
        self.owns_kernel = owns_kernel
        self.reuse_port = False  # workers share the port (SO_REUSEPORT), as for TCP
        self.enabled = False  # config.udp at the last start
        self.active = False  # between start and stop
        self.sockets: list[socket.socket] = []
        self.kernel: Any | None = None  # echod.kernel.udp.UdpKernelEcho, while attached
        self._kernel_base: dict[str, int] = {}  # its counters once the self-check was done
        self._kernel_stack = contextlib.ExitStack()
        self.fallback_reason: str | None = None
        self.counts: dict[str, int] = dict.fromkeys((*COUNTERS, "send_errors"), 0)
        self.guard: Guard | None = None
        self._buf = bytearray(DATAGRAM_MAX + 1)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, config: Config, mode: str | None) -> None:
        """Serve UDP if config.udp says so; OSError when a socket cannot be bound."""
        self.stop()
        self.enabled = config.udp
        if not config.udp:
            return
        if self.guard is None:
            self.guard = Guard(config)
        self.guard.apply(config)
        if self.serves:
            self._loop = asyncio.get_running_loop()
            try:
                for host in config.hosts:
                    sock = bind_datagram(host, config.port, reuse_port=self.reuse_port)
                    self._open(sock)
                    if self.reuse_port and config.workers > 1:
                        # One source address, one worker: its rate limit holds across them.
                        steer_by_source(sock, config.workers)
            except OSError:
                self._close_sockets()
                raise
        self.active = True
        self.follow(config, mode)

    def _open(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self.sockets.append(sock)
        self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    def follow(self, config: Config, mode: str | None) -> None:
        """The kernel path while the mode is kernel (the owner of BPF), else the user path."""
        if not (self.active and self.owns_kernel):
            return
        if mode != "kernel":
            self.detach_kernel()
            self.fallback_reason = None
        elif self.kernel is None:
            try:
                self.attach_kernel(config)
                self.fallback_reason = None
            except OSError as exc:
                self.fallback_reason = f"UDP kernel path unavailable: {exc.strerror or exc}"
                log.warning("udp.fallback_to_user", reason=self.fallback_reason)

    def attach_kernel(self, config: Config) -> None:
        """Load, configure and attach the UDP kernel path (OSError, NotSupported: not here)."""
        module = kernel_module()
        kernel = self._kernel_stack.enter_context(module.UdpKernelEcho(config.udp_object))
        try:
            for ifindex in module.devices_for(numeric_hosts(config)):
                kernel.attach(ifindex)  # not configured yet: it passes every datagram on
            failed = kernel.self_check(numeric_hosts(config))
            self._configure(kernel, config)
            if failed is not None:
                log.error("udp.selfcheck_failed", detail=failed)
                raise OSError(errno.EPROTO, f"it failed its self-check: {failed}")
            self._kernel_base = kernel.counters()  # stats count from here: not the check's
            log.info("udp.selfcheck_passed")
        except BaseException:
            self._kernel_stack.close()
            raise
        self.kernel = kernel
        log.info("udp.kernel_attached", ifindexes=list(kernel.ifindexes))

    def detach_kernel(self) -> None:
        """Detach and free the kernel path (its links, programs and maps), if attached."""
        if self.kernel is not None:
            self.kernel = None
            self._kernel_stack.close()

    @staticmethod
    def _configure(kernel: Any, config: Config) -> None:
        kernel.configure(
            config.port,
            config.udp_drop_ports,
            config.udp_rate_per_source,
            config.allow,
            hosts=numeric_hosts(config),  # answer only what the user sockets would receive
        )

    def apply(self, config: Config) -> None:
        """Take the live settings (udp_rate_per_source, udp_drop_ports, allow)."""
        if self.guard is not None:
            self.guard.apply(config)
        if self.kernel is not None:
            self._configure(self.kernel, config)

    def stop(self) -> None:
        """Close the sockets and detach the kernel path; the counters stay."""
        self._close_sockets()
        self.detach_kernel()
        self.active = False
        self.fallback_reason = None

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()

    # -- the user path --------------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket) -> None:
        guard, counts, view = self.guard, self.counts, self._view
        assert guard is not None
        for _ in range(RECV_BATCH):
            try:
                size, source = sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an error queued on the socket: the next datagram is read next time
            reason = guard.verdict(source[0], source[1])
            if reason is not None:
                counts["dropped_" + reason] += 1
                continue
            try:
                sock.sendto(view[:size], source)
            except OSError:  # BlockingIOError: the send buffer is full; dropped, as UDP may
                counts["send_errors"] += 1
                continue
            counts["echoed_packets"] += 1
            counts["echoed_bytes"] += size

    # -- reporting ------------------------------------------------------------------------------

    def status(self) -> UdpStatus:
        """status.udp: this process's sockets (none in a supervisor: merge_status adds them)."""
        path = ("kernel" if self.kernel is not None else "user") if self.active else None
        return {
            "enabled": self.enabled,
            "path": path,
            "listen": [listen_address(sock) for sock in self.sockets],
            "fallback_reason": self.fallback_reason,
            "kernel": self.kernel.describe() if self.kernel is not None else None,
        }

    def user_counts(self) -> UdpCounts:
        """The user path's counters."""
        c = self.counts
        return {
            "echoed_packets": c["echoed_packets"],
            "echoed_bytes": c["echoed_bytes"],
            "dropped_loop": c["dropped_loop"],
            "dropped_allow": c["dropped_allow"],
            "dropped_rate": c["dropped_rate"],
            "send_errors": c["send_errors"],
        }

    def totals(self) -> UdpFigures | None:
        """stats.udp without the kernel's counters (cheap: no system call); nil while off."""
        if not self.enabled:
            return None
        return {"user": self.user_counts() if self.serves else None, "kernel": None}

    def figures(self) -> UdpFigures | None:
        """stats.udp: each path's counters; nil while UDP is off."""
        totals = self.totals()
        if totals is not None and self.kernel is not None:
            totals["kernel"] = self.kernel_counts()
        return totals

    def kernel_counts(self) -> dict[str, int]:
        """The kernel path's counters since it began to serve (the self-check's left out)."""
        assert self.kernel is not None
        base = self._kernel_base
        return {k: int(v) - base.get(k, 0) for k, v in self.kernel.counters().items()}

    def counters(self) -> dict[str, int]:
        """Flat monotonic counters, for the rates."""
        out: dict[str, int] = {}
        if self.enabled and self.serves:
            out["udp_echoed_packets"] = self.counts["echoed_packets"]
            out["udp_echoed_bytes"] = self.counts["echoed_bytes"]
        if self.kernel is not None:
            kernel = self.kernel_counts()
            for key in ("echoed_packets", "echoed_bytes"):
                out[f"udp_kernel_{key}"] = int(kernel.get(key, 0))
        return out


def numeric_hosts(config: Config) -> list[str]:
    """The addresses echod listens on, resolved as the listeners are."""
    return [str(resolve_listen(host, config.port)[1][0]) for host in config.hosts]
