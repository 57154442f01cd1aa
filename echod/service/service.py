"""The echo service: listeners, accept and admission, the connection table, the mode, figures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections import Counter
from typing import Any, cast

import structlog

from echod.config.schema import LIVE_KEYS, Config
from echod.control.protocol import RequestError
from echod.control.replies import ProcessStatus
from echod.figures import Rates
from echod.kernel.bypass import Bypass
from echod.kernel.bypass_paths import PathReaders
from echod.kernel.echo import KernelEcho, SocketMaps
from echod.kernel.path import KernelPath, Watched
from echod.kernel.sockdiag import SockDiag
from echod.logs import RateLimited
from echod.service.accept import LISTEN_BACKLOG, Acceptor
from echod.service.admission import Admission, bind_listener, insert_failure
from echod.service.connection import INGRESS_LIMIT, Connection
from echod.service.migrate import migrate_to_kernel
from echod.service.report import Report
from echod.service.tasks import TaskSet
from echod.service.udp import UdpService
from echod.service.userecho import UserEcho

log = structlog.get_logger("echod.service")


class Service(Report):
    """The echo service: owns listeners, connections and (in kernel mode) the BPF object."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, UdpService(serves=True, owns_kernel=True))
        self.loop = asyncio.get_running_loop()
        self.maps: SocketMaps | None = None  # the sockhash and activity set, in kernel mode
        self._bpf = contextlib.ExitStack()  # holds the kernel or the maps while loaded
        self.conns: set[Connection] = set()
        self.admission = Admission(config)
        self.counts: Counter[str] = Counter()
        self.insert_failed: Counter[str] = Counter()  # kernel mode served on the user path, why
        self.limiter = RateLimited()
        self.kpath = KernelPath(self.loop, self._abort_backlog)
        self.hangups = self.kpath.hangups  # Host.hangups, for the connections
        self.reuse_port = False  # workers share the port (SO_REUSEPORT)
        self.rates: dict[str, float] = {}
        self._rates = Rates()
        # Which connections the bypass keeps in user space; accepting changes when it empties.
        self.bypass_readers = PathReaders(on_empty=self.accept_follow)
        self._diag: SockDiag | None = None  # looks at ingress-path clients' queues
        # Every task the service starts (a connection's drain, a move to the user path);
        # stop cancels and awaits what is left.
        self.tasks = TaskSet(self.loop)
        self.spawn = self.tasks.spawn  # Host.spawn
        self.acceptor = Acceptor(
            self.loop, self.spawn, self._admit, lambda: UserEcho(self), self._log_limited
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            self._listen()
        except OSError as exc:
            raise RequestError("listen_failed", exc.strerror or str(exc)) from exc

    async def _abort_start(self) -> None:
        self._close_listeners()
        self._maybe_unload(force=True)

    def _load_kernel(self) -> None:
        """Load and attach the BPF object (a worker takes the maps its supervisor sent)."""
        if self.kernel is None:
            kernel = self._bpf.enter_context(KernelEcho(self.config.bpf_object))
            self.kernel, self.maps = kernel, kernel.maps
            kernel.on_bell(self.loop, self.ring)

    def _bypass_attached(self, bypass: Bypass) -> None:
        self.bypass_readers.add(os.dup(bypass.paths_fd), os.dup(bypass.sockets_fd))
        self.bypass_readers.retire(self.loop, keep_newest=True)
        self._mark_listeners()
        self.accept_follow()

    def _bypass_detached(self) -> None:
        self.bypass_readers.retire(self.loop, keep_newest=False)

    def _mark_listeners(self) -> None:
        """Mark the listeners in every bypass object seen (bypass_paths.mark_listener)."""
        for sock in self.acceptor.listeners:
            self.bypass_readers.mark(sock)

    def _maybe_unload(self, force: bool = False) -> None:
        """Unload the BPF object (or drop the maps) when nothing uses it any more."""
        if self.maps is None:
            return
        if force or (self.mode != "kernel" and not self.kpath.sockets):
            self._bpf.close()  # detach, unload: KernelEcho's own exit
            self.kernel = self.maps = None

    def _listen(self) -> None:
        for host in self.config.hosts:
            sock = bind_listener(host, self.config.port, reuse_port=self.reuse_port)
            try:
                self.bypass_readers.mark(sock)  # before listen: every connection carries it
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self.acceptor.listeners.append(sock)
        self.accept_follow()

    def _close_listeners(self) -> None:
        self.acceptor.close()

    def accept_follow(self) -> None:
        """Accept the way the mode needs (echod.service.accept): uvloop's server in plain user
        mode, the own reader in kernel mode or while a bypass object is held."""
        if not self.acceptor.listeners:
            self.acceptor.switch("")
        elif self.mode == "user" and not len(self.bypass_readers):
            self.acceptor.switch("server")
        else:
            self.acceptor.switch("reader")

    async def stop(self, grace: float | None = None) -> ProcessStatus:
        """Stop accepting, close every connection within the grace period, unload BPF."""
        async with self._lock:
            if self.state == "stopped":
                raise RequestError("bad_state", "already stopped")
            await self._stop(self.config.shutdown_grace if grace is None else grace)
            return self.status()

    async def _stop(self, grace: float) -> None:
        self.state = "stopping"
        self.log.info("service.stopping", connections=len(self.conns), grace_s=grace)
        self._close_listeners()
        self.udp.stop()
        conns = list(self.conns)
        for conn in conns:
            if conn.in_map:
                conn.unwatch()
                self.spawn(conn.finish(within=grace))
            elif conn.transport is not None:
                conn.transport.close()  # flushes what is buffered, then connection_lost
            else:
                conn.close(reason="shutdown")
        if conns:
            await asyncio.wait([c.done for c in conns], timeout=grace + 0.5)
        for conn in list(self.conns):
            conn.close(reason="shutdown_timeout")
        await self.tasks.cancel()
        self.mode = None
        self._maybe_unload(force=True)
        self._stop_bypass()
        self.bypass_readers.close()
        self.state = "stopped"
        self.log.info("service.stopped")

    async def apply_live(self, config: Config) -> None:
        """Take the settings that can change while serving."""
        self.config = self.config.replace(**{k: getattr(config, k) for k in LIVE_KEYS})
        self.admission.apply(self.config)
        self.udp.apply(self.config)

    async def _switch(self, old: str | None) -> tuple[int, int]:
        """To kernel: move the user-path connections in; to user: unload once unused."""
        self.accept_follow()  # new connections first: they take the new mode's way at once
        moved = 0
        if self.mode == "kernel" and old != "kernel":
            assert self.maps is not None
            stay = [c for c in self.conns if self.bypass_readers.user_only(c.sock)]
            moved = await migrate_to_kernel(self.conns.difference(stay), self.maps)
        elif self.mode == "user":
            self._maybe_unload()
        return moved, sum(1 for c in self.conns if c.path != self.mode)

    # -- accept ---------------------------------------------------------------------------------

    def _admit(self, sock: socket.socket, peer: str) -> None:
        reason = self.admission.refusal(sock.fileno(), peer, len(self.conns))
        if reason is not None:
            self._log_limited("conn.refused", peer=peer, reason=reason)
            sock.close()
            return
        # TCP_NODELAY and SO_OOBINLINE come from the listener (accepted sockets inherit them).
        sock.setblocking(False)
        conn = self._admitted(sock, peer)
        ingress = self.bypass_readers.user_only(sock)
        if ingress:
            conn.ingress = 0  # its echo goes straight into the client: bounded by check_ingress
        if self.mode == "kernel" and ingress:
            self.counts["bypass_user"] += 1  # its bytes come by redirect: user space reads them
        elif self.mode == "kernel" and self.maps is not None:
            try:
                self.map_in(conn, self.maps.add(sock))
                return
            except OSError as exc:
                reason = insert_failure(exc)
                self.counts["insert_failed"] += 1
                self.insert_failed[reason] += 1
                self._log_limited("conn.insert_failed", peer=peer, reason=reason)
        self.spawn(self.serve_user(conn))

    def admit_served(self, transport: asyncio.Transport) -> Connection | None:
        """Host.admit_served: the same rules as _admit, for a socket uvloop's server accepted."""
        if self.state in ("stopping", "stopped"):  # accepted just before the servers closed
            transport.close()
            return None
        # uvloop read the peer's address as it made the transport (no system call here); None
        # when the peer had already gone (reset before the accept): nothing left to serve.
        peername = transport.get_extra_info("peername")
        if not peername:
            transport.abort()
            return None
        peer = sys.intern(peername[0])
        try:
            # uvloop's PseudoSocket: options and addresses of the transport's socket.
            sock = cast(socket.socket, transport.get_extra_info("socket"))
        except OSError as exc:  # its getsockname failed: the socket is already gone
            self._log_limited("accept.failed", rate=(1, 10.0), error=str(exc))
            transport.abort()
            return None
        reason = self.admission.refusal(sock.fileno(), peer, len(self.conns))
        if reason is not None:
            self._log_limited("conn.refused", peer=peer, reason=reason)
            transport.close()
            return None
        return self._admitted(sock, peer)

    def _admitted(self, sock: socket.socket, peer: str) -> Connection:
        conn = Connection(self, sock, peer)
        self.conns.add(conn)
        self.admission.admitted(peer)
        self.counts["accepted"] += 1
        return conn

    async def serve_user(self, conn: Connection) -> None:
        """Serve conn on the user path; a failure closes it (and is logged, rate-limited)."""
        try:
            transport, _ = await self.loop.connect_accepted_socket(
                lambda: UserEcho(self, conn), conn.sock
            )
            if conn.closed:  # stopped while the transport was being made
                transport.abort()
        except (OSError, ValueError) as exc:  # ValueError: closed by a stop meanwhile
            self._log_limited("conn.user_failed", peer=conn.peer, error=str(exc))
            conn.close(reason="error")

    def map_in(self, conn: Connection, cookie: int) -> None:
        """Host.map_in: KernelPath.entered."""
        self.kpath.entered(conn, cookie)

    def unmap(self, conn: Connection) -> None:
        """Host.unmap: KernelPath.left."""
        self.kpath.left(conn, self.maps)

    def forget(self, conn: Connection, reason: str) -> None:
        """Called once by Connection.close()."""
        self.kpath.forget(conn)
        if conn in self.conns:
            self.conns.remove(conn)
            self.counts["closed"] += 1
            self.admission.released(conn.peer)
            # Not while a start or restart holds the lock: it may have loaded the object for
            # the path it is checking or entering.
            if self.mode != "kernel" and self.state == "serving" and not self._lock.locked():
                self._maybe_unload()

    async def aclose(self) -> None:
        """Lifecycle.aclose: close()."""
        self.close()

    def close(self) -> None:
        """Release what the service holds for its whole life (call once stopped)."""
        self.udp.stop()
        self.kpath.close()
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        self.bypass_readers.close()
        self._set_bypass(False)

    async def run(self) -> None:
        """The kernel path's guard (KernelPath.run) until cancelled."""
        await self.kpath.run(
            lambda: self.maps,
            lambda: (self.config.kernel_backlog_limit, self.config.kernel_backlog_total),
            lambda exc: self._log_limited("guard.failed", rate=(1, 10.0), error=str(exc)),
        )

    def ring(self, cookies: list[int]) -> None:
        """The verdict rang the bell for these sockets (KernelPath.ring)."""
        self.kpath.ring(cookies)

    def _abort_backlog(self, conn: Watched, pending: int, limit: str) -> None:
        assert isinstance(conn, Connection)
        self.counts["aborted_backlog"] += 1
        self._log_limited("conn.backlog_exceeded", peer=conn.peer, pending=pending, limit=limit)
        conn.abort(reason="backlog")

    def check_ingress(self, conn: Connection) -> None:
        """Reset an ingress-path connection whose client holds more than INGRESS_LIMIT of echo.

        The redirect puts the echo in the client's receive queue beyond any TCP window, so a
        client that never reads would otherwise take the host's TCP memory for itself.
        """
        conn.ingress = 0
        try:
            self._diag = self._diag or SockDiag()
            held = self._diag.peer_rmem(conn.sock)
        except OSError as exc:
            self._log_limited("conn.ingress_check_failed", rate=(1, 10.0), error=str(exc))
            return
        if held is not None and held > INGRESS_LIMIT:
            self.counts["aborted_backlog"] += 1
            self._log_limited(
                "conn.backlog_exceeded", peer=conn.peer, pending=held, limit="ingress"
            )
            conn.abort(reason="backlog")

    def count_user(self, nbytes: int) -> None:
        """Account bytes echoed in user space."""
        self.counts["user_bytes"] += nbytes
        self.counts["user_messages"] += 1

    def warn(self, event: str, **fields: Any) -> None:
        """Host.warn: a connection's warning, rate-limited per event."""
        self._log_limited(event, **fields)

    def _log_limited(
        self, event: str, rate: tuple[int, float] | None = None, **fields: Any
    ) -> None:
        """A warning, rate-limited per event; `rate` is (burst, period) for an event's own rate."""
        self.limiter.warning(log, event, rate, **fields)
