"""The log-linear latency histogram: bucket bounds, percentiles, merging, bounded memory."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from echoctl.bench.histogram import BUCKETS, SUB_BITS, Histogram, bucket_index, bucket_range

REL_ERROR = 1 / (1 << (SUB_BITS - 1))


def exact_percentile(values: list[int], pct: float) -> int:
    ordered = sorted(values)
    rank = max(1, -(-int(pct * len(ordered) * 10) // 1000))
    return ordered[rank - 1]


def test_small_values_are_exact() -> None:
    for v in range(1 << SUB_BITS):
        assert bucket_index(v) == v
        assert bucket_range(v) == (v, v)


@pytest.mark.parametrize("value", [256, 257, 511, 512, 1000, 123_456, 10**9, 2**40 + 7, 2**63 - 1])
def test_bucket_contains_value_within_relative_error(value: int) -> None:
    low, high = bucket_range(bucket_index(value))
    assert low <= value <= high
    assert high - low <= value * REL_ERROR


def test_buckets_are_contiguous_and_bounded() -> None:
    previous_high = -1
    for index in range(BUCKETS):
        low, high = bucket_range(index)
        assert low == previous_high + 1
        previous_high = high
    assert previous_high == 2**63 - 1
    assert bucket_index(2**64) == BUCKETS - 1
    assert bucket_index(-5) == 0


def test_percentiles_match_exact_within_error() -> None:
    rng = random.Random(4)
    values = [int(rng.lognormvariate(10, 1.2)) for _ in range(50_000)]
    hist = Histogram()
    hist.record_many(values)
    assert hist.count == len(values)
    assert hist.min == min(values)
    assert hist.max == max(values)
    assert hist.mean() == pytest.approx(sum(values) / len(values))
    for pct in (50.0, 90.0, 99.0, 99.9):
        exact = exact_percentile(values, pct)
        assert hist.percentile(pct) == pytest.approx(exact, rel=REL_ERROR)
    assert hist.percentile(100.0) == max(values)


def test_single_value_and_empty() -> None:
    hist = Histogram()
    assert hist.percentile(99) == 0
    assert hist.summary() == {"avg": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0}
    hist.record(12_345)
    assert hist.percentile(50) == 12_345  # clamped to the exact min/max
    assert hist.summary()["p999"] == 12.345


def test_merge_equals_recording_everything() -> None:
    rng = random.Random(7)
    parts = [[rng.randrange(1, 10**7) for _ in range(3000)] for _ in range(3)]
    whole = Histogram()
    merged = Histogram()
    for part in parts:
        whole.record_many(part)
        piece = Histogram()
        piece.record_many(part)
        merged.merge(piece)
    assert merged.counts == whole.counts
    assert (merged.count, merged.total, merged.min, merged.max) == (
        whole.count,
        whole.total,
        whole.min,
        whole.max,
    )


def test_sparse_round_trip_is_small() -> None:
    hist = Histogram()
    hist.record_many([1000, 1010, 50_000, 50_000])  # 1000 and 1010 differ by > 0.8 %
    sparse = hist.to_sparse()
    assert len(sparse["buckets"]) == 3
    assert Histogram.from_sparse(sparse).counts == hist.counts


def test_memory_does_not_grow_with_values() -> None:
    """190,000 more values leave the retained memory where one batch put it."""
    batch = range(0, 10**9, 10**5)  # 10,000 values spread over most buckets
    tracemalloc.start()
    try:
        hist = Histogram()
        hist.record_many(batch)
        gc.collect()
        after_one = tracemalloc.get_traced_memory()[0]
        for _ in range(19):
            hist.record_many(batch)
        gc.collect()
        after_twenty = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Keeping the values would take at least 8 bytes each: 1.5 MB for 190,000 of them.
    assert after_twenty - after_one < 100_000, after_twenty - after_one
    assert len(hist.counts) == BUCKETS
    assert hist.count == 20 * len(batch)


def test_reset_forgets() -> None:
    hist = Histogram()
    hist.record_many([5, 6, 7])
    hist.reset()
    assert hist.count == 0
    assert hist.percentile(50) == 0
