"""Who may connect: the admission rules of the echo service, and its listening sockets."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Callable

from echod.config.schema import Config
from echod.control.limits import echo_fd_budget
from echod.control.protocol import RequestError
from echod.service.lifecycle import resolve_listen

REFUSAL_REASONS = ("max_connections", "per_ip", "allow", "fd_limit")
UDP_RCVBUF = 4 * 1024 * 1024  # bytes of receive buffer asked for each UDP socket
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (not in Python's socket module)


class Admission:
    """The rules a new connection meets, in order: allow, max_connections, the fd budget
    (limits.FD_RESERVE left free, so that the control socket answers at the fd limit), and
    max_connections_per_ip; with the counts they need and what they refused."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.allow = networks(config.allow)
        self.per_ip: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._clock = clock
        self._budget, self._budget_at = 0, -1e9

    def apply(self, config: Config) -> None:
        """Take new settings (a reload)."""
        self.config = config
        self.allow = networks(config.allow)

    def refusal(self, fd: int, peer: str, active: int) -> str | None:
        """Why the socket `fd` (from peer, with `active` connections open) is refused, or None;
        counted."""
        cfg = self.config
        reason = None
        if self.allow and not allowed(self.allow, peer):
            reason = "allow"
        elif active >= cfg.max_connections:
            reason = "max_connections"
        # fds are allocated lowest first: this socket's number counts the fds open below it.
        elif max(fd, active) >= self._fd_budget():
            reason = "fd_limit"
        elif cfg.max_connections_per_ip and self.per_ip[peer] >= cfg.max_connections_per_ip:
            reason = "per_ip"
        if reason is not None:
            self.refused[reason] += 1
        return reason

    def admitted(self, peer: str) -> None:
        """A connection from peer was let in."""
        self.per_ip[peer] += 1

    def released(self, peer: str) -> None:
        """A connection from peer closed."""
        self.per_ip[peer] -= 1
        if self.per_ip[peer] <= 0:
            del self.per_ip[peer]

    def figures(self) -> dict[str, int]:
        """The refusals by reason (stats.connections.refused)."""
        return {r: self.refused[r] for r in REFUSAL_REASONS}

    def _fd_budget(self) -> int:
        """limits.echo_fd_budget(), read at most once a second (not a system call per accept)."""
        now = self._clock()
        if now - self._budget_at >= 1.0:
            self._budget, self._budget_at = echo_fd_budget(), now
        return self._budget


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: list[str]) -> list[Network]:
    """The `allow` list's networks."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def allowed(nets: list[Network], peer: str) -> bool:
    """Whether the peer's address (a v4-mapped one as IPv4, a scope id ignored) is in nets."""
    addr = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in nets)


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port with the echo service's options, not yet listening.

    OSError names the address (and the capability a low port needs).
    """
    family, addr = resolve_listen(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Inherited by every accepted socket: set once here, not per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Urgent bytes stay in the stream, as the kernel path echoes them: both modes agree.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EACCES and port < 1024:
            hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)"
        raise OSError(
            exc.errno, f"cannot listen on {host} port {port}: {exc.strerror}{hint}"
        ) from exc
    return sock


def bind_datagram(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A UDP socket bound to host:port, non-blocking (SO_REUSEPORT for workers, never
    SO_REUSEADDR: that would let another socket take the datagrams). OSError names the address.
    """
    family, addr = resolve_listen(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        # Room for the datagrams that come while the event loop is busy for a moment (a mode
        # switch loads BPF): a small datagram takes ~1 KiB of buffer, so the default ~208 KiB
        # holds a few hundred. FORCE needs CAP_NET_ADMIN; without it net.core.rmem_max caps.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot listen on {host} UDP port {port}: {exc.strerror}"
        ) from exc
    return sock


def check_port_free(config: Config) -> None:
    """Fail as a single process would when the port is taken, before the workers share it.

    The workers bind with SO_REUSEPORT, which would quietly share the port with another
    process of the same user that did so too: a plain bind first proves nobody holds it
    (the UDP port too, with `udp`).
    """
    for host in config.hosts:
        try:
            bind_listener(host, config.port).close()
            if config.udp:
                bind_datagram(host, config.port).close()
        except OSError as exc:
            raise RequestError("listen_failed", exc.strerror or str(exc)) from exc


def insert_failure(exc: OSError) -> str:
    """Why a kernel-mode socket could not enter the sockhash, as a short stable name."""
    if exc.errno == errno.EOPNOTSUPP:
        # The peer sent FIN or RST before the accept: the socket has left ESTABLISHED
        # (`printf ... | nc -q1` often does this). Its bytes are echoed on the user path.
        return "peer_closed_before_accept"
    if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return "map_full"
    return errno.errorcode.get(exc.errno or 0, "error").lower()


def listen_address(sock: socket.socket) -> str:
    """A bound listener's address as host:port ([v6]:port)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
