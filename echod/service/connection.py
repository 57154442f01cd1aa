"""One accepted connection: its socket, the kernel path's watch and drain, and the user path."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

from echod.kernel.path import HangupWatcher

if TYPE_CHECKING:
    from echod.service.userecho import UserEcho

log = structlog.get_logger("echod.connection")

# User-space write buffer: stop reading from a peer that does not read once this much is queued.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
RECV_SIZE = 256 * 1024
DRAIN_POLL = 0.002
DRAIN_POLL_MAX = 0.1
DRAIN_TIMEOUT = 10.0
# A connection on the bypass's ingress path has its echo put straight into the client's socket,
# which no TCP window bounds: every INGRESS_CHECK_EVERY bytes echoed, the client's receive queue
# is looked at (sockdiag), and past INGRESS_LIMIT the connection is reset.
INGRESS_CHECK_EVERY = 2 * 1024 * 1024
INGRESS_LIMIT = 8 * 1024 * 1024


class TcpInfo(NamedTuple):
    """The fields of struct tcp_info (uapi/linux/tcp.h) that backlog() reads."""

    state: int  # tcpi_state
    bytes_acked: int  # tcpi_bytes_acked
    bytes_received: int  # tcpi_bytes_received


# struct tcp_info as far as tcpi_bytes_received, the fields TcpInfo does not name as padding.
TCP_INFO_LAYOUT = struct.Struct(
    "="
    "B"  # __u8 tcpi_state
    "7x"  # __u8 tcpi_ca_state, _retransmits, _probes, _backoff, _options; 2 bytes of bit fields
    "96x"  # 24 __u32: tcpi_rto ... tcpi_total_retrans
    "16x"  # __u64 tcpi_pacing_rate, tcpi_max_pacing_rate
    "Q"  # __u64 tcpi_bytes_acked
    "Q"  # __u64 tcpi_bytes_received
)
# TCP states (include/net/tcp_states.h): closed (reset, or both sides done), and those in
# which the peer's FIN has arrived (and counts one in tcpi_bytes_received).
_TCP_CLOSE = 7
_PEER_FIN_STATES = frozenset((6, 8, 9, 11))  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING


def tcp_info(sock: socket.socket) -> TcpInfo:
    """The socket's TCP state and byte counts (TCP_INFO)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LAYOUT.size)
    return TcpInfo._make(TCP_INFO_LAYOUT.unpack(raw))


def _outq(sock: socket.socket) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return int.from_bytes(buf, "little", signed=True)


class Host(Protocol):
    """What a connection needs from the service that owns it."""

    loop: asyncio.AbstractEventLoop
    hangups: HangupWatcher

    def count_user(self, nbytes: int) -> None:
        """Account bytes echoed in user space."""

    def check_ingress(self, conn: Connection) -> None:
        """conn (on the bypass's ingress path) echoed INGRESS_CHECK_EVERY more bytes."""

    def map_in(self, conn: Connection, cookie: int) -> None:
        """conn's socket (with this cookie) has just entered the sockhash."""

    def unmap(self, conn: Connection) -> None:
        """Remove conn's socket from the sockhash (it is closing)."""

    def forget(self, conn: Connection, reason: str) -> None:
        """conn is closed: drop it from the table."""

    def warn(self, event: str, **fields: Any) -> None:
        """A warning about one connection, rate-limited per event (peers can cause them)."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run coro as a task the service owns (cancelled and awaited when it stops)."""

    def admit_served(self, transport: asyncio.Transport) -> Connection | None:
        """A connection uvloop's server accepted: its Connection, or None when refused."""

    async def serve_user(self, conn: Connection) -> None:
        """Serve conn on the user path."""


