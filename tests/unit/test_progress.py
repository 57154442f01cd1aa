"""Bench progress lines: one per interval, summed over every worker."""

from __future__ import annotations

from typing import Any

from echoctl.bench.histogram import Histogram
from echoctl.bench.progress import Progress, Sample


def sample(tick: int, requests: int) -> Sample:
    hist = Histogram()
    hist.record_many([50_000] * 10)
    return Sample(tick, requests, requests * 64, requests * 64, 0, hist.to_sparse())


def test_one_line_per_tick_once_every_worker_reported() -> None:
    lines: list[dict[str, Any]] = []
    p = Progress(workers=2, interval_s=1.0, stream=False, emit=lines.append)
    p.add(0, sample(1, 1000))
    assert lines == []  # worker 1 has not reported tick 1 yet
    p.add(1, sample(1, 3000))
    assert [line["tick"] for line in lines] == [1]
    assert lines[0]["requests"] == 4000
    assert lines[0]["qps"] == 4000
    p.add(0, sample(2, 2000))
    p.add(1, sample(2, 6000))
    assert [line["tick"] for line in lines] == [1, 2]
    assert lines[1]["qps"] == 4000  # the interval's rate, not the run's average
    assert lines[1]["p99_us"] == lines[0]["p99_us"]


def test_a_late_worker_does_not_hold_lines_back() -> None:
    lines: list[dict[str, Any]] = []
    p = Progress(workers=2, interval_s=1.0, stream=True, emit=lines.append)
    p.add(0, sample(1, 100))
    p.add(0, sample(2, 200))  # worker 1 silent: tick 1 is printed with what is known
    assert [line["tick"] for line in lines] == [1]
    p.add(1, sample(2, 200))
    assert [line["tick"] for line in lines] == [1, 2]
    assert lines[1]["mb_per_s_sent"] > 0
