"""The rate scheduler behind `bench -q`, driven by a fake clock."""

from __future__ import annotations

import pytest

from echoctl.bench.config import BenchConfig
from echoctl.bench.report import failures
from echoctl.bench.runner import split
from echoctl.bench.schedule import RateSchedule


class FakeClock:
    """A monotonic nanosecond clock: moves by `tick` per reading, and when slept on or told to."""

    def __init__(self, now: int = 1_000_000_000, tick: int = 0) -> None:
        self.now = now
        self.tick = tick
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += int(seconds * 1e9)

    def advance(self, ns: int) -> None:
        self.now += ns


def test_intended_times_follow_a_fixed_grid() -> None:
    clock = FakeClock()
    sched = RateSchedule(1000, clock=clock, sleep=clock.sleep)
    sched.start()
    assert [sched.intended(n) - clock.now for n in range(4)] == [0, 1_000_000, 2_000_000, 3_000_000]
    assert sched.intended(1_000_000) - sched.start_ns == 1_000_000_000_000


def test_due_counts_requests_whose_time_has_come() -> None:
    clock = FakeClock()
    sched = RateSchedule(4, clock=clock, sleep=clock.sleep)
    sched.start(clock.now + 100)
    assert sched.due(clock.now) == 0  # before the start
    assert sched.due(sched.start_ns) == 1
    assert sched.due(sched.start_ns + 249_999_999) == 1
    assert sched.due(sched.start_ns + 250_000_000) == 2
    assert sched.due(sched.start_ns + 10_000_000_000) == 41


@pytest.mark.parametrize("rate", [3.0, 7.0, 666.6666, 2000.0, 123_457.0])
def test_due_agrees_with_intended_at_every_boundary(rate: float) -> None:
    sched = RateSchedule(rate, clock=FakeClock())
    sched.start(0)
    for n in range(0, 5000, 37):
        t = sched.intended(n)
        assert sched.due(t) == n + 1
        assert sched.due(t - 1) == n


def test_a_stall_does_not_lower_the_rate() -> None:
    """After the sender stalls, every missed request is due at once (coordinated omission)."""
    clock = FakeClock(tick=1000)
    sched = RateSchedule(1000, clock=clock, sleep=clock.sleep)
    sched.start()
    sent = 0
    lateness = []
    while sent < 100:
        if sent == 10:
            clock.advance(50_000_000)  # the server stalls for 50 ms once
        due = sched.due(clock()) - sent
        if due <= 0:
            sched.wait_until(sched.intended(sent))
            continue
        for n in range(sent, sent + due):
            lateness.append(clock() - sched.intended(n))
        sent += due
        clock.advance(10_000)  # each batch takes 10 µs
    end = clock() - sched.start_ns
    assert max(lateness) >= 40_000_000  # requests behind the stall are measured as late
    assert 99 * 1_000_000 <= end <= 100 * 1_000_000  # and the schedule still ends on time


def test_wait_until_sleeps_then_spins() -> None:
    clock = FakeClock(tick=1000)
    sched = RateSchedule(10, clock=clock, sleep=clock.sleep, spin_ns=100_000)
    target = clock.now + 5_000_000
    woke = sched.wait_until(target)
    assert woke >= target
    assert clock.sleeps == [pytest.approx(0.0049, abs=2e-6)]


def test_wait_until_does_not_sleep_for_short_gaps() -> None:
    ticks = iter(range(0, 10_000_000, 1000))
    slept: list[float] = []
    sched = RateSchedule(10, clock=lambda: next(ticks), sleep=slept.append, spin_ns=100_000)
    assert sched.wait_until(50_000) >= 50_000
    assert slept == []


def test_simulated_run_holds_its_rate() -> None:
    """A paced loop on the fake clock sends rate x duration requests, within 2 %."""
    clock = FakeClock(tick=1000)
    rate, duration_ns = 2000.0, 2_000_000_000
    sched = RateSchedule(rate, clock=clock, sleep=clock.sleep)
    sched.start()
    end = sched.start_ns + duration_ns
    sent = 0
    while True:
        now = clock()
        if now >= end:
            break
        due = sched.due(now) - sent
        if due <= 0:
            sched.wait_until(min(sched.intended(sent), end))
            continue
        sent += due
        clock.advance(60_000)  # a 60 µs round trip
    assert sent == pytest.approx(rate * duration_ns / 1e9, rel=0.02)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateSchedule(0)


def test_connections_are_split_evenly() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert sum(split(7, 2)) == 7


def test_worker_count() -> None:
    assert BenchConfig(connections=1, workers=4).worker_count() == 1
    assert BenchConfig(connections=10, workers=3).worker_count() == 3
    assert BenchConfig(connections=10, qps=2000).worker_count() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "burst"}, "pattern"),
        ({"connections": 0}, "at least 1"),
        ({"qps": 10, "pattern": "stream"}, "ping-pong only"),
        ({"duration": 0}, "duration"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs).validate()


def test_warmup_needs_a_duration() -> None:
    with pytest.raises(ValueError, match="--warmup needs --duration"):
        BenchConfig(warmup=1.0).validate()
    BenchConfig(warmup=1.0, duration=2.0).validate()


def test_a_run_without_requests_fails() -> None:
    passed = {"errors": 0, "mismatches": 0, "warmup_errors": 0, "requests": 10}
    assert failures(passed) == []
    assert failures({**passed, "requests": 0}) == ["no request completed"]
    assert failures({**passed, "warmup_errors": 2}) == ["2 errors during the warm-up"]
