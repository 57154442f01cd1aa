"""A small form of the many-connections run (tests/manyconns.py; `make manyconns` is 100,000)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import manyconns
from tests.integration.conftest import require_bpf


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_many_connections_across_workers_each_echo_exactly(tmp_path: Path, mode: str) -> None:
    if mode == "kernel":
        require_bpf()
    opt = manyconns.Options(connections=3000, clients=3, workers=2, mode=mode, idle=1.0)
    result = manyconns.run(opt, tmp_path)
    assert manyconns.ok(result, 3000), result
    assert result["daemon_connections"] == 3000
    assert sum(result["per_worker"]) == 3000
    assert min(result["per_worker"]) > 0, "SO_REUSEPORT gave one worker nothing"
