"""Steer the datagrams of a SO_REUSEPORT group by source address (a classic BPF program).

Workers share the UDP port through SO_REUSEPORT, which by default picks a socket by a hash of
the source address *and port*: the datagrams of one source address, sent from many ports,
spread over every worker, and each worker's token bucket (udp_rate_per_source) lets that
source through at the full rate, so N workers would allow N times the limit. With this
program every datagram of one source address goes to the same socket (the group's socket
number `address mod groups`), so the limit holds whatever the number of workers.

The program (SO_ATTACH_REUSEPORT_CBPF, socket(7)) reads the source address relative to the
network header (SKF_NET_OFF): IPv4's whole address, IPv6's last 32 bits. An index beyond the
group's current size (a worker restarting) makes the kernel fall back to its hash.
"""

from __future__ import annotations

import ctypes
import socket

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
SKF_NET_OFF = -0x100000  # linux/filter.h: offsets from the network header
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_ALU_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_RET_A = 0x16  # BPF_RET | BPF_A
# Where the source address's (last) 32 bits sit in the IP header.
_SOURCE_WORD: dict[int, int] = {socket.AF_INET: 12, socket.AF_INET6: 20}


class SockFilter(ctypes.Structure):
    """struct sock_filter (linux/filter.h)."""

    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    """struct sock_fprog (linux/filter.h)."""

    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def program(family: int, groups: int) -> list[tuple[int, int, int, int]]:
    """The instructions: load the source word, take it modulo `groups`, return it."""
    if family not in _SOURCE_WORD:
        raise ValueError(f"no source address offset for address family {family}")
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    load = (SKF_NET_OFF + _SOURCE_WORD[family]) & 0xFFFFFFFF
    return [(_LD_W_ABS, 0, 0, load), (_ALU_MOD_K, 0, 0, groups), (_RET_A, 0, 0, 0)]


def steer_by_source(sock: socket.socket, groups: int) -> None:
    """Attach the program to sock's SO_REUSEPORT group (OSError when the kernel refuses)."""
    insns = program(sock.family, groups)
    filters = (SockFilter * len(insns))(*(SockFilter(*i) for i in insns))
    prog = SockFprog(len(insns), ctypes.cast(filters, ctypes.POINTER(SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(prog))
