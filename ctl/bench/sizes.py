"""Message sizes for the load generator: one size, or a range each message's size is drawn from.

Sizes in a range are drawn log-uniformly: every doubling of size is as likely as any other, so
`1-1048576` sends as many messages of 1-2 B as of 512 KiB-1 MiB. A uniform draw would make
almost every message larger than 1 KiB (mean 512 KiB), leaving the small-skb paths, where
most per-message costs and bugs are, nearly untested.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

UNITS = {"": 1, "k": 1024, "ki": 1024, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}
MAX_SIZE = 1 << 30  # one message; a bigger one is a typo, not a test


def parse_bytes(text: str) -> int:
    """Parse a byte count such as `64`, `16k`, `1M` or `1MiB` (binary units); ValueError if bad."""
    raw = text.strip().lower().removesuffix("b")
    digits = raw.rstrip("kmgi")
    unit = raw[len(digits) :]
    if not digits.isdigit() or unit not in UNITS:
        raise ValueError(f"not a byte count: {text!r}")
    return int(digits) * UNITS[unit]


@dataclass(frozen=True)
class SizeRange:
    """Message sizes from `low` to `high` bytes, both included; one size when they are equal."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.fixed and not 1 <= self.low <= MAX_SIZE:
            raise ValueError(f"message sizes must be from 1 to {MAX_SIZE} bytes, got {self.low}")
        if not 1 <= self.low <= self.high <= MAX_SIZE:
            raise ValueError(f"sizes must satisfy 1 <= MIN <= MAX <= {MAX_SIZE}, got {self}")

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        """Parse `SIZE` or `MIN-MAX` (e.g. `64`, `1-1048576`, `1-1M`)."""
        low, sep, high = text.partition("-")
        lo = parse_bytes(low)
        return cls(lo, parse_bytes(high) if sep else lo)

    @property
    def fixed(self) -> bool:
        """Whether every message has the same size."""
        return self.low == self.high

    def __str__(self) -> str:
        return str(self.low) if self.fixed else f"{self.low}-{self.high}"

    def drawer(self, rng: random.Random) -> Callable[[], int]:
        """Return a function that draws one message size from this range with `rng`."""
        if self.fixed:
            size = self.low
            return lambda: size
        lo, span = math.log(self.low), math.log(self.high + 1) - math.log(self.low)
        high, uniform = self.high, rng.random

        def draw() -> int:
            # exp(U[log lo, log(hi+1))) then floor: every integer in range is reachable.
            return min(high, int(math.exp(lo + span * uniform())))

        return draw


def size_label(n: int) -> str:
    """Return a size for people: `64 B`, `4 KiB`, `1.5 KiB`, `1 MiB`."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{0 if n % scale == 0 else 1}f} {unit}"
    return f"{n} B"
