"""A compact log-linear latency histogram: bounded memory, mergeable, cheap to fill in batches.

Values are non-negative integers (nanoseconds here). Values below 2**SUB_BITS are counted
exactly; above that each power-of-two range is split into 2**(SUB_BITS-1) equal buckets, so a
reported value is within 1/2**(SUB_BITS-1) (0.8 %) of the true one, as in HdrHistogram with
about two significant digits. The whole int64 range needs under 8k buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUB_BITS = 8
_HALF = 1 << (SUB_BITS - 1)
_MAX_BITS = 63
BUCKETS = (_MAX_BITS - SUB_BITS + 2) << (SUB_BITS - 1)
_MAX_VALUE = (1 << _MAX_BITS) - 1

PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def bucket_index(value: int) -> int:
    """Return the bucket that counts `value` (clamped to 0 .. 2**63-1)."""
    if value < 0:
        value = 0
    elif value > _MAX_VALUE:
        value = _MAX_VALUE
    shift = value.bit_length() - SUB_BITS
    if shift <= 0:
        return value
    return (value >> shift) + (shift << (SUB_BITS - 1))


def bucket_range(index: int) -> tuple[int, int]:
    """Return the smallest and largest value counted by bucket `index`."""
    if index < (1 << SUB_BITS):
        return index, index
    shift = (index >> (SUB_BITS - 1)) - 1
    low = (index - (shift << (SUB_BITS - 1))) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Log-linear histogram with exact count, sum, min and max."""

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Count one value."""
        self.record_many((value,))

    def record_many(self, values: Iterable[int]) -> None:
        """Count a batch of values; the hot loop collects ints in a list and folds them here."""
        batch = values if isinstance(values, list | tuple) else list(values)
        if not batch:
            return
        counts = self.counts
        low = min(batch)
        high = max(batch)
        if low < 0 or high > _MAX_VALUE:
            batch = [min(max(v, 0), _MAX_VALUE) for v in batch]
            low, high = min(batch), max(batch)
        # Inlined bucket_index: this loop runs once per request, so a call per value matters.
        for v in batch:
            shift = v.bit_length() - SUB_BITS
            if shift <= 0:
                counts[v] += 1
            else:
                counts[(v >> shift) + (shift << (SUB_BITS - 1))] += 1
        if self.count == 0 or low < self.min:
            self.min = low
        if high > self.max:
            self.max = high
        self.count += len(batch)
        self.total += sum(batch)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts into this one."""
        if other.count == 0:
            return
        self.merge_sparse(other.to_sparse())

    def to_sparse(self) -> dict[str, object]:
        """Return a small picklable/JSON-able form: only the buckets in use."""
        return {
            "buckets": {i: c for i, c in enumerate(self.counts) if c},
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    def merge_sparse(self, sparse: Mapping[str, object]) -> None:
        """Add a histogram given in the form `to_sparse` returns."""
        count = int(sparse["count"])  # type: ignore[call-overload]
        if count == 0:
            return
        buckets = sparse["buckets"]
        assert isinstance(buckets, Mapping)
        for index, n in buckets.items():
            self.counts[int(index)] += int(n)
        low = int(sparse["min"])  # type: ignore[call-overload]
        high = int(sparse["max"])  # type: ignore[call-overload]
        if self.count == 0 or low < self.min:
            self.min = low
        self.max = max(self.max, high)
        self.count += count
        self.total += int(sparse["total"])  # type: ignore[call-overload]

    @classmethod
    def from_sparse(cls, sparse: Mapping[str, object]) -> Histogram:
        """Build a histogram from the form `to_sparse` returns."""
        hist = cls()
        hist.merge_sparse(sparse)
        return hist

    def reset(self) -> None:
        """Forget every value."""
        self.counts = [0] * BUCKETS
        self.count = self.total = self.min = self.max = 0

    def mean(self) -> float:
        """Return the exact mean, or 0.0 when empty."""
        return self.total / self.count if self.count else 0.0

    def percentile(self, pct: float) -> int:
        """Return the value at percentile `pct` (0..100), or 0 when empty.

        Like HdrHistogram: the highest value equivalent to the bucket holding the rank, clamped
        to the exact min and max, so p100 is the true maximum.
        """
        if self.count == 0:
            return 0
        rank = max(1, min(self.count, int(-(-pct * self.count // 100))))
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank:
                    high = bucket_range(index)[1]
                    return max(self.min, min(high, self.max))
        return self.max

    def summary(self, scale: float = 1000.0) -> dict[str, float]:
        """Return avg, p50, p90, p99, p999 and max divided by `scale` (ns → µs by default)."""
        out = {"avg": round(self.mean() / scale, 3)}
        for key, pct in PERCENTILES.items():
            out[key] = round(self.percentile(pct) / scale, 3)
        out["max"] = round(self.max / scale, 3)
        return out
