"""What a person sees: `watch --reconnect` on a terminal shows one frame, the live daemon's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Echod, spawn
from tests.integration.echo_util import wait_for

ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def _screen(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
    ).stdout


def test_reconnect_replaces_the_old_frame(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    session = f"echoctl-watch-{time.monotonic_ns()}"
    first = spawn(tmp_path, "user")
    second: Echod | None = None
    cmd = f"{ECHOCTL} --control {first.control} watch -i 0.2 --reconnect"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "300", "-y", "60", cmd], check=True
    )
    try:
        wait_for(lambda: f"echod {first.proc.pid}, every" in _screen(session), 15, "a frame")
        assert first.stop() == 0
        wait_for(lambda: "waiting for" in _screen(session), 15, "the wait")
        second = spawn(tmp_path, "user")  # the same control socket path
        pid = second.proc.pid
        wait_for(lambda: f"echod {pid}, every" in _screen(session), 15, "the new frame")
        time.sleep(0.5)  # a few refreshes more
        screen = _screen(session)
        assert f"echod {first.proc.pid}, every" not in screen, screen
        assert screen.count(", every 0.2s") == 1, screen
        assert screen.count("connections") == 1, screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        first.stop()
        if second is not None:
            assert second.stop() == 0
