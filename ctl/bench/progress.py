"""Progress lines for a running bench: one per interval, summed over every worker.

Each worker reports its running totals at every whole interval since measuring began (tick 1,
2, ...). A line for tick k is printed once: when every worker has reported k, or when one has
already reported a later tick (a late worker's most recent totals stand in for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from echoctl.bench.histogram import Histogram

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Sample:
    """One worker's running totals at one tick."""

    tick: int
    requests: int
    bytes_sent: int
    bytes_received: int
    failed: int
    hist: dict[str, Any]


@dataclass
class Progress:
    """Collect worker samples and print one line per tick."""

    workers: int
    interval_s: float
    stream: bool
    emit: ProgressFn
    udp: bool = False  # the rate is datagrams echoed
    latest: dict[int, Sample] = field(default_factory=dict)
    printed: int = 0  # the last tick printed
    last_line: dict[str, Any] | None = None

    def add(self, index: int, sample: Sample) -> None:
        """Take one worker's sample; print every tick that is now complete."""
        self.latest[index] = sample
        while self._complete(self.printed + 1):
            self.printed += 1
            self.emit(self._line(self.printed))

    def _complete(self, tick: int) -> bool:
        if len(self.latest) < self.workers:
            return any(s.tick > tick for s in self.latest.values())
        ticks = [s.tick for s in self.latest.values()]
        return min(ticks) >= tick or max(ticks) > tick

    def _line(self, tick: int) -> dict[str, Any]:
        samples = list(self.latest.values())
        hist = Histogram()
        for s in samples:
            hist.merge_sparse(s.hist)
        totals = {
            "requests": sum(s.requests for s in samples),
            "bytes_sent": sum(s.bytes_sent for s in samples),
            "bytes_received": sum(s.bytes_received for s in samples),
        }
        before = self.last_line or {"requests": 0, "bytes_sent": 0, "bytes_received": 0}
        span = self.interval_s * (tick - (self.last_line or {"tick": 0})["tick"])
        line = {
            "tick": tick,
            "elapsed_s": tick * self.interval_s,
            **totals,
            "requests_interval": totals["requests"] - before["requests"],
            "qps": (totals["requests"] - before["requests"]) / span,
            "mb_per_s_sent": (totals["bytes_sent"] - before["bytes_sent"]) / span / 1e6,
            "mb_per_s_received": (totals["bytes_received"] - before["bytes_received"]) / span / 1e6,
            "p99_us": hist.percentile(99.0) / 1000 if hist.count else None,
            "failed": sum(s.failed for s in samples),
            "stream": self.stream,
            "udp": self.udp,
        }
        self.last_line = line
        return line
