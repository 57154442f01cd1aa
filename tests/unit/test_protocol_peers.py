"""Control peers: admin rights, client slots, peer credentials, and the refusal rate limiter."""

from __future__ import annotations

import os
import socket

from echod.control import limits
from echod.control.peercred import PeerCred, is_admin, peer_cred
from echod.logs import RateLimited


def test_is_admin() -> None:
    def peer(uid: int, gid: int, groups: tuple[int, ...] = ()) -> PeerCred:
        return PeerCred(pid=1, uid=uid, gid=gid, groups=frozenset(groups))

    assert is_admin(peer(0, 0), own_uid=1000, admin_gid=None)
    assert is_admin(peer(1000, 1000), own_uid=1000, admin_gid=None)
    assert not is_admin(peer(65534, 65534), own_uid=0, admin_gid=None)
    assert is_admin(peer(65534, 65534, (4242,)), own_uid=0, admin_gid=4242)
    assert is_admin(peer(65534, 4242), own_uid=0, admin_gid=4242)
    assert not is_admin(peer(65534, 65534, (1, 2)), own_uid=0, admin_gid=4242)


def test_slot_refusal() -> None:
    total, per_uid, reserved = (
        limits.MAX_CLIENTS,
        limits.MAX_CLIENTS_PER_UID,
        limits.RESERVED_CLIENTS,
    )
    # An unprivileged uid is bounded on its own, and by the shared slots.
    assert limits.slot_refusal(False, 65534, 0, per_uid - 1) is None
    assert "uid 65534" in str(limits.slot_refusal(False, 65534, per_uid, per_uid))
    assert limits.slot_refusal(False, 1000, total - 1, 0) is None
    assert limits.slot_refusal(False, 1000, total, 0) == "too many control clients"
    # Admins have no per-uid bound and the reserved slots besides.
    assert limits.slot_refusal(True, 0, total, total) is None
    assert limits.slot_refusal(True, 0, total + reserved - 1, 50) is None
    assert limits.slot_refusal(True, 0, total + reserved, 0) == "too many control clients"


def test_peer_cred_of_a_socketpair_is_our_own() -> None:
    # tests/integration checks another uid with supplementary groups.
    left, right = socket.socketpair()
    with left, right:
        peer = peer_cred(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups == frozenset(os.getgroups())


def test_rate_limiter_keys_rates_and_expiry() -> None:
    rl = RateLimited(burst=2, period=1.0, max_keys=3)
    assert rl.allow("denied", 0.0, key=1) == (True, 0)
    assert rl.allow("denied", 0.1, key=1) == (True, 0)
    assert rl.allow("denied", 0.2, key=1) == (False, 0)
    # Another peer has its own window.
    assert rl.allow("denied", 0.3, key=2) == (True, 0)
    # An event may carry its own rate: one per 10 s.
    assert rl.allow("accept.failed", 0.0, burst=1, period=10.0) == (True, 0)
    assert rl.allow("accept.failed", 5.0, burst=1, period=10.0) == (False, 0)
    # Past max_keys, new keys share one window per event.
    assert rl.allow("denied", 0.4, key=3) == (True, 0)
    assert rl.allow("denied", 0.5, key=4) == (True, 0)
    assert rl.allow("denied", 0.6, key=5) == (False, 0)
    # Over windows report what they suppressed, once, and are forgotten.
    assert sorted(rl.expired(1.5), key=str) == [("denied", 1, 1), ("denied", None, 1)]
    assert rl.expired(1.6) == []
    assert rl.allow("accept.failed", 10.5, burst=1, period=10.0) == (True, 1)
