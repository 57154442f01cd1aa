"""How much a TCP socket holds in its receive queue, asked of the kernel by address (sock_diag).

The same-host bypass's ingress path puts echo straight into the *client's* socket, where no
TCP window bounds it: a client that never reads makes it grow without limit. echod does not
hold that socket, so it asks NETLINK_SOCK_DIAG for it by its four-tuple, one exact lookup (not
a dump of every socket on the host), for the SK_MEMINFO_RMEM_ALLOC the kernel charges it.
pyroute2's DiagSocket only dumps, so this one request is written out here (sock_diag(7)).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_SKMEMINFO = 7
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
SK_MEMINFO_RMEM_ALLOC = 0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (network order), src[4], dst[4] (network order words), if, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_INET_DIAG_MSG_LEN = 72  # struct inet_diag_msg
_NLATTR = struct.Struct("=HH")


def _packed(host: str, family: int) -> bytes:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if family == socket.AF_INET6 and isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed.ljust(16, b"\0")


class SockDiag:
    """One netlink socket for exact lookups; close() releases it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._seq = 0

    def rmem(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """Receive memory of the TCP socket bound to `local` and connected to `remote`.

        None when there is no such socket (it closed). Tries AF_INET, then the same addresses
        v4-mapped in AF_INET6 (a client may connect an IPv6 socket to an IPv4 address).
        """
        families = [socket.AF_INET6]
        if ":" not in local[0]:
            families.insert(0, socket.AF_INET)
        for family in families:
            found = self._query(family, local, remote)
            if found is not None:
                return found
        return None

    def peer_rmem(self, sock: socket.socket) -> int | None:
        """rmem() of the socket at the other end of `sock` (a connection on this host)."""
        return self.rmem(sock.getpeername()[:2], sock.getsockname()[:2])

    def _query(self, family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        self._seq += 1
        sockid = _SOCKID.pack(
            local[1], remote[1], _packed(local[0], family), _packed(remote[0], family)
        )
        sockid += _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 0xFFFFFFFF)
        body += sockid
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                self._seq, 0)  # fmt: skip
        self.sock.send(header + body)
        reply = self.sock.recv(4096)
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(reply, 0)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
            if code == errno.ENOENT:
                return None
            raise OSError(code, os.strerror(code), "sock_diag")
        at = _NLMSGHDR.size + _INET_DIAG_MSG_LEN
        while at + _NLATTR.size <= length:
            size, attr = _NLATTR.unpack_from(reply, at)
            if size < _NLATTR.size:
                break
            if attr == INET_DIAG_SKMEMINFO:
                return int(struct.unpack_from("=I", reply, at + 4 + 4 * SK_MEMINFO_RMEM_ALLOC)[0])
            at += (size + 3) & ~3
        return None

    def close(self) -> None:
        """Release the netlink socket; idempotent."""
        self.sock.close()
