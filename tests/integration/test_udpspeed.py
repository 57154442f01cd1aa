"""`python -m tests.udpspeed` in brief: the flood from a namespace, both modes, every datagram
checked, the kernel run echoed by the TCX program on the host's veth end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import udpspeed

pytestmark = pytest.mark.bpf


def test_the_flood_runs_in_both_modes_on_their_own_cpus(tmp_path: Path) -> None:
    result = udpspeed.run(rounds=1, seconds=0.5, size=64, window=8, threads=1, workdir=tmp_path)
    runs = result["runs"]
    for mode in udpspeed.MODES:
        (run,) = runs[mode]
        assert run["received"] > 0, (mode, run)
        assert run["mismatches"] == 0, (mode, run)
        assert run["duplicates"] == 0, (mode, run)
        assert 0.0 < run["server_cpu"] <= 1.0, (mode, run)
    # The last run was kernel mode's: the program echoed at least what the client got back.
    assert result["udp"]["kernel"]["echoed_packets"] >= runs["kernel"][0]["received"]
    text = udpspeed.render(result, 64)
    assert "kernel / user" in text
    assert "per server CPU second" in text
