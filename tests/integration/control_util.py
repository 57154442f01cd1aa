"""Helpers shared by the control-socket tests: another uid's access, a daemon still serving."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, roundtrip

NOBODY = 65534


ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def still_serving(d: Echod) -> None:
    """The daemon echoes on TCP and answers on its control socket."""
    with connect(d.host, d.port) as sock:
        roundtrip(sock, os.urandom(4096))
    assert d.status()["state"] == "serving"


@contextmanager
def reachable_by_others(path: str) -> Iterator[None]:
    """Let other uids traverse to `path` (pytest's temp dirs are 0700) for the test's duration."""
    changed: list[tuple[str, int]] = []
    parent = os.path.dirname(path)
    try:
        while parent not in ("/", ""):
            mode = stat.S_IMODE(os.stat(parent).st_mode)
            if not mode & 0o001:
                changed.append((parent, mode))
                os.chmod(parent, mode | 0o001)
            parent = os.path.dirname(parent)
        yield
    finally:
        for p, mode in changed:
            os.chmod(p, mode)
