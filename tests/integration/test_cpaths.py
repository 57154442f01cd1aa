"""`python -m tests.cpaths` in brief: the C client on every path, every byte checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import cpaths

pytestmark = pytest.mark.bpf


def test_the_c_client_runs_on_the_four_paths(tmp_path: Path) -> None:
    table = cpaths.summary(cpaths.run(rounds=1, seconds=0.3, workers=1, size=64, workdir=tmp_path))
    assert set(table) == {
        f"{cpaths.name(mode, bypass)} {conns}"
        for mode, bypass in cpaths.PATHS
        for conns in cpaths.LOADS
    }
    for key, cell in table.items():
        assert cell["qps"] > 0, key
        assert cell["mismatches"] == 0, key
    assert "x req/s" in cpaths.render(table, 64)
