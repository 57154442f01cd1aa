"""Signals during bench and compare: a first Ctrl-C or SIGTERM stops the run, a second aborts.

`bench` stops its workers on the first SIGINT or SIGTERM and reports what it measured until
then, marked as interrupted (exit 130 or 143, as iperf3 and wrk do). A second signal, or one
that comes before anything is measured, unwinds at once: KeyboardInterrupt for SIGINT,
Terminated for SIGTERM, so every `finally` still stops workers and daemons.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(SystemExit):
    """SIGTERM arrived: unwinding runs every finally, so workers and daemons are stopped."""


def unwind(signum: int) -> BaseException:
    """Return the exception that unwinds the program for `signum`."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return Terminated(EXIT_TERMINATED)


def exit_status(signum: int) -> int:
    """Return the exit status for a run ended by `signum`: 128 + the signal number."""
    return 128 + signum


class Interrupt:
    """Where a run learns that it should stop, and which signal asked."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._stop: Callable[[], None] | None = None
        self._graceful = False

    def graceful(self, stop: Callable[[], None]) -> None:
        """From now on a first signal calls `stop` instead of unwinding."""
        self._stop = stop
        self._graceful = True
        if self.signum is not None:
            stop()

    def abrupt(self) -> None:
        """From now on every signal unwinds (nothing measured is left to report)."""
        self._graceful = False
        if self.signum is not None:
            raise unwind(self.signum)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: stop gracefully the first time, unwind otherwise."""
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self._graceful and self._stop is not None:
            self._stop()
            return
        # Cleanup is bounded (joins and stops have timeouts); further signals must not cut it.
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise unwind(signum)

    @property
    def name(self) -> str | None:
        """The signal's name (SIGINT, SIGTERM), or None."""
        return signal.Signals(self.signum).name if self.signum is not None else None


@contextlib.contextmanager
def catching(interrupt: Interrupt) -> Iterator[Interrupt]:
    """Route SIGINT and SIGTERM to `interrupt` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield interrupt  # signal handlers can only be set from the main thread
        return
    old = {s: signal.signal(s, interrupt.handle) for s in SIGNALS}
    try:
        yield interrupt
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
