"""The backlog guard's schedule, with fake sockets and a fake clock: what it looks at, and when."""

from __future__ import annotations

import pytest

from echod.kernel import path as kernelpath
from echod.kernel.path import BacklogGuard

LIMIT = 1000


class FakeConn:
    """A kernel-path connection whose unwritten echo the test sets."""

    def __init__(self, cookie: int) -> None:
        self.fd = cookie
        self.cookie = cookie
        self.pending = 0
        self.looks = 0

    def backlog(self) -> int:
        self.looks += 1
        return self.pending

    def read_available(self) -> None:
        pass


class FakeActive:
    """The BPF activity set and its ring count."""

    def __init__(self) -> None:
        self.keys: set[int] = set()
        self.rings = 0
        self.cleared: list[int] = []

    def active(self, limit: int) -> list[int]:
        return sorted(self.keys)[:limit]

    def marks(self) -> int:
        return self.rings

    def clear_active(self, cookie: int) -> None:
        self.cleared.append(cookie)
        self.keys.discard(cookie)


class Clock:
    """The guard's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Guard:
    """A guard, what it handed over, and a way to run it as the daemon's loop does."""

    def __init__(self, clock: Clock, total_limit: int = 10 * LIMIT) -> None:
        self.clock = clock
        self.exceeded: list[tuple[int, int, str]] = []
        self.guard = BacklogGuard(
            lambda c, n, why: self.exceeded.append((c.cookie, n, why)), clock=clock.monotonic
        )
        self.active = FakeActive()
        self.total_limit = total_limit

    def run_for(self, seconds: float) -> None:
        """Check whenever due, until `seconds` have passed on the clock."""
        end = self.clock.now + seconds
        while True:
            self.clock.now = max(self.clock.now + kernelpath.MIN_STEP, self.guard.due())
            if self.clock.now > end:
                self.clock.now = end
                return
            self.guard.check(self.active, LIMIT, self.total_limit)


def test_a_rung_socket_is_looked_at_after_the_ring_delay_and_an_idle_one_never(
    clock: Clock,
) -> None:
    g = Guard(clock)
    rung, idle = FakeConn(1), FakeConn(2)
    g.guard.track(rung)
    g.guard.track(idle)
    g.guard.ring([1, 99])  # 99: another worker's socket
    assert g.guard.due() == clock.now + kernelpath.RING_DELAY
    g.run_for(kernelpath.RING_DELAY * 2)
    assert rung.looks == 1
    assert idle.looks == 0


def test_a_quiet_socket_leaves_the_activity_set_at_its_second_look(clock: Clock) -> None:
    g = Guard(clock)
    conn = FakeConn(1)
    g.guard.track(conn)
    g.active.keys.add(1)
    g.guard.ring([1])
    g.run_for(kernelpath.RING_DELAY * 2)
    assert (conn.looks, g.active.cleared) == (1, [])
    g.run_for(kernelpath.QUIET)
    assert (conn.looks, g.active.cleared) == (2, [1])
    g.run_for(kernelpath.QUIET * 3)
    assert conn.looks == 2  # not followed any more


def test_a_growing_backlog_is_followed_ever_sooner_and_reset_past_the_limit(
    clock: Clock,
) -> None:
    g = Guard(clock)
    conn = FakeConn(1)
    g.guard.track(conn)
    g.guard.ring([1])
    g.run_for(kernelpath.RING_DELAY)
    rate = 2000.0  # bytes a second: past the limit in half a second
    waits = []
    for _ in range(100):
        before = clock.now
        clock.now = max(g.guard.due(), clock.now + kernelpath.MIN_STEP)
        waits.append(clock.now - before)
        conn.pending += int(rate * (clock.now - before)) + 1
        g.guard.check(g.active, LIMIT, g.total_limit)
        if g.exceeded:
            break
    assert g.exceeded
    assert g.exceeded[0][0] == 1
    assert g.exceeded[0][2] == "connection"
    # Past the limit by less than one step's growth: the steps shrank as the limit neared.
    assert g.exceeded[0][1] < LIMIT * 1.5
    assert waits[-1] < waits[1]


def test_the_total_limit_resets_the_largest_first(clock: Clock) -> None:
    g = Guard(clock, total_limit=600)
    for cookie, pending in ((1, 300), (2, 500), (3, 400)):
        conn = FakeConn(cookie)
        conn.pending = pending
        g.guard.track(conn)
    g.guard.ring([1, 2, 3])
    g.run_for(kernelpath.RING_DELAY)  # 1,200 pending: 2 (500) and 3 (400) must go
    assert [(c, why) for c, _, why in g.exceeded] == [(2, "total"), (3, "total")]


def test_the_round_robin_finds_a_socket_that_never_rang(clock: Clock) -> None:
    g = Guard(clock)
    conns = [FakeConn(i) for i in range(1, 4)]
    for conn in conns:
        g.guard.track(conn)
    conns[1].pending = 10  # echo stuck and no ring: it left the map behind our back
    g.run_for(kernelpath.IDLE_CHECK)
    assert all(c.looks >= 1 for c in conns)
    assert g.guard.due() <= clock.now + kernelpath.QUIET  # and the stuck one is followed


@pytest.mark.parametrize("sweep", [0, 50])
def test_lost_rings_make_the_next_count_walk_the_activity_set(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, sweep: int
) -> None:
    """Once a second, sweeping or not (a busy guard sweeps at every check)."""
    monkeypatch.setattr(kernelpath, "SWEEP_PER_SECOND", sweep)
    g = Guard(clock)
    busy = FakeConn(7)
    busy.pending = 5  # followed every QUIET at most: checks keep coming
    g.guard.track(busy)
    g.guard.ring([7])
    conn = FakeConn(1)
    g.guard.track(conn)
    g.active.keys.add(1)
    g.active.rings = 3  # three rings written, none read: the ring overflowed
    g.run_for(kernelpath.IDLE_CHECK)
    assert conn.looks >= 1
    g.run_for(kernelpath.IDLE_CHECK * 2)
    # Followed as if it had rung: quiet at its second look, it leaves the activity set (its
    # next packet rings again).
    assert 1 in g.active.cleared
