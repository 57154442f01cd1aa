"""A short live-switch soak in every test run; `make soak` runs the long one (tests/soak.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak
from tests.integration.conftest import require_bpf


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("start", ["user", "kernel"])
def test_live_switch_soak(tmp_path: Path, start: str, workers: int) -> None:
    """Long-lived pipelined streams on IPv4 and IPv6, 1 B to 1 MiB writes, every byte checked
    at its offset, through repeated live switches (across every worker with two): nothing
    lost, repeated or stuck."""
    require_bpf()
    opt = soak.Options(
        connections=12, duration=20.0, switches=8, stall=10.0, start=start, workers=workers
    )
    result = soak.run(opt, tmp_path)
    assert result["errors"] == [], result["errors"]
    assert result["failed_switches"] == [], result["failed_switches"]
    assert len(result["switches"]) == 8
    assert result["connections"] == 12 + 8
    assert result["bytes_checked"] > 50 * 1024 * 1024, result
    if start == "user":
        # The first switch moved the user-path streams into the kernel.
        assert result["switches"][0]["moved"] == 12, result["switches"]
    # Both paths carried the streams at some point.
    assert max(sw["kernel_bytes"] for sw in result["switches"]) > 0
    assert max(sw["user_bytes"] for sw in result["switches"]) > 0
    assert result["daemon"]["aborted_backlog"] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [1, 2])
def test_live_switch_soak_with_the_bypass_switched_too(tmp_path: Path, workers: int) -> None:
    """The same streams while the daemon steps round user+bypass, kernel+bypass, kernel and
    user: bypass on and off live, and modes switched with it on. Nothing lost or stuck."""
    require_bpf()
    opt = soak.Options(
        connections=12,
        duration=20.0,
        switches=8,
        stall=10.0,
        start="user",
        workers=workers,
        bypass="switch",
    )
    result = soak.run(opt, tmp_path)
    assert result["errors"] == [], result["errors"]
    assert result["failed_switches"] == [], result["failed_switches"]
    assert [(sw["mode"], sw["bypass"]) for sw in result["switches"]][:4] == [
        ("kernel", True),
        ("kernel", False),
        ("user", False),
        ("user", True),
    ]
    assert result["bytes_checked"] > 50 * 1024 * 1024, result
    # The stream opened at a kernel+bypass switch took the short circuit.
    assert max(sw["short_circuit_bytes"] for sw in result["switches"]) > 0, result["switches"]
    assert result["daemon"]["aborted_backlog"] == 0
