"""Shared test set-up: quiet in-process logs, and the `bpf` marker's skip-or-fail rule."""

from __future__ import annotations

import pytest

from echod import logs

logs.configure("warning", "console")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `bpf` skips without BPF, and fails instead under ECHOD_REQUIRE_BPF=1."""
    if item.get_closest_marker("bpf") is not None:
        from tests.integration.conftest import require_bpf

        require_bpf()
