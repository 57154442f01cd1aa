"""The echo service: listeners, accept and admission, the connection table, the mode, figures."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import time
from collections import Counter
from typing import Any

import structlog

from echod import __version__
from echod.config import LIVE_KEYS, Config
from echod.connection import Connection
from echod.kernelpath import BacklogGuard, HangupWatcher, Watched
from echod.limits import echo_fd_budget
from echod.logs import RateLimited
from echod.metrics import process_figures
from echod.migrate import migrate_to_kernel
from echod.protocol import RequestError
from echod.sockmap import KernelEcho

log = structlog.get_logger("echod.service")

ACCEPT_BATCH = 64


class Service:
    """The echo service: owns listeners, connections and (in kernel mode) the BPF object."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.state = "stopped"
        self.requested_mode = config.mode
        self.mode: str | None = None
        self.fallback_reason: str | None = None
        self.kernel: KernelEcho | None = None
        self._bpf = contextlib.ExitStack()  # holds self.kernel while it is loaded
        self.listeners: list[socket.socket] = []
        self.conns: set[Connection] = set()
        self.per_ip: Counter[str] = Counter()
        self.allow = [ipaddress.ip_network(c, strict=False) for c in config.allow]
        self.counts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.insert_failed: Counter[str] = Counter()  # kernel mode served on the user path, why
        self.started_at = time.monotonic()
        self.limiter = RateLimited()
        self.hangups = HangupWatcher(self.loop)
        self.guard = BacklogGuard(self.hangups, self._abort_backlog)
        self.in_map = 0  # connections whose socket is in the sockhash
        self._lock = asyncio.Lock()
        self.rates: dict[str, float] = {}
        self._last_sample: tuple[float, dict[str, int]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, mode: str | None = None, port: int | None = None) -> dict[str, Any]:
        """Open the listeners and enter the requested mode; returns the status."""
        async with self._lock:
            if self.state != "stopped":
                raise RequestError("bad_state", f"already {self.state}")
            previous = (self.config, self.requested_mode)
            if port is not None:
                self.config = self.config.replace(port=port)
            self.requested_mode = mode or self.requested_mode
            self.state = "starting"
            try:
                self._enter_mode(self.requested_mode)
                try:
                    self._listen()
                except OSError as exc:
                    raise RequestError("listen_failed", exc.strerror or str(exc)) from exc
            except BaseException:
                self._close_listeners()
                self._maybe_unload(force=True)
                self.state = "stopped"
                self.mode = None
                self.config, self.requested_mode = previous
                raise
            self.state = "serving"
            log.info(
                "service.serving",
                mode=self.mode,
                listen=self.listen_addresses(),
                fallback_reason=self.fallback_reason,
            )
            return self.status()

    def _enter_mode(self, requested: str) -> None:
        self.fallback_reason = None
        if requested == "user":
            self.mode = "user"
            return
        try:
            self._load_kernel()
            self.mode = "kernel"
        except OSError as exc:
            reason = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
            if exc.errno in (errno.EPERM, errno.EACCES):
                reason += " (kernel mode needs root, or CAP_BPF and CAP_NET_ADMIN)"
            if requested == "kernel":
                raise RequestError("not_supported", f"kernel mode unavailable: {reason}") from exc
            self.fallback_reason = reason
            self.mode = "user"
            log.warning("service.fallback_to_user", reason=reason)

    def _load_kernel(self) -> None:
        if self.kernel is None:
            self.kernel = self._bpf.enter_context(KernelEcho(self.config.bpf_object))

    def _maybe_unload(self, force: bool = False) -> None:
        """Unload the BPF object when nothing uses it any more."""
        if self.kernel is None:
            return
        if force or (self.mode != "kernel" and not self.in_map):
            self._bpf.close()  # detach, unload: KernelEcho's own exit
            self.kernel = None

    def _listen(self) -> None:
        for host in self.config.hosts:
            infos = socket.getaddrinfo(
                host, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, stype, proto, _, addr = infos[0]
            sock = socket.socket(family, stype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind(addr)
                sock.listen(4096)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                hint = ""
                if exc.errno == errno.EACCES and self.config.port < 1024:
                    hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)"
                raise OSError(
                    exc.errno,
                    f"cannot listen on {host} port {self.config.port}: {exc.strerror}{hint}",
                ) from exc
            self.listeners.append(sock)
            self.loop.add_reader(sock.fileno(), self._on_accept, sock)

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners.clear()

    async def stop(self, grace: float | None = None) -> dict[str, Any]:
        """Stop accepting, close every connection within the grace period, unload BPF."""
        async with self._lock:
            if self.state == "stopped":
                raise RequestError("bad_state", "already stopped")
            await self._stop(self.config.shutdown_grace if grace is None else grace)
            return self.status()

    async def _stop(self, grace: float) -> None:
        self.state = "stopping"
        log.info("service.stopping", connections=len(self.conns), grace_s=grace)
        self._close_listeners()
        conns = list(self.conns)
        for conn in conns:
            if conn.in_map:
                conn._unwatch()
                self.loop.create_task(conn.finish(within=grace))
            elif conn.transport is not None:
                conn.transport.close()  # flushes what is buffered, then connection_lost
            else:
                conn.close(reason="shutdown")
        if conns:
            await asyncio.wait([c.done for c in conns], timeout=grace + 0.5)
        for conn in list(self.conns):
            conn.close(reason="shutdown_timeout")
        self.mode = None
        self._maybe_unload(force=True)
        self.state = "stopped"
        log.info("service.stopped")

    def apply_live(self, config: Config) -> None:
        """Take the settings that can change while serving."""
        self.config = self.config.replace(**{k: getattr(config, k) for k in LIVE_KEYS})
        self.allow = [ipaddress.ip_network(c, strict=False) for c in config.allow]

    async def restart(self, mode: str | None = None) -> dict[str, Any]:
        """Switch mode live; no connection is closed and no byte is lost or repeated.

        To kernel: user-path connections move into the sockhash (see migrate.to_kernel).
        To user: new connections are echoed in user space, while kernel-path connections keep
        the kernel path until they close. The reply's "migration" says how many moved and how
        many stayed on their path.
        """
        async with self._lock:
            if self.state != "serving":
                raise RequestError("bad_state", f"cannot restart while {self.state}")
            target = mode or self.requested_mode
            old, previous = self.mode, (self.requested_mode, self.fallback_reason)
            try:
                self._enter_mode(target)
            except RequestError:
                self.mode = old
                self.requested_mode, self.fallback_reason = previous
                raise
            self.requested_mode = target
            moved = 0
            if self.mode == "kernel" and old != "kernel":
                assert self.kernel is not None
                moved = await migrate_to_kernel(self.conns, self.kernel)
            elif self.mode == "user":
                self._maybe_unload()
            stayed = sum(1 for c in self.conns if c.path != self.mode)
            log.info(
                "service.mode_switched",
                old=old,
                new=self.mode,
                moved=moved,
                stayed=stayed,
                fallback_reason=self.fallback_reason,
            )
            return {**self.status(), "migration": {"moved": moved, "stayed": stayed}}

    # -- accept ---------------------------------------------------------------------------------

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Paused accepts retry every 0.1 s: one line per 10 s, with the count suppressed.
                self._log_limited("accept.failed", rate=(1, 10.0), error=str(exc))
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(listener)
                return
            self._admit(sock, addr[0])

    def _pause_accept(self, listener: socket.socket) -> None:
        """Out of fds: stop accepting for a moment instead of spinning on the error."""
        fd = listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if listener in self.listeners:
                self.loop.add_reader(fd, self._on_accept, listener)

        self.loop.call_later(0.1, resume)

    def _refuse(self, sock: socket.socket, peer: str, reason: str) -> None:
        self.refused[reason] += 1
        self._log_limited("conn.refused", peer=peer, reason=reason)
        sock.close()

    def _admit(self, sock: socket.socket, peer: str) -> None:
        cfg = self.config
        if self.allow and not self._allowed(peer):
            return self._refuse(sock, peer, "allow")
        if len(self.conns) >= cfg.max_connections:
            return self._refuse(sock, peer, "max_connections")
        # Leave limits.FD_RESERVE fds free, so that the control socket answers at the fd limit.
        # fds are allocated lowest first: this socket's number counts the fds open below it.
        if max(sock.fileno(), len(self.conns)) >= echo_fd_budget():
            return self._refuse(sock, peer, "fd_limit")
        if cfg.max_connections_per_ip and self.per_ip[peer] >= cfg.max_connections_per_ip:
            return self._refuse(sock, peer, "per_ip")
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Urgent bytes stay in the stream, as the kernel path echoes them, so both modes agree.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        conn = Connection(self, sock, peer)
        self.conns.add(conn)
        self.per_ip[peer] += 1
        self.counts["accepted"] += 1
        if self.mode == "kernel" and self.kernel is not None:
            try:
                self.kernel.add(sock)
                self.map_in(conn)
                return
            except OSError as exc:
                reason = insert_failure(exc)
                self.counts["insert_failed"] += 1
                self.insert_failed[reason] += 1
                self._log_limited("conn.insert_failed", peer=peer, reason=reason)
        self.loop.create_task(self.serve_user(conn))

    async def serve_user(self, conn: Connection) -> None:
        """Serve conn on the user path; a failure closes it (and is logged, rate-limited)."""
        try:
            await conn.serve_user()
        except (OSError, ValueError) as exc:  # ValueError: closed by a stop meanwhile
            self._log_limited("conn.user_failed", peer=conn.peer, error=str(exc))
            conn.close(reason="error")

    def _allowed(self, peer: str) -> bool:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)

    def map_in(self, conn: Connection) -> None:
        """conn's socket has just entered the sockhash: it is on the kernel path now."""
        conn.in_map = True
        self.in_map += 1
        conn.watch()

    def unmap(self, conn: Connection) -> None:
        """Remove a closing connection's socket from the sockhash."""
        self.in_map -= 1
        if self.kernel is not None:
            with contextlib.suppress(KeyError, OSError):
                self.kernel.remove(conn.sock)

    def forget(self, conn: Connection, reason: str) -> None:
        """Called once by Connection.close()."""
        self.guard.forget(conn)
        if conn in self.conns:
            self.conns.remove(conn)
            self.counts["closed"] += 1
            self.per_ip[conn.peer] -= 1
            if self.per_ip[conn.peer] <= 0:
                del self.per_ip[conn.peer]
            log.debug("conn.closed", peer=conn.peer, reason=reason)
            if self.mode != "kernel" and self.state == "serving":
                self._maybe_unload()

    def close(self) -> None:
        """Release what the service holds for its whole life (call once stopped)."""
        self.hangups.close()

    def check_kernel_paths(self) -> None:
        """The 100 ms guard over kernel-path sockets (kernelpath.BacklogGuard)."""
        self.guard.check(self.config.kernel_backlog_limit, self.config.kernel_backlog_total)

    def _abort_backlog(self, conn: Watched, pending: int, limit: str) -> None:
        assert isinstance(conn, Connection)
        self.counts["aborted_backlog"] += 1
        self._log_limited("conn.backlog_exceeded", peer=conn.peer, pending=pending, limit=limit)
        conn.abort(reason="backlog")

    def count_user(self, nbytes: int) -> None:
        """Account bytes echoed in user space."""
        self.counts["user_bytes"] += nbytes
        self.counts["user_messages"] += 1

    def _log_limited(
        self, event: str, rate: tuple[int, float] | None = None, **fields: Any
    ) -> None:
        """A warning, rate-limited per event; `rate` is (burst, period) for an event's own rate."""
        for name, _, count in self.limiter.expired():
            log.warning(name, suppressed=count)
        burst, period = rate if rate is not None else (None, None)
        ok, suppressed = self.limiter.allow(event, burst=burst, period=period)
        if ok:
            log.warning(event, suppressed=suppressed, **fields) if suppressed else log.warning(
                event, **fields
            )

    # -- reporting ------------------------------------------------------------------------------

    def listen_addresses(self) -> list[str]:
        """Bound addresses as host:port ([v6]:port)."""
        out = []
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def status(self) -> dict[str, Any]:
        """State, modes, listen addresses, connections, BPF attach state."""
        bpf: dict[str, Any] = {"attached": self.kernel is not None, "programs": [], "maps": []}
        if self.kernel is not None:
            ids = self.kernel.ids()
            bpf["programs"] = [{"id": ids["prog_id"], "name": "echo_verdict", "type": "sk_skb"}]
            bpf["maps"] = ids["map_ids"]
            bpf["stats_enabled"] = self.kernel.stats_enabled
        paths = Counter(c.path for c in self.conns)
        return {
            "state": self.state,
            "mode": self.mode,
            "requested_mode": self.requested_mode,
            "fallback_reason": self.fallback_reason,
            "listen": self.listen_addresses(),
            "port": self.config.port,
            "connections": len(self.conns),
            "connections_by_path": {"kernel": paths["kernel"], "user": paths["user"]},
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "bpf": bpf,
        }

    def counters(self) -> dict[str, int]:
        """Flat monotonic counters (for rates)."""
        out = {
            "accepted": self.counts["accepted"],
            "user_bytes": self.counts["user_bytes"],
            "user_messages": self.counts["user_messages"],
        }
        if self.kernel is not None:
            out.update({f"kernel_{k}": v for k, v in self.kernel.counters().items()})
        return out

    def sample_rates(self) -> None:
        """Take a sample; rates are per second over the interval since the previous one."""
        now = time.monotonic()
        current = self.counters()
        if self._last_sample is not None:
            then, prev = self._last_sample
            dt = max(now - then, 1e-6)
            self.rates = {
                f"{k}_per_s": round(max(v - prev.get(k, 0), 0) / dt, 1) for k, v in current.items()
            }
        self._last_sample = (now, current)

    def stats(self) -> dict[str, Any]:
        """Counters, rates, kernel counters and per-program BPF figures."""
        kernel = self.kernel.counters() if self.kernel is not None else None
        return {
            "connections": {
                "accepted": self.counts["accepted"],
                "refused": {
                    r: self.refused[r] for r in ("max_connections", "per_ip", "allow", "fd_limit")
                },
                "active": len(self.conns),
                "closed": self.counts["closed"],
                "insert_failed": self.counts["insert_failed"],
                "insert_failed_reasons": dict(self.insert_failed),
                "aborted_backlog": self.counts["aborted_backlog"],
            },
            "user": {"bytes": self.counts["user_bytes"], "messages": self.counts["user_messages"]},
            "kernel": kernel,
            # The daemon's own count: walking the sockhash costs ~50 ms at 19k sockets.
            "kernel_sockets": self.in_map if self.kernel is not None else 0,
            "rates": dict(self.rates),
            "process": process_figures(),
            "bpf_programs": self.kernel.programs() if self.kernel is not None else [],
        }


def insert_failure(exc: OSError) -> str:
    """Why a kernel-mode socket could not enter the sockhash, as a short stable name."""
    if exc.errno == errno.EOPNOTSUPP:
        # The peer sent FIN or RST before the accept: the socket has left ESTABLISHED
        # (`printf ... | nc -q1` often does this). Its bytes are echoed on the user path.
        return "peer_closed_before_accept"
    if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return "map_full"
    return errno.errorcode.get(exc.errno or 0, "error").lower()
