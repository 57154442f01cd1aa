"""Credentials of a control client, read from its connected Unix socket."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

_UCRED = struct.Struct("3i")
# SO_PEERGROUPS (Linux 4.13) is 59 in asm-generic (x86, arm, arm64, riscv, ...); parisc and
# sparc number it differently. Python does not export it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt() takes at most 1,024 bytes: 256 gids. A peer in more groups gets ERANGE
# and is treated as in none but its primary group (it fails closed).
_GROUPS_BUFLEN = 1024


@dataclass(frozen=True)
class PeerCred:
    """Credentials of a connected client, as the kernel recorded them at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_groups(sock: Any) -> frozenset[int]:
    """The peer's supplementary groups at connect(), from SO_PEERGROUPS (OSError: unreadable).

    The kernel takes them with the rest of the credentials, so there is no race with the
    peer's process exiting or its pid being reused, and no need for /proc (which systemd's
    ProtectProc=invisible hides).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFLEN)
    count = len(raw) // 4
    return frozenset(struct.unpack(f"={count}I", raw[: 4 * count]))


def peer_cred(sock: Any) -> PeerCred:
    """SO_PEERCRED and SO_PEERGROUPS of a connected Unix socket; no groups if unreadable."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        groups = peer_groups(sock)
    except OSError:
        groups = frozenset()
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=groups)


def is_admin(peer: PeerCred, own_uid: int, admin_gid: int | None) -> bool:
    """Whether `peer` may call mutating methods (and use the reserved control slots)."""
    if peer.uid in (0, own_uid):
        return True
    return admin_gid is not None and (peer.gid == admin_gid or admin_gid in peer.groups)
