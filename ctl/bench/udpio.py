"""The datagram I/O of `bench --udp`: sendmmsg/recvmmsg (mmsg.py), or one call per datagram.

Both kinds have the same shape: a send stage of 2 x 64 header slots whose payloads are the
worker's 64 variants (slot k carries variant k % 64), and a receive stage of 64 slots whose
headers and payloads land in two separate arrays. The plain kind (sendmsg and recvmsg_into,
one datagram per call) is used when the batched calls are not there or fail their check,
or when ECHOCTL_BENCH_MMSG=0 asks for it.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Protocol

try:
    from echoctl.bench import mmsg as _mmsg
except ImportError:  # a Python without ctypes
    _mmsg = None

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


class Sender(Protocol):
    """Send staged datagrams: headers in `headers`, 24 bytes a slot."""

    headers: bytearray

    def send(self, sock: socket.socket, first: int, count: int) -> int: ...


class Receiver(Protocol):
    """Receive datagrams: headers into `headers`, payloads into `payloads`, slot by slot."""

    slots: int
    headers: bytearray
    payloads: bytearray

    def recv(self, sock: socket.socket, count: int) -> int: ...
    def lengths(self, count: int) -> tuple[int, ...]: ...


class PlainSend:
    """The send stage through sendmsg(2), one datagram per call."""

    def __init__(self, hsize: int, payloads: list[bytes]) -> None:
        self.hsize = hsize
        self.payloads = payloads
        self.headers = bytearray(hsize * 2 * len(payloads))
        self._view = memoryview(self.headers)

    def send(self, sock: socket.socket, first: int, count: int) -> int:
        """Send slots first..first+count-1; return how many went (0: the send buffer is full)."""
        h, v, n = self.hsize, self._view, len(self.payloads)
        for k in range(first, first + count):
            try:
                sock.sendmsg([v[k * h : (k + 1) * h], self.payloads[k % n]])
            except OSError as exc:
                if exc.errno in _AGAIN:
                    return k - first
                raise
        return count


class PlainRecv:
    """The receive stage through recvmsg_into(2), one datagram per call."""

    def __init__(self, hsize: int, psize: int, slots: int) -> None:
        self.slots = slots
        self.headers = bytearray(hsize * slots)
        self.payloads = bytearray(max(psize, 1) * slots)
        hv, pv = memoryview(self.headers), memoryview(self.payloads)
        self._iov = [
            [hv[i * hsize : (i + 1) * hsize], pv[i * psize : (i + 1) * psize]] for i in range(slots)
        ]
        self._lens: list[int] = []

    def recv(self, sock: socket.socket, count: int) -> int:
        """Receive up to `count` datagrams without waiting; return how many."""
        self._lens = lens = []
        for i in range(count):
            try:
                got = sock.recvmsg_into(self._iov[i], 0, socket.MSG_TRUNC)[0]
            except OSError as exc:
                if exc.errno in _AGAIN:
                    break
                raise
            lens.append(got)
        return len(lens)

    def lengths(self, count: int) -> tuple[int, ...]:
        """Return the real lengths of the last `count` datagrams received."""
        return tuple(self._lens[:count])


def stages(hsize: int, psize: int, payloads: list[bytes]) -> tuple[Sender, Receiver, str]:
    """Return the send and receive stages, and the name of the calls they use."""
    why = "ECHOCTL_BENCH_MMSG=0" if os.environ.get("ECHOCTL_BENCH_MMSG") == "0" else ""
    if not why:
        why = _mmsg.available() if _mmsg is not None else "no ctypes"
    if not why:
        slots = len(payloads)
        return _mmsg.SendStage(hsize, payloads), _mmsg.RecvStage(hsize, psize, slots), "sendmmsg"
    plain = PlainSend(hsize, payloads), PlainRecv(hsize, psize, len(payloads))
    return plain[0], plain[1], f"sendmsg ({why})"
