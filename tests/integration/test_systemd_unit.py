"""systemd/echod.service passes `systemd-analyze verify` and scores 2.5 or better offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "echod.service"
MAX_EXPOSURE = 2.5


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists; the installed path does not exist here.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/echod", "ExecStart=/bin/true")
    copy = tmp_path / "echod.service"
    copy.write_text(text)
    result = _analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_offline_security_score() -> None:
    result = _analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for echod\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_kernel_mode_stays_possible() -> None:
    """The hardening must leave what the BPF sockmap echo needs."""
    unit = _directives()
    assert unit["Type"] == ["notify"]
    assert unit["User"] == ["echod"]
    assert set(unit["CapabilityBoundingSet"][0].split()) == {"CAP_BPF", "CAP_NET_ADMIN"}
    assert set(unit["AmbientCapabilities"][0].split()) == {"CAP_BPF", "CAP_NET_ADMIN"}
    # bpf(2) is not in @system-service; a later ~@privileged would take it away again.
    assert "bpf" in unit["SystemCallFilter"][0].split()
    assert not any("@privileged" in f for f in unit["SystemCallFilter"][1:])
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["RuntimeDirectory"] == ["echod"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # ProcSubset=pid hides /proc/stat, which psutil needs for process start times.
    assert "ProcSubset" not in unit
