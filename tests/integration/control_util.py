"""Helpers shared by the control-socket tests: another uid's access, a daemon still serving."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, roundtrip, wait_for

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


@contextmanager
def traced(pid: int, syscalls: str, out: Path) -> Iterator[list[str]]:
    """strace every thread of `pid` for `syscalls` (strace's -e trace= list) while the block
    runs; the list yielded holds the trace lines (fds shown with their paths) once it ends."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (apt-get install strace)"
    threads = len(os.listdir(f"/proc/{pid}/task"))
    proc = subprocess.Popen(
        [strace, "-f", "-y", "-qq", "-e", f"trace={syscalls}", "-o", str(out), "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        # strace attaches to the threads one by one: wait until each names it as its tracer.
        def attached() -> bool:
            tasks = os.listdir(f"/proc/{pid}/task")
            return len(tasks) >= threads and all(
                f"TracerPid:\t{proc.pid}\n" in Path(f"/proc/{pid}/task/{t}/status").read_text()
                for t in tasks
            )

        wait_for(attached, what="strace to attach")
        yield lines
    finally:
        proc.send_signal(signal.SIGINT)  # detaches, leaving the daemon running
        proc.communicate(timeout=30)
    lines += out.read_text().splitlines()
