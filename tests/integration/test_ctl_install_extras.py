"""`make install` adds the man pages and bash completion, and `make uninstall` removes them.

Runs the install-extras step `make install` calls, into a temporary prefix, with this venv's
echoctl standing in for /opt/echod's (the full install is tested in a container, test_nspawn).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(p.name for p in (ROOT / "man").iterdir())


def _make(target: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    dirs = [
        f"ECHOD_OPT={tmp / 'opt'}",
        f"ECHOD_MANDIR={tmp / 'share' / 'man'}",
        f"ECHOD_COMPLETIONDIR={tmp / 'bash-completion' / 'completions'}",
    ]
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-f", "mk/ops.mk", target, *dirs],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def opt(tmp_path: Path) -> Path:
    """An install's prefix: its manifest, and bin/ holding this venv's echoctl."""
    if os.geteuid() != 0:
        pytest.skip("make install-extras runs as root")
    if shutil.which("man") is None:
        pytest.skip("needs man (Debian: man-db)")
    if Path("/run/systemd/system").exists():
        pytest.skip("uninstall would ask this host's systemd about echod.service")
    prefix = tmp_path / "opt"
    prefix.mkdir()
    (prefix / ".install-manifest").touch()
    (prefix / "bin").symlink_to(Path(sys.executable).parent)
    return prefix


def test_install_adds_man_pages_and_completion_and_uninstall_removes_them(
    opt: Path, tmp_path: Path
) -> None:
    r = _make("install-extras", tmp_path)
    assert r.returncode == 0, r
    man = tmp_path / "share" / "man"
    installed = sorted(p.name for p in man.rglob("*") if p.is_file())
    assert installed == PAGES
    assert (man / "man8" / "echod.8").is_file()
    # man finds them by name and section.
    for section, page in (("8", "echod"), ("1", "echoctl"), ("1", "echoctl-compare")):
        shown = subprocess.run(
            ["man", "-M", str(man), section, page],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"},
        )
        assert shown.returncode == 0, shown
        assert "OPTIONS" in shown.stdout

    completion = tmp_path / "bash-completion" / "completions" / "echoctl"
    echoctl = opt / "bin" / "echoctl"
    script = (
        f"source {completion}; COMP_WORDS=(echoctl sta); COMP_CWORD=1; "
        f'_echoctl_completion {echoctl}; echo "${{COMPREPLY[*]}}"'
    )
    words = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert words.stdout.split() == ["start", "stats", "status"], words

    manifest = (opt / ".install-manifest").read_text().splitlines()
    assert f"file {completion}" in manifest
    assert f"dir {man}" in manifest

    r = _make("uninstall", tmp_path)
    assert r.returncode == 0, r
    # Every file and every directory the step created is gone; nothing else was touched.
    assert not (tmp_path / "share").exists()
    assert not (tmp_path / "bash-completion").exists()


def test_install_extras_needs_an_install(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("make install-extras runs as root")
    r = _make("install-extras", tmp_path)
    assert r.returncode != 0
    assert "run make install" in r.stderr
    assert not (tmp_path / "share").exists()
