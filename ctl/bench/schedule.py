"""The paced send schedule (-q): when each request is due, corrected for coordinated omission."""

from __future__ import annotations

import time
from collections.abc import Callable

SPIN_NS = 150_000  # the scheduler spins for the last 150 µs: sleep() here wakes ~100 µs late


class RateSchedule:
    """Fixed send schedule: request n is due at start + n/rate, whatever happened before.

    Latency measured from `intended(n)` rather than from the actual send includes the time a
    request waited behind a slow one (coordinated-omission correction, as in wrk2). The clock
    and sleep are injectable so tests can drive the schedule with a fake clock.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], None] = time.sleep,
        spin_ns: int = SPIN_NS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.spin_ns = spin_ns
        self.start_ns = 0
        self._period_ns = 1e9 / rate

    def start(self, start_ns: int | None = None) -> None:
        """Anchor request 0 at `start_ns` (default: now)."""
        self.start_ns = self.clock() if start_ns is None else start_ns

    def intended(self, n: int) -> int:
        """Return the time (ns) request `n` should be sent."""
        return self.start_ns + int(n * self._period_ns)

    def due(self, now_ns: int) -> int:
        """Return how many requests are due by `now_ns` (the count of n with intended(n) <= now)."""
        if now_ns < self.start_ns:
            return 0
        n = int((now_ns - self.start_ns) / self._period_ns) + 1
        # Float rounding may put the boundary one off; intended() is the reference.
        while n > 0 and self.intended(n - 1) > now_ns:
            n -= 1
        while self.intended(n) <= now_ns:
            n += 1
        return n

    def wait_until(self, when_ns: int) -> int:
        """Sleep, then spin briefly, until `when_ns`; return the clock reading at wake-up."""
        now = self.clock()
        gap = when_ns - now
        if gap > self.spin_ns:
            self.sleep((gap - self.spin_ns) / 1e9)
            now = self.clock()
        while now < when_ns:
            now = self.clock()
        return now
