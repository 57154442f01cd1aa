"""structlog set-up: a console renderer on a TTY, JSON lines otherwise (journald-friendly).

A daemon must never be wedged by its log sink: a record that cannot be written (the reader of
stderr is gone, the pipe is non-blocking and full) is dropped and counted, and the caller goes
on. dropped_records() is that count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog

from echod.config.schema import LOG_LEVELS

_LEVELS = {name: getattr(logging, name.upper()) for name in LOG_LEVELS}

_dropped = 0


def dropped_records() -> int:
    """Log records (and plain lines) dropped because stderr refused them, since start."""
    return _dropped


def write_line(text: str, stream: TextIO | None = None) -> bool:
    """Write one line to stderr (or stream) and never raise; False, and counted, if dropped.

    The line goes out in one write(2) to the file descriptor when there is one, so that nothing
    stays behind in a buffer to fail again at the next write or at exit.
    """
    global _dropped
    stream = sys.stderr if stream is None else stream
    data = (text + "\n").encode("utf-8", "backslashreplace")
    try:
        if stream is None:
            raise OSError("no stderr")
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            fd = -1  # a stream without a descriptor (a test's capture): write to it as a file
        if fd < 0:
            stream.write(text + "\n")
            stream.flush()
        else:
            # Whatever another writer left buffered goes first; if it cannot, this line still may.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except (OSError, ValueError):
        _dropped += 1
        return False
    return True


class LineLogger:
    """A structlog logger that writes each rendered record with write_line()."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        """Write one record; a refused write drops it (see write_line)."""
        write_line(message, self._stream)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class LineLoggerFactory:
    """Makes LineLoggers on one stream (None: whatever sys.stderr is at the time)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> LineLogger:
        return LineLogger(self._stream)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog to stderr with the given level and format (auto: console on a TTY)."""
    tty = _isatty(sys.stderr)
    console = fmt == "console" or (fmt == "auto" and tty)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty)
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=LineLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


class RateLimited:
    """Lets at most `burst` events of one name (and key) through per `period`; counts the rest.

    `key` tells peers apart (one flooding peer does not silence another's events), and `burst`
    and `period` may be given per call for an event that needs its own rate. At most `max_keys`
    windows are kept: past that, expired ones are forgotten, and then new keys share one window
    per event, so a peer cannot grow the table without bound.
    """

    def __init__(self, burst: int = 10, period: float = 1.0, max_keys: int = 1024) -> None:
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        # (event, key) -> (window start, logged in window, suppressed, period)
        self._window: dict[tuple[str, object], tuple[float, int, int, float]] = {}

    def allow(
        self,
        event: str,
        now: float | None = None,
        *,
        key: object = None,
        burst: int | None = None,
        period: float | None = None,
    ) -> tuple[bool, int]:
        """(whether to log this one, how many were suppressed since the last one logged)."""
        now = time.monotonic() if now is None else now
        burst = self.burst if burst is None else burst
        period = self.period if period is None else period
        slot = (event, key)
        if slot not in self._window and len(self._window) >= self.max_keys:
            self.expired(now)
            if len(self._window) >= self.max_keys:
                slot = (event, None)
        start, count, suppressed, _ = self._window.get(slot, (now, 0, 0, period))
        if now - start >= period:
            start, count = now, 0
        if count < burst:
            self._window[slot] = (start, count + 1, 0, period)
            return True, suppressed
        self._window[slot] = (start, count, suppressed + 1, period)
        return False, 0

    def expired(self, now: float | None = None) -> list[tuple[str, object, int]]:
        """Forget windows whose period is over; (event, key, suppressed) for those that hid some.

        Call it now and then, so that what a burst suppressed is reported even when no event
        of that name follows.
        """
        now = time.monotonic() if now is None else now
        out = []
        for slot, (start, _, suppressed, period) in list(self._window.items()):
            if now - start >= period:
                del self._window[slot]
                if suppressed:
                    out.append((slot[0], slot[1], suppressed))
        return out

    def warning(
        self, logger: Any, event: str, rate: tuple[int, float] | None = None, **fields: Any
    ) -> None:
        """logger.warning(event), unless past its rate (`rate`: its own burst and period);
        what earlier windows suppressed is written out first."""
        for name, _, count in self.expired():
            logger.warning(name, suppressed=count)
        burst, period = rate if rate is not None else (None, None)
        ok, suppressed = self.allow(event, burst=burst, period=period)
        if ok:
            logger.warning(event, **fields, **({"suppressed": suppressed} if suppressed else {}))
