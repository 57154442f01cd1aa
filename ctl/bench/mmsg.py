"""sendmmsg(2) and recvmmsg(2) through ctypes: up to 64 datagrams per system call.

Python's socket module has neither, and one system call per datagram caps a Python load
generator far below what an in-kernel UDP echo answers. This is the one echoctl module that
imports ctypes (the import-linter contract "ffi" names it); udpio.py falls back to plain
sendmsg/recvmsg_into when `available()` is False.

Every buffer is allocated once and every `struct mmsghdr` filled in once: a call passes a
pointer into the array and a count, nothing else. Datagrams are two pieces, a header and a
payload, both on send (scatter) and on receive (gather into two separate arrays), so the
caller can compare all the headers of a batch, or all its payloads, in one comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from typing import Any

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20  # on receive: msg_len is the datagram's real length, even when cut short
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_STRIDE = ctypes.sizeof(MMsgHdr)
_LEN_AT = MMsgHdr.msg_len.offset


def _load() -> tuple[Any, Any, str]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        send, recv = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError) as exc:
        return None, None, f"no sendmmsg/recvmmsg in libc: {exc}"
    # No argtypes: converting each argument costs more than the call (about 0.4 µs a call
    # here). Every call passes ints and c_void_p objects made once, which need no conversion.
    send.restype = recv.restype = ctypes.c_int
    return send, recv, ""


_sendmmsg, _recvmmsg, _why = _load()


def _fail() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def _fill(msgs: ctypes.Array[MMsgHdr], iovs: ctypes.Array[IoVec], per_msg: int) -> None:
    base = ctypes.addressof(iovs)
    for k in range(len(msgs)):
        msgs[k].msg_hdr.msg_iov = base + k * per_msg * ctypes.sizeof(IoVec)
        msgs[k].msg_hdr.msg_iovlen = per_msg


class SendStage:
    """2*V datagram slots for sendmmsg: header k is `headers[k*hsize:]`, payload k % V.

    The slots are doubled so that a batch of up to V datagrams starting at any slot j < V is
    one contiguous run of the array, whatever j is: the caller writes the headers of the
    datagrams for sequence numbers a..a+n-1 at slots a % V .. and sends them in one call.
    """

    def __init__(self, hsize: int, payloads: list[bytes]) -> None:
        if _sendmmsg is None:
            raise OSError(errno.ENOSYS, _why)
        v = len(payloads)
        self.slots = v
        self.headers = bytearray(hsize * 2 * v)
        self._hdr = (ctypes.c_char * len(self.headers)).from_buffer(self.headers)
        self._payloads = [ctypes.create_string_buffer(p, len(p) or 1) for p in payloads]
        self._iovs = (IoVec * (4 * v))()
        self._msgs = (MMsgHdr * (2 * v))()
        _fill(self._msgs, self._iovs, 2)
        for k in range(2 * v):
            head, body = self._iovs[2 * k], self._iovs[2 * k + 1]
            head.iov_base = ctypes.addressof(self._hdr) + k * hsize
            head.iov_len = hsize
            body.iov_base = ctypes.addressof(self._payloads[k % v])
            body.iov_len = len(payloads[k % v])
        base = ctypes.addressof(self._msgs)
        self._at = [ctypes.c_void_p(base + k * _STRIDE) for k in range(2 * v)]

    def send(self, sock: socket.socket, first: int, count: int) -> int:
        """Send slots first..first+count-1; return how many went (0: the send buffer is full)."""
        sent: int = _sendmmsg(sock.fileno(), self._at[first], count, MSG_DONTWAIT)
        if sent < 0:
            if ctypes.get_errno() in _AGAIN:
                return 0
            raise _fail()
        return sent


class RecvStage:
    """`slots` receive slots for recvmmsg: datagram i's first hsize bytes land at
    `headers[i*hsize:]` and the rest at `payloads[i*psize:]`, so a batch's headers, and its
    payloads, are each one contiguous run of bytes."""

    def __init__(self, hsize: int, psize: int, slots: int) -> None:
        if _recvmmsg is None:
            raise OSError(errno.ENOSYS, _why)
        self.slots = slots
        self.headers = bytearray(hsize * slots)
        self.payloads = bytearray(max(psize, 1) * slots)
        self._hdr = (ctypes.c_char * len(self.headers)).from_buffer(self.headers)
        self._pay = (ctypes.c_char * len(self.payloads)).from_buffer(self.payloads)
        self._iovs = (IoVec * (2 * slots))()
        self._raw = bytearray(_STRIDE * slots)  # msg_len is read from here with one struct call
        self._msgs = (MMsgHdr * slots).from_buffer(self._raw)
        _fill(self._msgs, self._iovs, 2)
        for i in range(slots):
            head, body = self._iovs[2 * i], self._iovs[2 * i + 1]
            head.iov_base = ctypes.addressof(self._hdr) + i * hsize
            head.iov_len = hsize
            body.iov_base = ctypes.addressof(self._pay) + i * psize
            body.iov_len = psize
        self._at = ctypes.c_void_p(ctypes.addressof(self._msgs))
        pad = _STRIDE - _LEN_AT - 4
        self._lens = [struct.Struct(f"={f'{_LEN_AT}xI{pad}x' * n}") for n in range(slots + 1)]

    def recv(self, sock: socket.socket, count: int) -> int:
        """Receive up to `count` datagrams without waiting; return how many (0: none queued)."""
        flags = MSG_DONTWAIT | MSG_TRUNC
        got: int = _recvmmsg(sock.fileno(), self._at, count, flags, None)
        if got < 0:
            if ctypes.get_errno() in _AGAIN:
                return 0
            raise _fail()
        return got

    def lengths(self, count: int) -> tuple[int, ...]:
        """Return the real lengths of the last `count` datagrams received (MSG_TRUNC)."""
        lens: tuple[int, ...] = self._lens[count].unpack_from(self._raw)
        return lens


def available() -> str:
    """Return "" when sendmmsg and recvmmsg work here, else why not (then udpio falls back).

    Two datagrams go through a socketpair and back: a libc that has the symbols but a
    kernel or seccomp filter that refuses the calls fails here, not in the middle of a run.
    """
    if _sendmmsg is None or _recvmmsg is None:
        return _why
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stage = SendStage(4, [b"ab", b"cd"])
        stage.headers[0:8] = b"0000" + b"1111"
        if stage.send(a, 0, 2) != 2:
            return "sendmmsg sent fewer datagrams than asked"
        rx = RecvStage(4, 2, 2)
        if rx.recv(b, 2) != 2 or rx.lengths(2) != (6, 6):
            return "recvmmsg did not return both datagrams"
        if bytes(rx.headers) != b"00001111" or bytes(rx.payloads) != b"abcd":
            return "recvmmsg returned other bytes than were sent"
    except OSError as exc:
        return f"sendmmsg/recvmmsg failed: {exc.strerror or exc}"
    finally:
        a.close()
        b.close()
    return ""
