"""The limits the docs promise are the code's."""

from __future__ import annotations

from pathlib import Path

from echod.control import limits
from echod.supervisor.pool import ANSWER_WAIT
from echod.supervisor.process import WORKER_HANG

DOCS = Path(__file__).parents[2] / "docs"


def _text(name: str) -> str:
    return " ".join((DOCS / name).read_text().split())


def test_fd_reserve() -> None:
    assert f"fewer than **{limits.FD_RESERVE}** fds left" in _text("protocol.md")


def test_worker_hang_and_answer_wait() -> None:
    assert f"answers nothing for **{WORKER_HANG:g} s**" in _text("operations.md")
    assert f"waits **{ANSWER_WAIT:g} s** for each worker" in _text("protocol.md")
