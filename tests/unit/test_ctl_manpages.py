"""The man pages in man/ are what mk/manpages.py (click-man) makes from today's commands."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import click
import pytest

from echoctl.cli import cli as echoctl_cli
from echod.__main__ import cli as echod_cli

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "mk" / "manpages.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return dict(_generator().pages())


def test_committed_pages_are_current(pages: dict[str, str]) -> None:
    committed = {p.name: p.read_text() for p in (ROOT / "man").iterdir()}
    assert sorted(committed) == sorted(pages), "run make man"
    for name, text in pages.items():
        assert committed[name] == text, f"man/{name} is stale: run make man"


def test_every_command_and_option_has_its_page(pages: dict[str, str]) -> None:
    commands: list[tuple[str, click.Command]] = [("echod.8", echod_cli), ("echoctl.1", echoctl_cli)]
    assert isinstance(echoctl_cli, click.Group)
    commands += [(f"echoctl-{n}.1", c) for n, c in echoctl_cli.commands.items()]
    assert len(pages) == len(commands)
    for name, command in commands:
        page = pages[name]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for flag in param.opts:
                    assert flag.replace("-", r"\-") in page, f"{name} lacks {flag}"
    assert '.TH "ECHOD" "8"' in pages["echod.8"]
    assert "_ECHOCTL_COMPLETE=bash_source echoctl" in pages["echoctl.1"]


def test_pages_render_without_warnings(pages: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("needs groff (Debian: groff-base)")
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stderr) == (0, "")
