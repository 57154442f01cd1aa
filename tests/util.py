"""Helpers shared by tests/unit and tests/integration (nothing here needs privileges)."""

from __future__ import annotations

import time
from collections.abc import Callable

TIMEOUT = 10.0


def wait_for(pred: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll pred until true, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