class Connection:
    """One accepted connection. Owns its socket, until a user-path transport takes the fd over.

    A connection that uvloop's server accepted (plain user mode, Service.accept_follow) never
    had a socket of its own: its `sock` is the transport's view of it (uvloop's PseudoSocket:
    options and addresses, no I/O, not ours to close) until leave_transport gives it one.

    There may be 100,000 of these in one daemon: slots, and no future until one is awaited.
    """

    __slots__ = (
        "_done",
        "closed",
        "cookie",
        "eof",
        "fd",
        "host",
        "in_map",
        "ingress",
        "migrating",
        "out",
        "peer",
        "protocol",
        "sock",
        "transport",
        "writing",
    )

    def __init__(self, host: Host, sock: socket.socket, peer: str) -> None:
        self.host = host
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.in_map = False
        # On the bypass's ingress path: bytes echoed since its client was last looked at,
        # or -1 for any other connection.
        self.ingress = -1
        self.cookie = 0  # the socket's cookie, once it is in the sockhash
        self.transport: asyncio.Transport | None = None
        self.protocol: UserEcho | None = None
        self.migrating = False
        self.writing = False
        self.out = bytearray()
        self.eof = False
        self.closed = False
        self._done: asyncio.Future[None] | None = None

    @property
    def done(self) -> asyncio.Future[None]:
        """Resolved once the connection is closed."""
        if self._done is None:
            self._done = self.host.loop.create_future()
            if self.closed:
                self._done.set_result(None)
        return self._done

    @property
    def path(self) -> str:
        """Where this connection's bytes are echoed: kernel, or user."""
        return "kernel" if self.in_map else "user"

    # -- kernel path: the socket is in the sockhash; user space only watches it -------------

    def watch(self) -> None:
        """Watch a kernel-path socket for EOF and errors only.

        It is not watched for input: the psock wakes its readers after every skb it redirects,
        so an EPOLLIN watch would wake the daemon once per echoed message. Bytes that miss the
        redirect are found by the guard (kernel.path.BacklogGuard), which the verdict's doorbell
        rings and a slow round robin backs up.
        """
        self.host.hangups.add(self)

    def unwatch(self) -> None:
        """Stop the hang-up watch (flow control, EOF, or the service draining it)."""
        self.host.hangups.discard(self)

    @property
    def watched(self) -> bool:
        """Whether the hang-up watch is registered for this socket."""
        return self.host.hangups.has(self)

    def read_available(self) -> None:
        """Echo what user space can read now; on EOF, finish the connection."""
        for _ in range(64):  # bounded, so one busy socket cannot starve the loop
            if self.closed or len(self.out) >= WRITE_HIGH:
                return
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(reason=type(exc).__name__)
                return
            if not data:
                self.eof = True
                self.unwatch()
                if self.drained():  # the usual case: close now, without a task
                    self.close(reason="eof")
                else:
                    self.host.spawn(self.finish())
                return
            self.echo_later(data)
            self._flush()

    def echo_later(self, data: bytes) -> None:
        """data was read in user space: it is written back, in order, by send_out."""
        self.host.count_user(len(data))
        self.out += data

    def send_out(self) -> bool:
        """Write what the socket takes of self.out; True once it is all written (OSError)."""
        try:
            sent = self.sock.send(self.out) if self.out else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        del self.out[:sent]
        return not self.out

    def _flush(self) -> None:
        if self.closed:
            return
        try:
            self.send_out()
        except OSError as exc:
            self.close(reason=type(exc).__name__)
            return
        loop = self.host.loop
        if self.out:
            if not self.writing:
                self.writing = True
                loop.add_writer(self.fd, self._flush)
            if len(self.out) >= WRITE_HIGH:
                self.unwatch()  # flow control: the peer is not reading
        else:
            self._unwrite()
            if not self.watched and not self.eof:
                self.watch()

    def _unwrite(self) -> None:
        if self.writing:
            self.writing = False
            self.host.loop.remove_writer(self.fd)

    def backlog(self) -> int:
        """Bytes received but not yet written back: what sits in the psock and in self.out.

        acked + queued-in-send-buffer counts what was written; bytes_received counts what came
        in, plus one for a FIN (seen by the TCP state, whether or not user space read it yet).
        A reset socket has nothing left to deliver. In kernel mode this is the only view of the
        psock queue, which the kernel does not bound (a peer that never reads makes it grow
        without limit).
        """
        try:
            info = tcp_info(self.sock)
            if info.state == _TCP_CLOSE:
                return 0  # reset (its send queue is purged) or closed: nothing to deliver
            written = info.bytes_acked + _outq(self.sock)
        except OSError:
            return 0  # the socket is gone: nothing left to deliver
        fin = 1 if self.eof or info.state in _PEER_FIN_STATES else 0
        # self.out was received and not yet written, so it is already in the difference.
        return max(info.bytes_received - fin - written, 0)

    def drained(self) -> bool:
        """Every byte received has been written back to the socket (kernel and user paths)."""
        return not self.out and self.backlog() == 0

    async def finish(self, within: float = DRAIN_TIMEOUT) -> None:
        """Wait until all echo is written (bounded), then remove from the map and close."""
        deadline = time.monotonic() + within
        pause = DRAIN_POLL
        while not self.closed and not self.drained():
            if time.monotonic() >= deadline:
                self.host.warn("conn.drain_timeout", peer=self.peer, pending=self.backlog())
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, DRAIN_POLL_MAX)  # a peer that never reads costs little
        self.close(reason="eof" if self.eof else "shutdown")

    # -- user path (a uvloop transport, echod.service.userecho) ----------------------------------

    def set_migrating(self, on: bool) -> None:
        """Hold reading off while a move to the kernel waits for the write buffer to empty."""
        self.migrating = on
        if self.transport is not None and self.protocol is not None:
            self.protocol.update_reading()

    def abort(self, reason: str) -> None:
        """Close with a reset: the pending echo is dropped on purpose."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close(reason=reason)

    def leave_transport(self) -> None:
        """Take the socket back from its uvloop transport, which is dropped (OSError: kept).

        uvloop owns the fd and closes it with the transport, so the connection keeps a dup.
        """
        transport = self.transport
        sock = socket.socket(fileno=os.dup(self.fd))
        sock.setblocking(False)
        self.sock, self.fd = sock, sock.fileno()
        self.transport = self.protocol = None
        if transport is not None:
            transport.abort()

    def enter_kernel(self, cookie: int) -> None:
        """Its socket is in the sockhash now (with this cookie): the kernel echoes it."""
        self.in_map = True
        self.cookie = cookie

    def close(self, reason: str = "closed") -> None:
        """Remove from the map, close the socket and forget the connection; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.unwatch()
        self._unwrite()
        if self.in_map:
            self.host.unmap(self)
        if self.transport is not None:
            self.transport.abort()  # closes the fd it took over
            self.transport = None
        if isinstance(self.sock, socket.socket):  # not a transport's PseudoSocket
            self.sock.close()  # a no-op once a transport has detached it
        self.host.forget(self, reason)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
